"""Attacks on the wire, as an anonymous peer on the network would make them, against real daemons.

Each daemon type (model server, name server, viewer host) runs in its own process where a crash
would show: every attack must leave it up, bounded, auditing the refusal, and serving others.
"""

from __future__ import annotations

import marshal
import socket
import ssl
import threading
import zlib

import pytest
import serpent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from Pyro5 import protocol

from remote_mvc import AuthProxy, read_audit
from remote_mvc.auth import Throttle, client_token
from remote_mvc.testing import wait_until

SERPENT, JSON = 1, 3


# raw Pyro5 ------------------------------------------------------------------------------------
def frame(mtype: int, data: bytes, flags: int = 0, serializer: int = SERPENT, seq: int = 0,
          annotations: dict[str, bytes] | None = None) -> bytes:
    raw = bytearray(protocol.SendingMessage(mtype, 0, seq, serializer, data, annotations=annotations).data)
    raw[8:10] = flags.to_bytes(2, "big")  # as sent by a peer, whatever SendingMessage would do with them
    return bytes(raw)


def hello(obj: str, token: object = "hello") -> bytes:
    return frame(protocol.MSG_CONNECT, serpent.dumps({"handshake": token, "object": obj}))


def exchange(address: tuple[str, int], *frames: bytes, timeout: float = 5.0) -> bytes:
    """Send frames, half-close, and return everything the daemon says until it hangs up."""
    with socket.create_connection(address, timeout=timeout) as s:
        try:
            for f in frames:
                s.sendall(f)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


def connected(address: tuple[str, int], obj: str) -> socket.socket:
    """A raw connection that completed an anonymous handshake."""
    s = socket.create_connection(address, timeout=5)
    s.sendall(hello(obj))
    reply = s.recv(65536)
    assert reply[:4] == b"PYRO" and reply[6] == protocol.MSG_CONNECTOK, reply
    return s


