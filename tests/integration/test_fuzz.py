"""Property-based and wire-level fuzzing, each bounded: the server stays up, serves others,
and its state and audit log stay consistent."""

import random
import socket
import time

import pytest
import serpent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from Pyro5 import protocol
from Pyro5.errors import PyroError

from remote_mvc import AuthenticationError, ExampleModel, MVCError, ValidationError, read_audit
from remote_mvc.auth import Authenticator, Credentials, client_token

FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=300),
                    st.binary(max_size=50))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=12)
field_names = st.one_of(st.sampled_from(["name", "value"]), st.text(max_size=20))
payloads = st.one_of(st.dictionaries(field_names, values, max_size=4), values)


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory):
    from remote_mvc.testing import Stack

    stack = Stack(tmp_path_factory.mktemp("fuzz")).start()
    service = stack.model()
    try:
        yield stack, service
    finally:
        stack.close()


def test_modify_accepts_exactly_the_valid_payloads(fuzz_stack):
    stack, service = fuzz_stack
    rm = stack.client("controller")
    attempts = {"n": 0}

    @FAST
    @given(payloads)
    def check(payload):
        before = rm.snapshot()
        attempts["n"] += 1
        try:
            expected = ExampleModel.validate(before["values"], payload)
        except ValidationError:
            expected = None
        except Exception as exc:  # the schema itself must never crash on odd input
            raise AssertionError(f"schema crashed on {payload!r}: {exc!r}") from exc
        try:
            revision = rm.modify(payload)
        except (MVCError, PyroError, TypeError, ValueError):
            assert expected is None, f"valid payload {payload!r} refused"
            assert rm.snapshot() == {**before, "time": rm.snapshot()["time"]} or \
                rm.snapshot()["revision"] == before["revision"]
            return
        assert expected is not None, f"invalid payload {payload!r} accepted"
        assert revision == before["revision"] + 1
        assert rm.query() == {**before["values"], **expected}

    check()
    audit = read_audit(service.settings.audit_file())
    accepted = [r for r in audit if r["result"] == "accepted"]
    assert len(accepted) == service.server.revision  # one accepted record per revision
    assert [r["revision"] for r in accepted] == list(range(1, service.server.revision + 1))
    modify_records = [r for r in audit if r["action"] == "modify"]
    # payloads that failed to serialize on the client never reached the server; all others did, once
    assert len(modify_records) <= attempts["n"]


handshakes = st.one_of(
    values,
    st.fixed_dictionaries({"identity": st.one_of(st.sampled_from(["controller", "admin", "service"]), st.text()),
                           "ts": st.one_of(st.floats(allow_nan=True), st.integers(), st.text()),
                           "nonce": st.one_of(st.text(), st.integers()),
                           "mac": st.one_of(st.text(), st.binary())}),
)


@FAST
@given(handshakes)
def test_no_forged_handshake_authenticates(token):
    creds = Credentials.parse("controller:controller:s3cret,admin:admin:t0p")
    auth = Authenticator(creds, clock=lambda: 1000.0)
    try:
        identity, role = auth.authenticate(token, target="remote_mvc.model")
    except AuthenticationError:
        return
    assert (identity, role) == ("anonymous", "viewer")


def test_only_a_real_token_authenticates_and_only_once():
    creds = Credentials.parse("controller:controller:s3cret")
    auth = Authenticator(creds, clock=lambda: 1000.0)
    token = client_token("controller", "s3cret", "remote_mvc.model", clock=lambda: 1000.0)
    rnd = random.Random(7)
    for _ in range(200):  # any single-character change to the MAC or nonce is refused
        forged = dict(token)
        key = rnd.choice(["mac", "nonce"])
        i = rnd.randrange(len(forged[key]))
        forged[key] = forged[key][:i] + rnd.choice("0123456789abcdef".replace(forged[key][i], "")) + \
            forged[key][i + 1:]
        with pytest.raises(AuthenticationError):
            auth.authenticate(forged, target="remote_mvc.model")
    assert auth.authenticate(token, target="remote_mvc.model") == ("controller", "controller")
    with pytest.raises(AuthenticationError, match="replayed"):
        auth.authenticate(token, target="remote_mvc.model")


def test_wire_fuzz_keeps_the_server_up_and_consistent(fuzz_stack):
    stack, service = fuzz_stack
    rm = stack.client("controller")
    start_revision = rm.snapshot()["revision"]
    uri = stack.model_uri()
    hello = protocol.SendingMessage(protocol.MSG_CONNECT, 0, 0, 1,
                                    serpent.dumps({"handshake": "hello", "object": uri.object})).data
    call = protocol.SendingMessage(protocol.MSG_INVOKE, 0, 1, 1,
                                   serpent.dumps((uri.object, "modify", [{"value": 13}], {}))).data
    rnd = random.Random(2026)
    deadline = time.monotonic() + 10
    sent = 0
    while time.monotonic() < deadline and sent < 400:
        kind = rnd.randrange(4)
        if kind == 0:
            data = rnd.randbytes(rnd.randrange(1, 200))
        elif kind == 1:
            data = bytearray(hello)
            for _ in range(rnd.randrange(1, 4)):
                data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        else:
            data = bytearray(call)
            for _ in range(rnd.randrange(0, 4)):
                data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
            data = hello + bytes(data) if kind == 2 else bytes(data)
        with socket.create_connection((uri.host, uri.port), timeout=2) as s:
            try:
                s.sendall(bytes(data))
                s.shutdown(socket.SHUT_WR)
                while s.recv(4096):
                    pass
            except OSError:
                pass
        sent += 1
        if sent % 50 == 0:
            assert rm.snapshot()["revision"] == start_revision  # still serving, nothing changed
    assert sent >= 50
    assert rm.snapshot()["revision"] == start_revision
    rev = rm.modify({"value": 7})
    assert rev == start_revision + 1 and rm.query()["value"] == 7
    audit = read_audit(service.settings.audit_file())
    assert all(r["result"] != "accepted" or r["identity"] == "controller" for r in audit)
