"""The web gateway's HTTP API against a real gateway, model server and name server on 127.0.0.1.

Every stream here is a real HTTP connection to the gateway's uvicorn server; every change is a
real modify on the model server, relayed through the gateway's one subscription.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the gateway extra (pip install -e '.[gateway]')")

from remote_mvc import Field, Model, ModelService, max_length, read_audit  # noqa: E402
from remote_mvc.errors import (  # noqa: E402
    AuthenticationError,
    ConflictError,
    GatewayError,
    PermissionDenied,
    ServiceUnavailable,
    ValidationError,
)
from remote_mvc.gateway_client import GatewayClient  # noqa: E402
from remote_mvc.testing import wait_until  # noqa: E402

MODEL = "remote_mvc.model"


def raw(gw, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        conn.close()


def basic(identity: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{identity}:{secret}".encode()).decode()}


def events_until(stream, revision: int, timeout: float = 10.0) -> list[tuple[str, dict]]:
    """Events read until one at ``revision`` or later (fails the test after ``timeout``)."""
    got, deadline = [], time.monotonic() + timeout
    while not got or got[-1][1]["revision"] < revision:
        left = deadline - time.monotonic()
        assert left > 0, f"no event at revision {revision} within {timeout}s; got {got}"
        got.append(stream.next(timeout=left))
    return got


@pytest.fixture
def gw_stack(mvc_stack):
    model = mvc_stack.model()
    mvc_stack.ticker(interval=0.2)
    gw = mvc_stack.gateway()
    return mvc_stack, model, gw


def test_reads_models_values_schema_and_404(gw_stack):
    stack, model, gw = gw_stack
    stack.client().modify({"name": "first", "value": 7})
    api = GatewayClient(gw.url)
    wait_until(lambda: api.snapshot(MODEL)["revision"] == 1, message="the gateway to relay revision 1")
    names = [m["model"] for m in api.models()]
    assert names == [MODEL, "remote_mvc.ticker"]
    snap = api.snapshot(MODEL)
    assert snap["values"] == {"name": "first", "value": 7}
    assert snap["epoch"] and snap["schema"]["value"]["type"] == "int"
    assert [e["revision"] for e in api.history(MODEL, 0)] == [1]
    assert any(v["viewer_id"].startswith("gateway-") for v in api.viewers(MODEL))
    with pytest.raises(GatewayError) as exc:
        api.snapshot("no.such.model")
    assert exc.value.status == 404
    status, _, _ = raw(gw, "GET", "/models/no.such.model/events")
    assert status == 404
    status, _, body = raw(gw, "GET", f"/models/{MODEL}/history?since=abc")
    assert status == 400 and b"since" in body
    # the page and its parts are served
    status, headers, body = raw(gw, "GET", "/")
    assert status == 200 and b"<script src=\"/app.js\">" in body and headers["content-type"].startswith("text/html")
    assert raw(gw, "GET", "/app.js")[0] == 200 and raw(gw, "GET", "/style.css")[0] == 200


def test_stream_relays_changes_with_revision_ids_one_subscription(gw_stack):
    stack, model, gw = gw_stack
    api = GatewayClient(gw.url)
    streams = [api.events(MODEL) for _ in range(5)]
    for s in streams:
        kind, data = s.next(timeout=10)
        assert kind == "snapshot" and data["reason"] == "initial" and data["revision"] == 0
    client = stack.client()
    for i in range(1, 6):
        client.modify({"value": i})
    for s in streams:
        got = events_until(s, 5)
        assert [(k, d["revision"], d["values"]["value"]) for k, d in got] == [("change", i, i) for i in range(1, 6)]
        assert s.last_id == 5
        s.close()
    # five stream clients, one subscription from the gateway for this model
    assert [v["viewer_id"] for v in stack.client().viewers()].count(gw.viewers[0].viewer_id) == 1
    assert len(model.server.viewers()) == 1


def test_resume_from_ring_last_event_id_and_since(gw_stack):
    stack, _, gw = gw_stack
    api = GatewayClient(gw.url)
    client = stack.client()
    with api.events(MODEL) as s:
        s.next(timeout=10)
        client.modify({"value": 1})
        epoch = events_until(s, 1)[-1][1]["epoch"]
    for i in range(2, 6):
        client.modify({"value": i})
    wait_until(lambda: api.snapshot(MODEL)["revision"] == 5, message="revision 5 at the gateway")
    with api.events(MODEL, last_event_id=1) as s:
        got = events_until(s, 5)
        assert [(k, d["revision"]) for k, d in got] == [("change", r) for r in range(2, 6)]
    with api.events(MODEL, since=3, epoch=epoch) as s:
        assert [(k, d["revision"]) for k, d in events_until(s, 5)] == [("change", 4), ("change", 5)]
        client.modify({"value": 6})
        assert s.next(timeout=10)[1]["revision"] == 6  # and then it stays live
    text = raw(gw, "GET", "/metrics")[2].decode()
    assert 'remote_mvc_gateway_resumes_total{model="remote_mvc.model",source="ring"} 2.0' in text


def test_snapshot_when_too_far_behind_ahead_or_another_epoch(mvc_stack):
    mvc_stack.model()
    gw = mvc_stack.gateway(gateway_models=MODEL, gateway_ring=5)
    api = GatewayClient(gw.url)
    client = mvc_stack.client()
    for i in range(1, 21):
        client.modify({"value": i})
    wait_until(lambda: api.snapshot(MODEL)["revision"] == 20, message="revision 20 at the gateway")
    epoch = api.snapshot(MODEL)["epoch"]
    for n, (since, ep, reason) in enumerate(((2, None, "behind"), (99, None, "ahead"), (19, "another", "epoch"))):
        with api.events(MODEL, since=since, epoch=ep) as s:
            kind, data = s.next(timeout=10)
            assert (kind, data["reason"], data["revision"]) == ("snapshot", reason, 20 + n)
            assert data["values"]["value"] == (20 if n == 0 else 100 + n - 1)
            client.modify({"value": 100 + n})
            kind, data = s.next(timeout=10)
            assert (kind, data["revision"], data["values"]["value"]) == ("change", 21 + n, 100 + n)
    wait_until(lambda: api.snapshot(MODEL)["revision"] == 23, message="revision 23")
    with api.events(MODEL, since=19, epoch=epoch) as s:  # the ring of 5 holds 19..23: an exact resume
        assert [(k, d["revision"]) for k, d in events_until(s, 23)] == [("change", r) for r in (20, 21, 22, 23)]
    text = raw(gw, "GET", "/metrics")[2].decode()
    for reason in ("behind", "ahead", "epoch"):
        assert f'remote_mvc_gateway_snapshots_total{{model="remote_mvc.model",reason="{reason}"}} 1.0' in text


def test_resume_exactly_across_a_gateway_restart_from_model_history(mvc_stack):
    mvc_stack.model()
    gw = mvc_stack.gateway(gateway_models=MODEL)
    client = mvc_stack.client()
    api = GatewayClient(gw.url)
    with api.events(MODEL) as s:
        s.next(timeout=10)
        client.modify({"value": 1})
        epoch = events_until(s, 1)[-1][1]["epoch"]
    gw.stop()
    for i in range(2, 5):
        client.modify({"value": i})  # made while no gateway runs
    gw2 = mvc_stack.gateway(gateway_models=MODEL)
    api2 = GatewayClient(gw2.url)
    wait_until(lambda: api2.snapshot(MODEL)["revision"] == 4, message="the new gateway at revision 4")
    with api2.events(MODEL, since=1, epoch=epoch) as s:  # its ring starts at 4: 2 and 3 come from history
        assert [(k, d["revision"]) for k, d in events_until(s, 4)] == [("change", 2), ("change", 3), ("change", 4)]
    assert 'source="history"} 1.0' in raw(gw2, "GET", "/metrics")[2].decode()


def test_follow_resumes_a_silent_stream_from_its_last_revision(mvc_stack):
    """``GatewayClient.follow`` (what ``remote-mvc-ctl --gateway watch`` runs): a stream silent for
    longer than ``silence`` is taken as lost, and the next one resumes after the last revision
    yielded: no snapshot, no duplicate, nothing missed."""
    mvc_stack.model()
    gw = mvc_stack.gateway(gateway_models=MODEL, gateway_heartbeat=60.0)  # no heartbeat within the test
    client = mvc_stack.client()
    lost: list[Exception] = []
    follow = GatewayClient(gw.url).follow(MODEL, silence=0.5, on_lost=lost.append)
    try:
        assert [(k, d["revision"]) for k, d in [next(follow)]] == [("snapshot", 0)]
        client.modify({"value": 1})
        kind, data = next(follow)
        assert (kind, data["revision"]) == ("change", 1)

        def after_a_loss() -> None:
            wait_until(lambda: lost, 10, message="the silent stream to be taken as lost")
            client.modify({"value": 2})

        writer = threading.Thread(target=after_a_loss)
        writer.start()
        kind, data = next(follow)
        writer.join(10)
        assert (kind, data["revision"], data["values"]["value"]) == ("change", 2, 2)
        assert lost and all(isinstance(exc, ServiceUnavailable) for exc in lost)
    finally:
        follow.close()


def test_modify_on_behalf_of_audited_with_both_names(gw_stack):
    stack, model, gw = gw_stack
    api = GatewayClient(gw.url, "controller", stack.controller_secret)
    with GatewayClient(gw.url).events(MODEL) as s:
        s.next(timeout=10)
        revision = api.modify(MODEL, {"name": "from-http", "value": 42}, request_id="r-1")
        assert revision == 1
        kind, data = s.next(timeout=10)
    assert (kind, data["identity"], data["via"], data["values"]) == (
        "change", "controller", "gateway", {"name": "from-http", "value": 42})
    assert api.modify(MODEL, {"value": 43}, request_id="r-1") == 1  # a retry is not applied twice
    assert stack.client().query() == {"name": "from-http", "value": 42}
    records = [r for r in read_audit(model.settings.audit_file()) if r["action"] == "modify"]
    assert records[-1]["identity"] == "controller" and records[-1]["via"] == "gateway"
    assert records[-1]["result"] == "accepted" and records[-1]["revision"] == 1
    assert api.whoami() == {"identity": "controller", "role": "controller", "permissions": ["modify", "read"]}
    with pytest.raises(ConflictError):
        api.modify(MODEL, {"value": 5}, expected_revision=0)
    with pytest.raises(ValidationError, match="value"):
        api.modify(MODEL, {"value": "not a number"})


def test_bad_input_statuses_401_403_400_413(gw_stack):
    stack, model, gw = gw_stack
    path = f"/models/{MODEL}"
    body = json.dumps({"changes": {"value": 1}}).encode()
    ctl = basic("controller", stack.controller_secret)
    # 401: none, wrong secret, unknown identity, malformed header; a challenge unless the page asks
    status, headers, _ = raw(gw, "POST", path, body)
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    assert raw(gw, "POST", path, body, basic("controller", "wrong"))[0] == 401
    assert raw(gw, "POST", path, body, basic("nobody", "x"))[0] == 401
    status, headers, _ = raw(gw, "POST", path, body, {"Authorization": "Basic !!!", "X-Requested-With": "x"})
    assert status == 401 and "www-authenticate" not in headers
    with pytest.raises(AuthenticationError):
        GatewayClient(gw.url, "controller", "wrong").whoami()
    # 403: authenticated, but the role (from the model server's own table) may not modify
    with pytest.raises(PermissionDenied, match="service"):
        GatewayClient(gw.url, "service", stack.service_secret).modify(MODEL, {"value": 1})
    # 400: malformed JSON, wrong shape, unknown keys, validation message from the schema
    for bad in (b"{not json", b"[]", b'{"changes": {}}', b'{"changes": {"value": 1}, "x": 1}',
                b'{"changes": {"value": 1}, "expected_revision": "3"}', b"[" * 60000, b"\xff\xfe"):
        status, _, answer = raw(gw, "POST", path, bad, ctl)
        assert status == 400, bad
        assert json.loads(answer)["error"] == "ValidationError"
    status, _, answer = raw(gw, "POST", path, b'{"changes": {"value": "abc"}}', ctl)
    assert status == 400 and "value" in json.loads(answer)["message"]
    # 413: declared too long, and too long without a length (chunked)
    big = json.dumps({"changes": {"name": "x" * 70000}}).encode()
    assert raw(gw, "POST", path, big, ctl)[0] == 413
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=10)
    conn.request("POST", path, body=iter([big[:40000], big[40000:]]), headers={**ctl, "Transfer-Encoding": "chunked"},
                 encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()
    assert stack.client().query()["value"] == 0  # nothing of it was applied
    # every refusal is on record: the gateway's own (401, 400, 413), the model server's (403, schema)
    gw_audit = read_audit(gw.settings.audit_file())
    assert {r["result"] for r in gw_audit} == {"refused"}
    errors = [r["error"] for r in gw_audit]
    assert "invalid credentials" in errors and "too_large" in errors and any(e.startswith("malformed") for e in errors)
    assert not any(stack.controller_secret in json.dumps(r) for r in gw_audit)
    server = [r for r in read_audit(model.settings.audit_file()) if r["action"] == "modify"]
    assert {(r["identity"], r.get("via"), r["result"]) for r in server} == {
        ("service", "gateway", "forbidden"), ("controller", "gateway", "invalid")}
    text = raw(gw, "GET", "/metrics")[2].decode()
    assert 'remote_mvc_gateway_requests_total{route="modify",status="413"} 2.0' in text


def test_delegation_refused_without_the_delegate_permission(gw_stack):
    """Only a DELEGATE holder may name another identity: a controller calling the model server's
    modify_for directly, for admin, is refused and audited."""
    stack, model, gw = gw_stack
    with pytest.raises(PermissionDenied, match="delegate"):
        stack.client().call("modify_for", "admin", {"value": 1}, None, request_id="x")
    assert stack.client().query()["value"] == 0


class SmallBufferConnection(http.client.HTTPConnection):
    """A client connection with the smallest receive buffer the kernel allows: one that stops
    reading fills up after a few kilobytes, so the gateway's writes to it block."""

    def connect(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        self.sock.settimeout(self.timeout)
        self.sock.connect((self.host, self.port))


def slow_clients_dropped(gw, model: str = MODEL) -> float:
    for line in raw(gw, "GET", "/metrics")[2].decode().splitlines():
        if line.startswith(f'remote_mvc_gateway_slow_clients_dropped_total{{model="{model}"}}'):
            return float(line.split()[-1])
    return 0.0


class Document(Model):
    """A model with big values: a few hundred changes are more than every socket buffer holds."""

    text = Field(str, "", max_length(40000))
    value = Field(int, 0)


@pytest.fixture
def big_model(mvc_stack):
    service = ModelService(mvc_stack.settings.replace(service="document"), Document, "test.document").start()
    assert service.wait_registered(10)
    yield "test.document"
    service.stop()


def test_slow_reader_gets_a_snapshot_instead_of_a_backlog(mvc_stack, big_model):
    """A client that stops reading has its buffer (4 events) overflow: when it reads again it gets
    what was already written, then one snapshot of the current values, then live changes;
    a reading client meanwhile gets every change."""
    gw = mvc_stack.gateway(gateway_models=big_model, gateway_client_buffer=4, gateway_send_timeout=120.0)
    api = GatewayClient(gw.url, timeout=30)
    client = mvc_stack.client(model=big_model)
    with api.events(big_model, connection=SmallBufferConnection("127.0.0.1", gw.http_port, timeout=30)) as slow, \
            api.events(big_model) as fast:
        slow.next(timeout=10)
        fast.next(timeout=10)
        last = 0
        for i in range(300):  # 12 MB of frames: far beyond what the socket buffers hold (4 MB at most)
            last = client.modify({"text": f"{i:05d}" + "x" * 39990, "value": i + 1})
            if i % 20 == 0:  # keep the reading client reading
                events_until(fast, last, timeout=30)
        got = events_until(fast, last, timeout=60)
        assert [d["revision"] for _, d in got][-1] == last
        seen = events_until(slow, last, timeout=60)
    kinds = [k for k, _ in seen]
    assert "snapshot" in kinds, "the slow reader never got a snapshot"
    # every change once, in order, except where a snapshot stands for the ones the reader could not
    # take; more than one when the gateway's writer was itself slow on a loaded machine: its buffer of
    # 4 overflowed once before the socket was full, and again once it was
    revision = 0
    for kind, data in seen:
        if kind == "snapshot":
            assert data["reason"] == "slow" and data["revision"] > revision, "a snapshot that goes back"
        else:
            assert data["revision"] == revision + 1, "a gap that no snapshot covers"
        revision = data["revision"]
    assert revision == last and seen[-1][1]["values"]["value"] == last
    assert len(seen) < last // 2  # a snapshot instead of the backlog
    assert slow_clients_dropped(gw, big_model) == 0


def test_client_that_never_reads_is_dropped_others_unaffected(mvc_stack):
    mvc_stack.model()
    gw = mvc_stack.gateway(gateway_models=MODEL, gateway_client_buffer=4, gateway_send_timeout=1.0)
    api = GatewayClient(gw.url)
    client = mvc_stack.client()
    with api.events(MODEL, connection=SmallBufferConnection("127.0.0.1", gw.http_port, timeout=10)) as slow, \
            api.events(MODEL) as fast:
        slow.next(timeout=10)
        fast.next(timeout=10)
        revision = 0
        deadline = time.monotonic() + 60
        got: list = []
        while slow_clients_dropped(gw) < 1:
            assert time.monotonic() < deadline, "the stuck client was never dropped"
            revision = client.modify({"name": "n" * 190 + str(revision), "value": revision + 1})
            got += events_until(fast, revision, timeout=30)  # this one reads as it goes
        # the reading client got every change, in order, with nothing missed
        assert [d["revision"] for _, d in got] == list(range(1, revision + 1))
        assert {k for k, _ in got} == {"change"}
    wait_until(lambda: 'remote_mvc_gateway_clients{model="remote_mvc.model"} 0.0' in
               raw(gw, "GET", "/metrics")[2].decode(), message="both clients to be gone")


def test_model_server_restart_under_a_stream(mvc_stack, tmp_path):
    proc = mvc_stack.process("model")
    proc.wait_for_log(lambda line: line.get("event") == "registered", 20)
    gw = mvc_stack.gateway(gateway_models=MODEL)
    client = mvc_stack.client()
    client.modify({"value": 1})
    with GatewayClient(gw.url).events(MODEL) as s:
        assert events_until(s, 1)[-1][1]["values"]["value"] == 1  # (a snapshot at 0 first, if the relay lagged)
        proc.stop()
        proc2 = mvc_stack.process("model")
        proc2.wait_for_log(lambda line: line.get("event") == "registered", 20)
        client.modify({"value": 2})
        kind, data = s.next(timeout=20)
        assert (kind, data["revision"], data["values"]["value"]) == ("change", 2, 2)


def test_idle_streams_get_heartbeats(mvc_stack):
    mvc_stack.model()
    gw = mvc_stack.gateway(gateway_models=MODEL, gateway_heartbeat=0.2)
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=10)
    try:
        conn.request("GET", f"/models/{MODEL}/events")
        reply = conn.getresponse()
        assert reply.status == 200 and reply.getheader("content-type").startswith("text/event-stream")
        lines = []
        while not any(line.startswith(b":") for line in lines):  # a comment line: the keep-alive
            line = reply.readline()
            assert line, f"the stream ended; got {lines}"
            lines.append(line)
        assert b"event: snapshot\n" in lines  # the snapshot came first, then the idle heartbeat
    finally:
        conn.close()