def proc_status(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(key)


def address_of_uri(uri) -> tuple[str, int]:
    return uri.host, uri.port


# the daemons under attack, each its own process ----------------------------------------------------
@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """A model server, a viewer host and a name server, as processes."""
    from remote_mvc.testing import Stack

    stack = Stack(tmp_path_factory.mktemp("wire")).start()
    model = stack.process("model")
    model.wait_for_log(lambda r: r.get("event") == "registered", 20)
    viewer = stack.process("viewer", identity="", viewer_id="victim")
    subscribed = viewer.wait_for_log(lambda r: r.get("event") == "subscribed", 20)
    stream_object = subscribed["uri"].split(":", 1)[1].split("@", 1)[0]  # the host's stream for the model
    ns_dir = tmp_path_factory.mktemp("ns2")
    ns = stack.process("nameserver", name="ns2", ns_port=0, identity="", state_dir=str(ns_dir))
    ns_start = ns.wait_for_log(lambda r: r.get("event") == "service_started", 20)
    rm = stack.client("controller")
    rm.modify({"name": "before", "value": 1})
    model_uri = stack.model_uri()
    viewer_loc = viewer.wait_for_log(lambda r: r.get("event") == "service_started", 5)["location"]
    vhost, vport = viewer_loc.rsplit(":", 1)
    nhost, nport = ns_start["location"].rsplit(":", 1)
    daemons = {
        "model": (model, address_of_uri(model_uri), "remote_mvc.model"),
        "viewer": (viewer, (vhost, int(vport)), stream_object),
        "nameserver": (ns, (nhost, int(nport)), "Pyro.NameServer", ns_dir / "ns2-audit.jsonl"),
    }
    try:
        yield stack, rm, daemons
    finally:
        for p in (viewer, model, ns):
            p.stop()
        stack.close()


def still_serving(stack, rm, daemons) -> None:
    """Every daemon is alive, the model serves, and a change still reaches the viewer."""
    for name, (proc, *_) in daemons.items():
        assert proc.proc.poll() is None, f"{name} died"
    viewer = daemons["viewer"][0]
    mark = len(viewer.lines)
    rev = rm.modify({"value": rm.query()["value"] + 1})
    viewer.wait_for_log(lambda r: r.get("event") == "refresh" and r.get("revision") == rev, 10, start=mark)
    ns = AuthProxy("PYRO:Pyro.NameServer@{}:{}".format(*daemons["nameserver"][1]), timeout=5)
    try:
        assert "Pyro.NameServer" in ns.list(prefix="Pyro.")
    finally:
        ns._pyroRelease()


DAEMONS = ["model", "viewer", "nameserver"]


def blob_call(obj: str) -> bytes:
    """Finding 1: a keep-serialized call whose BLBI annotation Pyro5 hands to marshal.loads."""
    blbi = marshal.dumps(("x", obj, "query"))
    return frame(protocol.MSG_INVOKE, b"\x00" * 16, flags=protocol.FLAGS_KEEPSERIALIZED, annotations={"BLBI": blbi})


@pytest.mark.parametrize("daemon", DAEMONS)
def test_keep_serialized_blobs_never_reach_marshal(targets, daemon):
    stack, rm, daemons = targets
    proc, address, obj, *_ = daemons[daemon]
    mark = len(proc.lines)
    exchange(address, blob_call(obj))  # instead of a handshake
    exchange(address, hello(obj), blob_call(obj))  # after an anonymous handshake
    refused = proc.wait_for_log(lambda r: r.get("event") == "connection_refused"
                                and "keep-serialized" in r.get("message", ""), 10, start=mark)
    assert refused["client"].startswith("127.0.0.1:")
    still_serving(stack, rm, daemons)


@pytest.mark.parametrize("daemon", DAEMONS)
def test_nothing_large_or_compressed_is_parsed_before_authentication(targets, daemon):
    """Finding 2: a 1 KB zlib handshake inflating to 16 MB; and a plain 8 MB handshake."""
    stack, rm, daemons = targets
    proc, address, obj, *_ = daemons[daemon]
    hwm = proc_status(proc.pid, "VmHWM")
    mark = len(proc.lines)
    bomb = zlib.compress(serpent.dumps({"handshake": "x" * (16 * 1024 * 1024), "object": obj}), 9)
    assert len(bomb) < 64 * 1024
    exchange(address, frame(protocol.MSG_CONNECT, bomb, flags=protocol.FLAGS_COMPRESSED))
    big = serpent.dumps({"handshake": ["x"] * (1024 * 1024), "object": obj})
    reply = exchange(address, frame(protocol.MSG_CONNECT, big))
    assert b"at most 4096" in reply  # refused on the header: nothing of it was read
    proc.wait_for_log(lambda r: r.get("event") == "connection_refused" and "compressed" in r.get("message", ""),
                      10, start=mark)
    assert proc_status(proc.pid, "VmHWM") - hwm < 16 * 1024, "a refused handshake must not be inflated or parsed"
    still_serving(stack, rm, daemons)


@pytest.mark.parametrize("daemon", DAEMONS)
def test_marshal_batch_and_oneway_forms_are_refused(targets, daemon):
    stack, rm, daemons = targets
    proc, address, obj, *_ = daemons[daemon]
    call = serpent.dumps((obj, "whoami", [], {}))
    mark = len(proc.lines)
    exchange(address, frame(protocol.MSG_CONNECT, marshal.dumps({"handshake": "hello", "object": obj}),
                            serializer=2))
    exchange(address, hello(obj), frame(protocol.MSG_INVOKE, call, flags=protocol.FLAGS_BATCH))
    exchange(address, hello(obj), frame(protocol.MSG_INVOKE, call, flags=protocol.FLAGS_ONEWAY))
    for needle in ("serializer 2", "batch", "oneway" if daemon != "viewer" else "only notify"):
        proc.wait_for_log(lambda r, n=needle: r.get("event") == "connection_refused" and n in r.get("message", ""),
                          10, start=mark)
    still_serving(stack, rm, daemons)


def test_a_flood_of_oneway_calls_never_spawns_threads_in_a_viewer(targets):
    """Finding 10: 300 oneway calls on one connection were 300 threads in a viewer host."""
    stack, rm, daemons = targets
    proc, address, obj, *_ = daemons["viewer"]
    threads = proc_status(proc.pid, "Threads")
    call = frame(protocol.MSG_INVOKE, serpent.dumps((obj, "wait_for", [10**9, 60], {})), flags=protocol.FLAGS_ONEWAY)
    exchange(address, hello(obj), *([call] * 300))
    assert proc_status(proc.pid, "Threads") <= threads + 2
    still_serving(stack, rm, daemons)


def test_a_token_seen_at_one_service_is_refused_at_another(targets):
    """Finding 8: a handshake token observed at the model server, replayed to the name server."""
    stack, rm, daemons = targets
    _, ns_address, _, *_ = daemons["nameserver"]
    token = client_token("service", stack.service_secret, "remote_mvc.model")
    reply = exchange(ns_address, hello("Pyro.NameServer", token))
    assert reply[6] == protocol.MSG_CONNECTFAIL and b"invalid credentials" in reply
    proc, model_address, _, *_ = daemons["model"]
    assert exchange(model_address, hello("remote_mvc.model", token))[6] == protocol.MSG_CONNECTOK  # where it was
    audit = read_audit(daemons["nameserver"][3])  # meant for: once
    assert any(r["action"] == "connect" and r["result"] == "refused" and r["identity"] == "service" for r in audit)


@pytest.mark.parametrize("daemon", ["model", "nameserver"])
def test_the_daemon_object_answers_only_what_proxies_need(targets, daemon):
    stack, rm, daemons = targets
    _, address, obj, *_ = daemons[daemon]
    for method in ("registered", "info", "get_next_stream_item"):
        reply = exchange(address, hello(obj), frame(protocol.MSG_INVOKE, serpent.dumps(("Pyro.Daemon", method, [], {}))))
        assert b"remote_mvc.model" not in reply and b"objects registered" not in reply
        assert b"AttributeError" in reply or b"not exposed" in reply or b"has no" in reply, reply[:300]


# in-process daemons, where their bounds are settings --------------------------------------------
def test_connections_per_address_are_capped(mvc_stack):
    service = mvc_stack.model(max_connections_per_address=4)
    address = address_of_uri(service.uri("remote_mvc.model"))
    held = [connected(address, "remote_mvc.model") for _ in range(4)]
    try:
        assert service.daemon.connections_from("127.0.0.1") == 4
        assert exchange(address, hello("remote_mvc.model")) == b""  # the fifth is closed unanswered
        held.pop().close()
        wait_until(lambda: service.daemon.connections_from("127.0.0.1") == 3, 5)
        held.append(connected(address, "remote_mvc.model"))  # room again
    finally:
        for s in held:
            s.close()
    assert service.metrics.registry.get_sample_value("remote_mvc_wire_refused_total",
                                                     {"stage": "connections"}) >= 1


def test_anonymous_connections_idle_out_sooner_than_identities(mvc_stack):
    service = mvc_stack.model(anonymous_idle_timeout=0.5, idle_timeout=300)
    address = address_of_uri(service.uri("remote_mvc.model"))
    controller = mvc_stack.client("controller")
    controller.query()
    before = controller.proxy().socket
    anonymous = connected(address, "remote_mvc.model")
    anonymous.settimeout(10)
    assert anonymous.recv(1) == b""  # the server hung up on the idle anonymous connection
    anonymous.close()
    controller.query()
    assert controller.proxy().socket is before  # the identity's idle connection was kept


def test_the_tarpit_lets_go_of_a_peer_that_left(mvc_stack):
    """Finding 10: a refused handshake held its worker for the whole delay after the peer closed."""
    service = mvc_stack.model()
    service.daemon.authenticator.throttle = Throttle(free=0, max_delay=30.0)
    address = address_of_uri(service.uri("remote_mvc.model"))
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(hello("remote_mvc.model", client_token("controller", "wrong", "remote_mvc.model")))
        wait_until(lambda: service.daemon.connections_from("127.0.0.1") == 1, 5)
    # the peer is gone: its worker is back within moments, not 30 s
    wait_until(lambda: service.daemon.connections_from("127.0.0.1") == 0, 5)


@pytest.fixture
def tls_stack(tmp_path):
    import subprocess
    from pathlib import Path

    from remote_mvc import Settings, setup
    from remote_mvc.testing import Stack

    repo = Path(__file__).resolve().parents[2]
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(repo / "ops" / "tls" / "make-certs.sh"), str(certs)], check=True, capture_output=True)
    tls = {"tls_ca": str(certs / "ca.crt"), "tls_cert": str(certs / "model.crt"), "tls_key": str(certs / "model.key")}
    stack = Stack(tmp_path / "state", handshake_timeout=1.0, **tls).start()
    try:
        yield stack
    finally:
        stack.close()
        setup(Settings())


