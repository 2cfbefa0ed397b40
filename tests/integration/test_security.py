"""Hostile clients: name-server hijack, unsafe serializers, zip bombs, garbage, silence, private access."""

import socket
import zlib

import pytest
import serpent
from Pyro5 import protocol
from Pyro5.errors import CommunicationError, PyroError, SecurityError

from remote_mvc import AuthProxy, PermissionDenied, read_audit
from remote_mvc.pyro.naming import locate_ns
from remote_mvc.testing import wait_until


def model_address(stack):
    uri = stack.model_uri()
    return uri.host, uri.port


def read_until_closed(sock) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def vm_hwm_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def raw_call(host, port, payload: bytes, flags: int = 0, serializer_id: int = 1, handshake=True) -> bytes:
    """Speak Pyro5's wire protocol directly: handshake, then one crafted invoke message."""
    sock = socket.create_connection((host, port), timeout=10)
    try:
        if handshake:
            data = serpent.dumps({"handshake": "hello", "object": "remote_mvc.model"})
            sock.sendall(protocol.SendingMessage(protocol.MSG_CONNECT, 0, 0, 1, data).data)
            reply = protocol.recv_stub(_Conn(sock))
            assert reply.type == protocol.MSG_CONNECTOK
        msg = protocol.SendingMessage(protocol.MSG_INVOKE, 0, 1, serializer_id, payload)
        raw = bytearray(msg.data)
        if flags:  # set the flags in the header after the fact (payload already prepared)
            raw[8:10] = (int.from_bytes(raw[8:10], "big") | flags).to_bytes(2, "big")
        sock.sendall(bytes(raw))
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if sum(map(len, chunks)) >= 24:
                try:
                    return protocol.recv_stub(_Replay(b"".join(chunks), sock)).data
                except Exception:
                    continue
        return b"".join(chunks)
    finally:
        sock.close()


