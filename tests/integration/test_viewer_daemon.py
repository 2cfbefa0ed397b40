"""The viewer daemon's short path for notify calls, and everything else through Pyro5 unchanged."""

import json
import threading

import pytest
from Pyro5.api import Proxy

from remote_mvc import AuthProxy, PermissionDenied, Viewer, auth
from remote_mvc.pyro.daemons import ViewerDaemon

CAPABILITY = "the-subscription-capability"


@auth.declared
class Spy(Viewer):
    """A viewer that remembers what type each notify argument arrived as."""

    def __init__(self) -> None:
        super().__init__("v", "m", record=True, log_values=False)
        self.kinds = []
        self.accept_capability(CAPABILITY)

    @auth.remote(auth.CAPABILITY)
    def notify(self, batch):
        self.kinds.append(type(batch).__name__)
        return super().notify(batch)


@pytest.fixture(params=["thread", "multiplex"])
def served(request):
    from Pyro5 import config

    servertype, config.SERVERTYPE = config.SERVERTYPE, request.param  # read by the constructor
    try:
        daemon = ViewerDaemon(host="127.0.0.1", port=0)
    finally:
        config.SERVERTYPE = servertype
    viewer = Spy()
    uri = daemon.register(viewer, objectId="viewer.v")
    thread = threading.Thread(target=daemon.requestLoop, daemon=True)
    thread.start()
    yield viewer, uri, viewer.kinds
    daemon.shutdown()
    daemon.close()


def batch(*revisions):
    return {"capability": CAPABILITY, "model": "m",
            "events": [{"revision": r, "values": {"value": r}, "time": 0.0} for r in revisions]}


def test_the_servers_call_shape_takes_the_short_path(served):
    viewer, uri, calls = served
    with Proxy(uri) as p:
        p._pyroSerializer = "json"
        assert p.notify(batch(1, 2)) == 0  # the short path answers with a count of failed oneway calls
        assert viewer.received == [1, 2] and calls == ["dict"]


def test_other_calls_are_replayed_to_pyro5(served):
    viewer, uri, calls = served
    with AuthProxy(uri) as p:  # anonymous, serpent: Pyro5's own dispatch
        p.notify(batch(1))
        assert p.metadata()["methods"] == {"notify"}  # the viewer's one remote method: wait_for is local only
        with pytest.raises(AttributeError):
            p.wait_for(1, 1.0)
        with pytest.raises(TypeError):
            p.notify()  # raised remotely, answered by Pyro5
        p._pyroSerializer = "json"
        p.notify(batch(2))  # the same connection goes on in step, on the short path
        with pytest.raises(PermissionDenied):  # not the server's shape (a string): Pyro5's dispatch; notify refuses it
            p.notify(json.dumps(batch(3)))
    assert viewer.received == [1, 2]
    assert calls == ["dict", "dict", "str"]


def test_a_handler_error_reaches_the_caller_with_its_type(served):
    viewer, uri, _ = served
    viewer.on_change = lambda v, e: 1 / 0
    with Proxy(uri) as p:
        p._pyroSerializer = "json"
        with pytest.raises(ZeroDivisionError):
            p.notify(batch(1))
        viewer.on_change = None
        p.notify(batch(2))  # the connection still works


def test_oneway_notifies_run_in_order_and_the_next_answer_counts_their_failures(served):
    viewer, uri, calls = served
    seen = []

    def handler(v, event):
        seen.append(event["revision"])
        if event["revision"] == 2:
            raise RuntimeError("handler bug")

    viewer.on_change = handler
    with Proxy(uri) as p:
        p._pyroSerializer = "json"
        p._pyroBind()
        p._pyroOneway.add("notify")
        for r in range(1, 41):
            p.notify(batch(r))  # not one thread per call (Pyro5's way): in order, on the connection's thread
        p._pyroOneway.discard("notify")
        assert p.notify(batch(41)) == 1  # the failure in a oneway call, reported with the next answer
        assert p.notify(batch(42)) == 0
    assert seen == list(range(1, 43)) and viewer.received == list(range(1, 43))


def test_messages_arriving_together_or_in_pieces_are_each_handled_in_order(served):
    """One read may bring several messages, and a message may come in pieces: each is handled
    once, in order, whether on the short path or replayed to Pyro5."""
    from Pyro5 import protocol
    from Pyro5.serializers import serializers
    from Pyro5.socketutil import SocketConnection

    viewer, uri, calls = served
    json_id = serializers["json"].serializer_id

    def message(seq, method, params, flags=0, kwargs=None):
        body = json.dumps({"object": "viewer.v", "method": method, "params": params, "kwargs": kwargs or {}}).encode()
        return protocol.SendingMessage(protocol.MSG_INVOKE, flags, seq, json_id, body).data

    data = (message(1, "notify", [batch(1)], protocol.FLAGS_ONEWAY) + message(2, "notify", [batch(2)], protocol.FLAGS_ONEWAY)
            + message(3, "notify", [], kwargs={"batch": batch(3)}) + message(4, "notify", [batch(4)]))
    with AuthProxy(uri) as p:
        p._pyroBind()  # connected and past the handshake: from here on, raw messages on its socket
        sock = p.socket
        sock.sendall(data[:3])  # a piece of a header
        sock.sendall(data[3:-10])  # the rest of four messages but the last 10 bytes
        assert viewer.wait_for(2, 5.0)
        sock.sendall(data[-10:])
        conn = SocketConnection(sock, keep_open=True)  # reads whole messages; the proxy closes the socket
        answers = [protocol.recv_stub(conn) for _ in range(2)]
    assert [(a.seq, a.data) for a in answers] == [(3, b"null"), (4, b"0")]  # Pyro5's answer, then the short path's
    assert viewer.received == [1, 2, 3, 4] and calls == ["dict", "dict", "dict", "dict"]