def test_silent_tcp_connections_do_not_stall_a_tls_daemon(tls_stack):
    service = tls_stack.model()
    address = address_of_uri(service.uri("remote_mvc.model"))
    silent = [socket.create_connection(address, timeout=10) for _ in range(3)]
    try:
        client = tls_stack.client("controller", retry_seconds=0)
        assert client.modify({"value": 5}) == 1  # connects and calls while the silent ones are open
        assert isinstance(client.proxy().socket, ssl.SSLSocket)
        for s in silent:  # each is closed after the handshake timeout, and audited
            assert s.recv(1) == b""
    finally:
        for s in silent:
            s.close()
    audit = read_audit(service.settings.audit_file())
    assert sum(1 for r in audit if r["action"] == "connect" and r.get("stage") == "tls") >= 3


def test_a_viewer_answering_with_a_huge_header_is_dropped_not_buffered(mvc_stack):
    """Finding 7: a fake viewer announced a 4 GiB answer and the fan-out buffered hundreds of MB."""
    service = mvc_stack.model()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    pushed = [0]

    def fake_viewer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            conn.recv(65536)  # the server's handshake
            meta = {"methods": ["notify"], "oneway": [], "attrs": []}
            conn.sendall(frame(protocol.MSG_CONNECTOK, serpent.dumps({"handshake": "hello", "meta": meta})))
            conn.recv(65536)  # its first notify
            raw = bytearray(frame(protocol.MSG_RESULT, b"", serializer=JSON, seq=1))
            raw[12:16] = (2**32 - 64).to_bytes(4, "big")
            try:
                conn.sendall(bytes(raw))
                while pushed[0] < 1024 * 1024 * 1024:  # then keep sending, as if the 4 GiB were coming
                    conn.sendall(b"\x00" * 65536)
                    pushed[0] += 65536
            except OSError:
                pass  # the server hung up

    thread = threading.Thread(target=fake_viewer, daemon=True)
    thread.start()
    anonymous = mvc_stack.client(None)
    anonymous.subscribe(f"PYRO:viewer.fake@127.0.0.1:{port}", "fake")
    dropped = service.metrics.registry.get_sample_value
    labels = {"model": "remote_mvc.model", "reason": "unreachable"}
    wait_until(lambda: dropped("remote_mvc_viewers_dropped_total", labels), 10, message="the fake viewer dropped")
    thread.join(10)
    assert not thread.is_alive()
    # dropped on the header (not after a call timeout's worth of buffering): what it pushed is what the
    # sockets' buffers took before the server hung up
    assert pushed[0] < 32 * 1024 * 1024
    assert not dropped("remote_mvc_viewers_dropped_total", {**labels, "reason": "timeout"})
    assert service.server.subscriber_count == 0
    listener.close()


