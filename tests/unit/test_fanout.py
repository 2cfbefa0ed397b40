"""Per-viewer queues: order, batching, snapshot past the bound, leases (with a fake clock)."""

from remote_mvc import Metrics
from remote_mvc._fanout import Fanout


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def ev(r):
    return {"revision": r, "values": {"value": r}, "time": 0.0}


def make(**kw):
    state = {"revision": 0}
    clock = Clock()
    f = Fanout("m", lambda: {"revision": state["revision"], "values": {}}, Metrics(), clock=clock, **kw)
    return f, clock, state


def test_events_are_batched_in_order_up_to_batch_max():
    f, _, _ = make(batch_max=3)
    sub = f.add("v", "PYRO:x@127.0.0.1:1", backlog=[], start=False)
    for r in range(1, 6):
        f.publish(ev(r))
    assert [e["revision"] for e in sub._next_batch()["events"]] == [1, 2, 3]
    assert [e["revision"] for e in sub._next_batch()["events"]] == [4, 5]


def test_backlog_first_then_live_events():
    f, _, _ = make()
    sub = f.add("v", "u", backlog=[ev(1), ev(2)], start=False)
    f.publish(ev(3))
    assert [e["revision"] for e in sub._next_batch()["events"]] == [1, 2, 3]


def test_one_shared_log_read_by_every_sender_from_its_own_cursor():
    f, _, _ = make(batch_max=4, queue_limit=10)
    early = f.add("early", "u", backlog=[], start=False)
    f.publish(ev(1))
    f.publish(ev(2))
    assert f._log[-1]["revision"] == 2 and early.queued == 2
    late = f.add("late", "u", backlog=[ev(1), ev(2)], start=False)  # resubscribed from revision 0
    for r in range(3, 6):
        f.publish(ev(r))
    assert [e["revision"] for e in early._next_batch()["events"]] == [1, 2, 3, 4]
    assert [e["revision"] for e in late._next_batch()["events"]] == [1, 2, 3, 4]  # backlog, then live
    assert [e["revision"] for e in late._next_batch()["events"]] == [5]
    assert late._next_batch() is None and not late.has_work() and early.has_work()
    assert [e["revision"] for e in early._next_batch()["events"]] == [5]
    for r in range(6, 30):
        f.publish(ev(r))
    assert len(f._log) == 14  # queue_limit + batch_max events kept, whatever the number of viewers
    assert f.events_after(5) is None  # no longer kept: the reader takes a snapshot


def test_past_the_bound_a_snapshot_replaces_the_queue():
    f, _, state = make(queue_limit=4)
    sub = f.add("v", "u", backlog=[], start=False)
    for r in range(1, 9):
        f.publish(ev(r))
        state["revision"] = r
    assert sub.queued == 8  # more than queue_limit behind: the next call is a snapshot
    batch = sub._next_batch()
    assert batch == {"snapshot": {"revision": 8, "values": {}}, "reason": "behind"}
    f.publish(ev(9))
    assert [e["revision"] for e in sub._next_batch()["events"]] == [9]


def test_snapshot_skips_events_it_already_covers():
    f, _, state = make()
    sub = f.add("v", "u", backlog=None, start=False)  # new viewer: snapshot first
    f.publish(ev(1))
    state["revision"] = 1
    batch = sub._next_batch()
    assert batch["snapshot"]["revision"] == 1 and batch["reason"] == "subscribe"
    f.publish(ev(2))
    assert [e["revision"] for e in sub._next_batch()["events"]] == [2]


def test_leases_expire_unless_renewed_and_the_gauge_follows():
    f, clock, _ = make(lease_seconds=10)
    a = f.add("a", "u", [], start=False)
    b = f.add("b", "u", [], start=False)
    gauge = lambda: f.metrics.registry.get_sample_value("remote_mvc_viewers_connected", {"model": "m"})  # noqa: E731
    assert gauge() == 2
    clock.now = 8
    assert f.renew([a.id, "ghost/1"]) == ["ghost/1"]
    clock.now = 11
    assert f.expire() == 1
    assert [d["viewer_id"] for d in f.describe()] == ["a"]
    assert gauge() == 1
    assert f.metrics.registry.get_sample_value(
        "remote_mvc_viewers_dropped_total", {"model": "m", "reason": "lease_expired"}) == 1
    assert f.renew([b.id]) == [b.id]


def test_resubscribing_viewer_replaces_its_old_subscription():
    f, _, _ = make()
    old = f.add("v", "u1", [], start=False)
    new = f.add("v", "u2", [], start=False)
    assert len(f) == 1 and f.renew([old.id]) == [old.id] and f.renew([new.id]) == []
    assert f.remove(new.id) and not f.remove(new.id) and len(f) == 0