def test_too_many_stream_clients_503(mvc_stack):
    mvc_stack.model()
    gw = mvc_stack.gateway(gateway_models=MODEL, gateway_max_clients=2)
    api = GatewayClient(gw.url)
    with api.events(MODEL) as a, api.events(MODEL) as b:
        a.next(timeout=10)
        b.next(timeout=10)
        status, headers, _ = raw(gw, "GET", f"/models/{MODEL}/events")
        assert status == 503 and headers["retry-after"] == "5"


def test_ctl_read_commands_and_set_through_the_gateway(gw_stack):
    """``remote-mvc-ctl --gateway URL`` works with no route to the name or model server (their
    ports point nowhere here) and no callback into the CLI."""
    stack, _, gw = gw_stack
    env = stack.env("ctl", identity="controller", ns_port=1, ns_host="127.0.0.1")

    def ctl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "remote_mvc.cli", "--gateway", gw.url, *args], env=env,
                              capture_output=True, text=True, timeout=timeout)

    watcher = subprocess.Popen([sys.executable, "-m", "remote_mvc.cli", "--gateway", gw.url, "--json", "watch",
                                "--count", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = json.loads(watcher.stdout.readline())  # the initial snapshot: the stream is open
    assert first["snapshot"] is True and first["revision"] == 0
    assert ctl("set", "name=via-ctl", "value=5").stdout.strip() == "revision 1"
    assert ctl("set", "value=6", "--expect", "1").stdout.strip() == "revision 2"
    out, _ = watcher.communicate(timeout=30)
    assert [json.loads(line)["revision"] for line in out.splitlines()] == [1, 2]
    assert watcher.returncode == 0
    query = ctl("query")
    assert query.returncode == 0 and "remote_mvc.model at revision 2" in query.stdout and "'via-ctl'" in query.stdout
    assert json.loads(ctl("--json", "query").stdout)["values"] == {"name": "via-ctl", "value": 6}
    history = ctl("--json", "history", "--since", "0").stdout
    assert [(e["revision"], e["identity"], e["via"]) for e in json.loads(history)] == [
        (1, "controller", "gateway"), (2, "controller", "gateway")]
    assert ctl("whoami").stdout.strip() == "controller (controller)"
    assert "gateway-" in ctl("viewers").stdout
    assert ctl("--model", "ticker", "query").stdout.startswith("remote_mvc.ticker at revision")
    conflict = ctl("set", "value=7", "--expect", "1")
    assert conflict.returncode == 1 and conflict.stderr.startswith("error: ConflictError:")
    missing = ctl("--model", "nope", "query")
    assert missing.returncode == 1 and "404" in missing.stderr
    down = subprocess.run([sys.executable, "-m", "remote_mvc.cli", "--gateway", "http://127.0.0.1:1", "query"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode == 69 and "ServiceUnavailable" in down.stderr


def test_ctl_commands_are_the_same_through_the_gateway(gw_stack):
    """One implementation per command: ``get``, ``watch --since --changes-only`` and the usage
    errors behave through the gateway as they do over Pyro5; what the gateway cannot carry
    (``drop``, ``shell``) is refused with exit 1; SIGTERM ends a watch with exit 0."""
    stack, _, gw = gw_stack
    env = stack.env("ctl", identity="controller", ns_port=1, ns_host="127.0.0.1")
    rm = stack.client()
    rm.modify({"name": "g", "value": 1})
    for i in range(2, 6):
        rm.modify({"value": i})

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "remote_mvc.cli", "--gateway", gw.url, *args], env=env,
                              capture_output=True, text=True, timeout=30)

    assert ctl("get", "value").stdout == "5\n" and ctl("get", "name", "-o", "json").stdout == '"g"\n'
    assert ctl("get", "colour").returncode == 1
    out = ctl("watch", "--since", "2", "--count", "3", "--changes-only", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == [
        {"revision": r, "changes": {"value": {"old": r - 1, "new": r}}} for r in (3, 4, 5)]
    malformed = ctl("set", "value")
    assert malformed.returncode == 2 and "expected FIELD=VALUE" in malformed.stderr
    assert ctl("watch", "--since", "-1").returncode == 2
    for args in (["drop", "viewer-1"], ["shell"]):
        refused = ctl(*args)
        assert refused.returncode == 1 and "not available through the gateway" in refused.stderr, args
    watcher = subprocess.Popen([sys.executable, "-m", "remote_mvc.cli", "--gateway", gw.url, "--json", "watch"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert json.loads(watcher.stdout.readline())["snapshot"] is True  # the stream is open
    watcher.terminate()
    assert watcher.wait(15) == 0
    watcher.stdout.close()
    watcher.stderr.close()


def test_silent_and_half_sent_requests_are_closed_streams_are_not(mvc_stack):
    """A peer that opens connections and sends nothing, or half a request line, must not hold
    them (uvicorn's keep-alive timer stops at the first byte); a long event stream is kept."""
    mvc_stack.model()
    mvc_stack.ticker(interval=0.2)
    gw = mvc_stack.gateway(gateway_header_timeout=0.5, gateway_heartbeat=0.2)
    address = ("127.0.0.1", gw.http_port)
    silent = socket.create_connection(address, timeout=10)
    half = socket.create_connection(address, timeout=10)
    half.sendall(b"GET /models HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    stream = socket.create_connection(address, timeout=10)
    stream.sendall(b"GET /models/remote_mvc.model/events HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert silent.recv(100) == b""  # the gateway hung up
        assert half.recv(100) == b""
        received = b""
        while received.count(b"\n\n") < 12:  # heartbeats for several header timeouts: still served
            chunk = stream.recv(65536)
            assert chunk, "the event stream was closed"
            received += chunk
    finally:
        for s in (silent, half, stream):
            s.close()