# the wire fuzzer ---------------------------------------------------------------------------------
_FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck),
                 derandomize=False, database=None)


@st.composite
def frames(draw, obj: str) -> bytes:
    """A Pyro5 frame as a hostile peer might send it: any type, serializer, flags, annotations and
    body (serpent or marshal calls, compressed or not, garbage), with sizes that may lie."""
    mtype = draw(st.one_of(st.sampled_from([1, 4, 5, 6]), st.integers(0, 255)))
    serializer = draw(st.integers(0, 5))
    flags = draw(st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 36, 98]), st.integers(0, 0xFFFF)))
    call = (obj, draw(st.sampled_from(["query", "notify", "modify", "wait_for", "list", "register", "close",
                                       "__getattr__", "_pyroDaemon", "get_metadata"])),
            draw(st.lists(st.one_of(st.integers(), st.text(max_size=20), st.none()), max_size=3)), {})
    body = draw(st.one_of(
        st.just(serpent.dumps(call)), st.just(marshal.dumps(call)), st.binary(max_size=300),
        st.just(zlib.compress(serpent.dumps({"handshake": "x" * 100000, "object": obj}))),
        st.just(serpent.dumps({"handshake": "hello", "object": obj}))))
    annotations = draw(st.one_of(st.none(), st.dictionaries(st.text("BLCOR", min_size=4, max_size=4),
                                                            st.binary(max_size=64), max_size=2)))
    raw = bytearray(frame(mtype, body, flags, serializer % 256, draw(st.integers(0, 0xFFFF)), annotations))
    if draw(st.booleans()):  # lie about the sizes
        raw[12:16] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
        raw[16:20] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
    return bytes(raw[:draw(st.integers(1, len(raw)))] if draw(st.integers(0, 9)) == 0 else raw)


@pytest.mark.parametrize("daemon", DAEMONS)
def test_wire_fuzz_leaves_each_daemon_up_bounded_and_serving(targets, daemon):
    stack, rm, daemons = targets
    proc, address, obj, *_ = daemons[daemon]
    threads, hwm = proc_status(proc.pid, "Threads"), proc_status(proc.pid, "VmHWM")

    @_FUZZ
    @given(st.booleans(), st.lists(frames(obj), min_size=1, max_size=3))
    def attack(handshake_first, sent):
        exchange(address, *([hello(obj)] if handshake_first else []), *sent, timeout=3)
        assert proc.proc.poll() is None, f"{daemon} died"

    attack()
    wait_until(lambda: proc_status(proc.pid, "Threads") <= threads + 8, 15, message="workers to be released")
    assert proc_status(proc.pid, "VmHWM") - hwm < 64 * 1024, "peak memory grew by more than 64 MiB"
    still_serving(stack, rm, daemons)