def test_calls_are_valid_pyro5_json_messages_with_each_event_encoded_once():

    from Pyro5 import protocol
    from Pyro5.serializers import serializers

    f, _, state = make(batch_max=10)
    sub = f.add("v", "u", backlog=[], start=False)
    sub.set_object("viewer.v")
    events = [{"revision": r, "values": {"name": 'q"u\\o\u2028te', "value": r}, "time": 1.5} for r in (1, 2, 3)]
    for e in events:
        f.publish(e)
    data, revision, count = sub._encode(sub._next_batch())
    assert (revision, count) == (3, 3)
    header = protocol.ReceivingMessage(data[:protocol._header_size])
    assert header.type == protocol.MSG_INVOKE and header.serializer_id == serializers["json"].serializer_id
    assert data == protocol.SendingMessage(protocol.MSG_INVOKE, 0, header.seq, header.serializer_id,
                                           data[protocol._header_size:]).data  # byte for byte what Pyro5 makes
    obj, method, vargs, kwargs = serializers["json"].loadsCall(data[protocol._header_size:])
    assert (obj, method, kwargs) == ("viewer.v", "notify", {})
    assert vargs == [{"capability": sub.capability, "model": "m", "events": events}]  # every call carries it
    assert set(f._encoded) == {1, 2, 3}  # encoded once, shared by every subscriber's calls
    state["revision"] = 3
    sub.offer_snapshot("behind")
    data, revision, count = sub._encode(sub._next_batch())
    _, _, vargs, _ = serializers["json"].loadsCall(data[protocol._header_size:])
    assert vargs[0]["snapshot"]["revision"] == 3 and vargs[0]["reason"] == "behind" and count == 1
    assert vargs[0]["capability"] == sub.capability
    other = f.add("w", "u", backlog=[], start=False)
    assert other.capability != sub.capability and len(sub.capability) >= 32  # one secret per subscription


def test_a_batch_is_encoded_once_for_every_viewer_in_step():
    import json

    f, _, _ = make()
    batch = [ev(1), ev(2)]
    text = f.encoded_batch(batch)
    assert f.encoded_batch([ev(1), ev(2)]) is text  # the next viewer's call reuses it
    assert json.loads(text) == {"model": "m", "events": batch}
    assert json.loads(f.encoded_batch([ev(2)])) == {"model": "m", "events": [ev(2)]}


def _calls(peer):
    """The Pyro5 messages sent so far: (oneway?, events) each."""
    import json

    from Pyro5 import protocol

    data, out = b"", []
    try:
        while chunk := peer.recv(65536):
            data += chunk
    except BlockingIOError:
        pass
    while data:
        msg = protocol.ReceivingMessage(data[:protocol._header_size])
        size = protocol._header_size + msg.annotations_size + msg.data_size
        call = json.loads(data[protocol._header_size + msg.annotations_size:size])
        out.append((bool(msg.flags & protocol.FLAGS_ONEWAY), [e["revision"] for e in call["params"][0]["events"]]))
        data = data[size:]
    return out


def _answer(peer, seq, body=b"0"):
    from Pyro5 import protocol

    peer.send(protocol.SendingMessage(protocol.MSG_RESULT, 0, seq, 2, body).data)


def test_an_ordered_oneway_viewer_answers_one_call_per_window_and_that_acknowledges_the_rest():
    import socket

    import remote_mvc._fanout as fo

    f, _, _ = make()
    sub = f.add("v", "u", backlog=[], start=False, oneway=True)
    assert sub._window == fo.ONEWAY_WINDOW
    sub._window = 4  # the sequence below is written for a window of 4 calls
    sub.set_object("viewer.v")
    sub.sock, peer = socket.socketpair()
    sub.sock.setblocking(False)
    peer.setblocking(False)
    now = 100.0
    f.publish(ev(1))
    sub._fill(now)
    sub._flush()
    assert _calls(peer) == [(False, [1])]  # the first answer asked for at once (none for ACK_INTERVAL)
    for r in (2, 3):
        f.publish(ev(r))
        sub._fill(now + 0.01)
    sub._flush()
    assert _calls(peer) == [(True, [2]), (True, [3])]  # an answer is awaited: these go oneway
    assert len(sub._in_flight) == 3
    for r in (4, 5):
        f.publish(ev(r))
        sub._fill(now + 0.02)
    sub._flush()
    assert _calls(peer) == [(True, [4])]  # the window (4 calls) is full: 5 waits, and will go in a batch
    _answer(peer, 1)
    sub._read(now + 0.03)
    assert sub.delivered_revision == 1 and len(sub._in_flight) == 3 and not sub._asking
    f.publish(ev(6))
    sub._fill(now + 0.04)
    sub._flush()
    assert _calls(peer) == [(False, [5, 6])]  # the last slot before a full window asks for an answer
    _answer(peer, 5, b"2")  # ...which acknowledges 2, 3, 4 too, and reports 2 handler failures
    sub._read(now + 0.05)
    assert sub.delivered_revision == 6 and not sub._in_flight and sub._in_flight_events == 0
    assert f.metrics.registry.get_sample_value("remote_mvc_notifications_failed_total", {"model": "m"}) == 2
    f.publish(ev(7))
    sub._fill(now + 0.06)
    sub._flush()
    assert _calls(peer) == [(True, [7])]  # within ACK_INTERVAL of the last answer asked for: oneway
    assert not sub._sync(now + 0.07) and sub._sync(now + 0.05 + fo.ACK_INTERVAL)  # then a sync call asks
    sub._flush()
    assert _calls(peer) == [(False, [])]
    assert sub._stalled(now + 0.05 + fo.ACK_INTERVAL + f.call_timeout + 0.01)  # unanswered: a stall
    sub.sock.close()
    peer.close()