class _Conn:
    def __init__(self, sock):
        self.sock = sock

    def recv(self, size):
        buf = b""
        while len(buf) < size:
            chunk = self.sock.recv(size - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf


class _Replay(_Conn):
    def __init__(self, data, sock):
        super().__init__(sock)
        self.data = data

    def recv(self, size):
        if len(self.data) >= size:
            out, self.data = self.data[:size], self.data[size:]
            return out
        out = self.data + super().recv(size - len(self.data))
        self.data = b""
        return out


@pytest.fixture
def guarded(mvc_stack):
    server = mvc_stack.process("model")
    server.wait_for_log(lambda r: r.get("event") == "registered", 15)
    rm = mvc_stack.client("controller")
    rm.modify({"name": "safe", "value": 1})
    return mvc_stack, server, rm


def still_serving(rm, revision=1):
    snap = rm.snapshot()
    assert snap["revision"] == revision and snap["values"] == {"name": "safe", "value": 1}


def test_name_server_hijack_is_refused(mvc_stack):
    model = mvc_stack.model()
    real = str(model.uri("remote_mvc.model"))
    rogue = "PYRO:rogue@127.0.0.1:1"
    s = mvc_stack.settings
    anonymous = locate_ns(s)
    controller = locate_ns(s, identity="controller", secret=mvc_stack.controller_secret)
    for ns in (anonymous, controller):
        with pytest.raises(PermissionDenied):
            ns.register("remote_mvc.model", rogue, safe=False)
        with pytest.raises(PermissionDenied):
            ns.remove("remote_mvc.model")
        with pytest.raises(PermissionDenied):
            ns.remove(prefix="remote_mvc")
        with pytest.raises(PermissionDenied):
            ns.set_metadata("remote_mvc.model", {"evil"})
        assert str(ns.lookup("remote_mvc.model")) == real  # lookups stay open
    service = locate_ns(s, identity="service", secret=mvc_stack.service_secret)
    service.register("example.extra", rogue)
    assert str(anonymous.lookup("example.extra")) == rogue
    assert service.remove("example.extra") == 1
    forged = locate_ns(s, identity="service", secret="guess")
    with pytest.raises(Exception, match="invalid credentials"):
        forged.register("remote_mvc.model", rogue)
    assert str(anonymous.lookup("remote_mvc.model")) == real
    for ns in (anonymous, controller, service, forged):
        ns._pyroRelease()
    audit = read_audit(mvc_stack.nameserver.settings.audit_file())
    refused = [r for r in audit if r["result"] == "forbidden"]
    assert len(refused) == 8 and {r["identity"] for r in refused} == {"anonymous", "controller"}
    assert [r["action"] for r in audit if r["result"] == "accepted" and r["identity"] == "service"][-2:] == \
        ["ns_register", "ns_remove"]
    assert any(r["action"] == "connect" and r["result"] == "refused" for r in audit)


def test_marshal_serializer_is_refused(guarded):
    stack, server, rm = guarded
    proxy = AuthProxy(stack.model_uri(), "controller", stack.controller_secret)
    proxy._pyroSerializer = "marshal"
    with pytest.raises((SecurityError, CommunicationError, PyroError), match="not accepted|marshal"):
        proxy.modify({"value": 666})
    proxy._pyroRelease()
    still_serving(rm)


def test_zip_bomb_is_refused_without_a_memory_blow_up(guarded):
    stack, server, rm = guarded
    host, port = model_address(stack)
    before = vm_hwm_kib(server.pid)
    bomb = zlib.compress(b"(" + b" " * (200 * 1024 * 1024) + b")", 9)  # ~200 KB inflating to 200 MB
    assert len(bomb) < 1024 * 1024
    raw_call(host, port, bomb, flags=protocol.FLAGS_COMPRESSED)
    still_serving(rm)
    assert vm_hwm_kib(server.pid) - before < 64 * 1024, "inflation must stop at the message bound"
    assert server.proc.poll() is None


@pytest.mark.parametrize("payload", [
    b"(" * 100000 + b")" * 100000,                                # deep nesting
    b"garbage that is not serpent at all \x00\xff",              # undecodable
    serpent.dumps(("remote_mvc.model", "modify", [{"value": "x" * 1000}], {})),  # wrong type
    serpent.dumps(("remote_mvc.model", "nonexistent", [], {})),  # unknown method
    serpent.dumps(("remote_mvc.model", "_apply", [{"value": 9}, "x", None, None], {})),  # private
    serpent.dumps(("remote_mvc.model", "__class__", [], {})),    # dunder
    serpent.dumps(("remote_mvc.model", "_store", [], {})),
])
def test_hostile_invocations_change_nothing(guarded, payload):
    stack, server, rm = guarded
    host, port = model_address(stack)
    raw_call(host, port, payload)
    still_serving(rm)
    assert server.proc.poll() is None


def test_huge_string_is_refused(guarded):
    stack, server, rm = guarded
    from remote_mvc import ValidationError
    with pytest.raises(ValidationError, match="longer than 200"):
        rm.modify({"name": "x" * (512 * 1024)})
    for size in (2, 4):  # past MVC_MAX_REQUEST_BYTES (1 MiB): refused on its header, never read
        with pytest.raises((CommunicationError, PyroError), match="at most"):
            rm.call("modify", {"name": "x" * (size * 1024 * 1024)}, retry=False)
    still_serving(rm)


def test_garbage_bytes_and_silent_connections_do_not_stall_others(guarded):
    stack, server, rm = guarded
    host, port = model_address(stack)
    garbage = socket.create_connection((host, port), timeout=5)
    garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
    silent = [socket.create_connection((host, port), timeout=5) for _ in range(50)]
    try:
        assert b"not a Pyro5 message" in read_until_closed(garbage)  # an error reply, then the server hangs up
        for _ in range(20):
            still_serving(rm)
    finally:
        garbage.close()
        for s in silent:
            s.close()


def test_silent_connection_is_closed_after_the_handshake_timeout(mvc_stack):
    server = mvc_stack.process("model", handshake_timeout=0.5)
    server.wait_for_log(lambda r: r.get("event") == "registered", 15)
    host, port = model_address(mvc_stack)
    silent = socket.create_connection((host, port), timeout=10)
    try:
        assert b"timeout" in read_until_closed(silent)  # the server gave up on it
    finally:
        silent.close()


def test_repeated_bad_credentials_are_slowed_counted_and_audited(mvc_stack):
    model = mvc_stack.model()
    for _ in range(8):
        with pytest.raises(Exception, match="invalid credentials"):
            mvc_stack.client("controller", secret="guess", retry_seconds=0).query()
    m = model.metrics.registry
    assert m.get_sample_value("remote_mvc_auth_failures_total", {"reason": "invalid"}) == 8
    assert m.get_sample_value("remote_mvc_auth_throttled_total") >= 2
    refused = [r for r in read_audit(model.settings.audit_file()) if r["action"] == "connect"]
    assert len(refused) == 8 and all(r["result"] == "refused" for r in refused)
    wait_until(lambda: mvc_stack.client("controller").query())  # the right secret still works