def test_viewers_in_step_do_not_all_ask_for_an_answer_on_the_same_change():
    """Every viewer asks about every ACK_INTERVAL, but at its own moments: if all asked on the same
    change, that change would carry N answers on top of its N deliveries."""
    import socket

    import remote_mvc._fanout as fo

    f, _, _ = make()
    n, step = 60, 0.02  # 60 viewers, a change every 20 ms (50 changes/s)
    subs, peers = [], []
    for i in range(n):
        sub = f.add(f"v{i}", "u", backlog=[], start=False, oneway=True)
        sub.set_object(f"viewer.v{i}")
        sub.sock, peer = socket.socketpair()
        sub.sock.setblocking(False)
        peer.setblocking(False)
        subs.append(sub)
        peers.append(peer)
    askers, last_ask = [], dict.fromkeys(range(n), 0.0)
    for k in range(1, 101):
        now = 100.0 + k * step
        f.publish(ev(k))
        asked = 0
        for i, (sub, peer) in enumerate(zip(subs, peers, strict=True)):
            sub._fill(now)
            sub._flush()
            calls = _calls(peer)
            assert [revs for _, revs in calls] == [[k]]
            if not calls[0][0]:  # two-way: answer it at once
                asked += 1
                assert k == 1 or now - last_ask[i] >= fo.ACK_INTERVAL / 2 - 1e-9
                last_ask[i] = now
                _answer(peer, 0)
                sub._read(now)
                assert sub.delivered_revision == k and not sub._in_flight
            else:
                assert now - last_ask[i] < fo.ACK_INTERVAL + 1e-9  # nobody goes longer without asking
        askers.append(asked)
    assert askers[0] == n  # the first change after a quiet spell: everyone asks
    # after that, about a fifth of the viewers ask on each change (intervals of 50-100 ms)
    assert max(askers[10:]) <= n // 2 and min(askers[10:]) >= 1
    assert 0.1 * n <= sum(askers[10:]) / len(askers[10:]) <= 0.5 * n
    for sub, peer in zip(subs, peers, strict=True):
        sub.sock.close()
        peer.close()


def test_a_viewer_that_did_not_ask_for_oneway_answers_every_call():
    import socket

    f, _, _ = make()
    sub = f.add("v", "u", backlog=[], start=False)
    sub.set_object("viewer.v")
    sub.sock, peer = socket.socketpair()
    sub.sock.setblocking(False)
    peer.setblocking(False)
    for r in (1, 2, 3):
        f.publish(ev(r))
        sub._fill(0.0)
    sub._flush()
    assert _calls(peer) == [(False, [1]), (False, [2])]  # two calls in flight at most, each answered
    assert sub.queued == 1
    sub.sock.close()
    peer.close()


def test_a_turn_sends_to_the_viewers_of_one_host_one_after_another():
    """Viewers hosted together (one daemon address) get a change back to back, so their host wakes
    once for all of them, not once per viewer interleaved with the other hosts."""
    import socket
    import threading

    from remote_mvc.testing import wait_until

    class Owned:  # stands in for the connected proxy the loop takes over
        def _pyroClaimOwnership(self):
            pass

        def _pyroRelease(self):
            pass

    f, _, _ = make()
    order, lock, peers = [], threading.Lock(), []
    hosts = [f"10.0.0.{h}:900{h}" for h in range(4)]
    for i in range(24):  # subscribed in an order that interleaves the hosts
        sub = f.add(f"v{i}", f"PYRO:viewer.v{i}@{hosts[i % 4]}", backlog=[], start=False, oneway=True)
        sub.set_object(f"viewer.v{i}")
        sub.proxy = Owned()
        sub.sock, peer = socket.socketpair()
        sub.sock.setblocking(False)
        peers.append(peer)
        flush = sub._flush

        def recorded(sub=sub, flush=flush):
            if sub._out:
                with lock:
                    order.append(sub.destination)
            flush()

        sub._flush = recorded
        f._connected.append(sub)
    f._loop_started = True
    f._loop.start()
    try:
        f.publish(ev(1))
        wait_until(lambda: len(order) == 24, timeout=10, message="a call to every viewer")
        runs = [d for k, d in enumerate(order) if k == 0 or order[k - 1] != d]
        assert sorted(runs) == hosts  # one run per host: 4 runs of 6
    finally:
        f.close()
        for peer in peers:
            peer.close()
