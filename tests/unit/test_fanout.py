"""The fan-out: cursors and windows (pure), then the registry and the real loop over socket pairs."""

import json
import threading

import pytest
from Pyro5 import protocol
from Pyro5.serializers import serializers

from remote_mvc import Metrics
from remote_mvc.fanout import Fanout
from remote_mvc.fanout.cursor import Cursor
from remote_mvc.fanout.registry import Registry
from remote_mvc.fanout.stream import Stream
from remote_mvc.fanout.window import ACK_INTERVAL, MAX_IN_FLIGHT, ONEWAY_WINDOW, UnexpectedAnswer, Window
from remote_mvc.pyro import notify
from remote_mvc.testing import SocketPairs, wait_until

HEADER = 40  # Pyro5's message header (tests/unit/test_pyro_internals.py pins it)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def ev(r):
    return {"revision": r, "values": {"value": r}, "time": 0.0}


def revisions(batch):
    return [e["revision"] for e in batch["events"]]


# cursors (pure) ----------------------------------------------------------------------------
def cursor(stream, state=None, backlog=()):
    state = state if state is not None else {"revision": 0}
    c = Cursor(stream, lambda: {"revision": state["revision"], "values": {}})
    if backlog is None:
        c.offer_snapshot()
    else:
        c.offer_backlog(list(backlog))
    return c


def test_events_are_batched_in_order_up_to_batch_max():
    stream = Stream("m", queue_limit=1000, batch_max=3)
    c = cursor(stream)
    for r in range(1, 6):
        stream.publish(ev(r))
    assert revisions(c.next_batch()) == [1, 2, 3]
    assert revisions(c.next_batch()) == [4, 5]


def test_backlog_first_then_live_events():
    stream = Stream("m", queue_limit=1000, batch_max=500)
    c = cursor(stream, backlog=[ev(1), ev(2)])
    stream.publish(ev(3))
    assert revisions(c.next_batch()) == [1, 2, 3]


def test_one_shared_log_read_by_every_cursor_from_its_own_place():
    stream = Stream("m", queue_limit=10, batch_max=4)
    early = cursor(stream)
    stream.publish(ev(1))
    stream.publish(ev(2))
    assert stream.kept == 2 and early.queued == 2
    late = cursor(stream, backlog=[ev(1), ev(2)])  # resubscribed from revision 0
    for r in range(3, 6):
        stream.publish(ev(r))
    assert revisions(early.next_batch()) == [1, 2, 3, 4]
    assert revisions(late.next_batch()) == [1, 2, 3, 4]  # backlog, then live
    assert revisions(late.next_batch()) == [5]
    assert late.next_batch() is None and not late.has_work() and early.has_work()
    assert revisions(early.next_batch()) == [5]
    for r in range(6, 30):
        stream.publish(ev(r))
    assert stream.kept == 14  # queue_limit + batch_max events kept, whatever the number of viewers
    assert stream.events_after(5) is None  # no longer kept: the reader takes a snapshot


def test_past_the_bound_a_snapshot_replaces_the_queue():
    stream = Stream("m", queue_limit=4, batch_max=500)
    state = {"revision": 0}
    c = cursor(stream, state)
    for r in range(1, 9):
        stream.publish(ev(r))
        state["revision"] = r
    assert c.queued == 8  # more than queue_limit behind: the next call is a snapshot
    assert c.next_batch() == {"snapshot": {"revision": 8, "values": {}}, "reason": "behind"}
    stream.publish(ev(9))
    assert revisions(c.next_batch()) == [9]


def test_a_backlog_past_the_bound_is_a_snapshot_too():
    stream = Stream("m", queue_limit=2, batch_max=500)
    c = cursor(stream, backlog=[ev(1), ev(2), ev(3)])
    assert c.next_batch()["reason"] == "behind"


def test_snapshot_skips_events_it_already_covers():
    stream = Stream("m", queue_limit=1000, batch_max=500)
    state = {"revision": 0}
    c = cursor(stream, state, backlog=None)  # new viewer: snapshot first
    stream.publish(ev(1))
    state["revision"] = 1
    batch = c.next_batch()
    assert batch["snapshot"]["revision"] == 1 and batch["reason"] == "subscribe"
    stream.publish(ev(2))
    assert revisions(c.next_batch()) == [2]


def test_a_stopped_cursor_hands_out_nothing():
    stream = Stream("m", queue_limit=1000, batch_max=500)
    c = cursor(stream)
    stream.publish(ev(1))
    c.stop()
    assert c.stopped and not c.has_work() and c.next_batch() is None


def test_a_batch_is_encoded_once_for_every_viewer_in_step():
    stream = Stream("m", queue_limit=1000, batch_max=500)
    batch = [ev(1), ev(2)]
    text = stream.encoded_batch(batch)
    assert stream.encoded_batch([ev(1), ev(2)]) is text  # the next viewer's call reuses it
    assert json.loads(text) == {"model": "m", "events": batch}
    assert json.loads(stream.encoded_batch([ev(2)])) == {"model": "m", "events": [ev(2)]}
    assert stream.is_encoded(1) and stream.is_encoded(2) and not stream.is_encoded(3)


# windows (pure) ----------------------------------------------------------------------------
class Pipe:
    """A cursor and a window, filled the way the loop fills them: the calls as (oneway?, revisions)."""

    def __init__(self, stream, oneway, size=None):
        self.stream = stream
        self.cursor = cursor(stream)
        self.window = Window(oneway=oneway, event_limit=stream.queue_limit, size=size)

    def fill(self, now):
        calls = []
        while self.window.has_room() and self.cursor.has_work():
            batch = self.cursor.next_batch()
            if batch is None:
                break
            two_way = self.window.next_is_two_way(now)
            self.window.sent(now, batch["events"][-1]["revision"], len(batch["events"]), two_way)
            calls.append((not two_way, revisions(batch)))
        return calls


def test_an_ordered_oneway_viewer_answers_one_call_per_window_and_that_acknowledges_the_rest():
    stream = Stream("m", queue_limit=1000, batch_max=500)
    assert Window(oneway=True, event_limit=10).size == ONEWAY_WINDOW
    assert Window(oneway=False, event_limit=10).size == MAX_IN_FLIGHT
    p = Pipe(stream, oneway=True, size=4)  # the sequence below is written for a window of 4 calls
    w = p.window
    now = 100.0
    stream.publish(ev(1))
    assert p.fill(now) == [(False, [1])]  # the first answer asked for at once (none for ACK_INTERVAL)
    calls = []
    for r in (2, 3):
        stream.publish(ev(r))
        calls += p.fill(now + 0.01)
    assert calls == [(True, [2]), (True, [3])]  # an answer is awaited: these go oneway
    assert w.in_flight == 3
    calls = []
    for r in (4, 5):
        stream.publish(ev(r))
        calls += p.fill(now + 0.02)
    assert calls == [(True, [4])]  # the window (4 calls) is full: 5 waits, and will go in a batch
    assert w.acknowledge(now + 0.03, raised=False) == 1
    assert w.delivered_revision == 1 and w.in_flight == 3 and not w.asking
    stream.publish(ev(6))
    assert p.fill(now + 0.04) == [(False, [5, 6])]  # the last slot before a full window asks for an answer
    assert w.acknowledge(now + 0.05, raised=False) == 4  # ...which acknowledges 2, 3, 4 too
    assert w.delivered_revision == 6 and w.in_flight == 0 and w.events_in_flight == 0
    stream.publish(ev(7))
    assert p.fill(now + 0.06) == [(True, [7])]  # within ACK_INTERVAL of the last answer asked for: oneway
    assert w.sync_due(now + 0.07) is None
    assert w.sync_due(now + 0.05 + ACK_INTERVAL) == 7  # then an empty call asks, up to revision 7
    w.sent(now + 0.05 + ACK_INTERVAL, 7, 0, True)
    assert not w.stalled(now + 0.05 + ACK_INTERVAL + 3.0, 3.0)
    assert w.stalled(now + 0.05 + ACK_INTERVAL + 3.01, 3.0)  # unanswered: a stall


def test_an_answer_nobody_asked_for_is_refused():
    w = Window(oneway=True, event_limit=10)
    with pytest.raises(UnexpectedAnswer):
        w.acknowledge(1.0, raised=False)
    w.sent(1.0, 1, 1, False)  # a oneway call: no answer is due either
    with pytest.raises(UnexpectedAnswer):
        w.acknowledge(1.0, raised=False)


def test_a_raising_two_way_call_makes_the_window_ask_again_for_the_oneway_failures():
    w = Window(oneway=True, event_limit=10)
    w.sent(1.0, 1, 1, True)
    w.acknowledge(1.1, raised=True)
    assert w.in_flight == 0
    assert w.sync_due(1.0 + ACK_INTERVAL + 0.01) == 1  # nothing in flight, yet a report is due


def test_events_in_flight_are_bounded_too():
    w = Window(oneway=True, event_limit=5)
    w.sent(0.0, 5, 5, True)
    assert not w.has_room() and w.in_flight == 1


def test_viewers_in_step_do_not_all_ask_for_an_answer_on_the_same_change():
    """Every viewer asks about every ACK_INTERVAL, but at its own moments: if all asked on the same
    change, that change would carry N answers on top of its N deliveries."""
    stream = Stream("m", queue_limit=1000, batch_max=500)
    n, step = 60, 0.02  # 60 viewers, a change every 20 ms (50 changes/s)
    pipes = [Pipe(stream, oneway=True) for _ in range(n)]
    askers, last_ask = [], dict.fromkeys(range(n), 0.0)
    for k in range(1, 101):
        now = 100.0 + k * step
        stream.publish(ev(k))
        asked = 0
        for i, p in enumerate(pipes):
            calls = p.fill(now)
            assert [revs for _, revs in calls] == [[k]]
            if not calls[0][0]:  # two-way: answer it at once
                asked += 1
                assert k == 1 or now - last_ask[i] >= ACK_INTERVAL / 2 - 1e-9
                last_ask[i] = now
                p.window.acknowledge(now, raised=False)
                assert p.window.delivered_revision == k and not p.window.in_flight
            else:
                assert now - last_ask[i] < ACK_INTERVAL + 1e-9  # nobody goes longer without asking
        askers.append(asked)
    assert askers[0] == n  # the first change after a quiet spell: everyone asks
    # after that, about a fifth of the viewers ask on each change (intervals of 50-100 ms)
    assert max(askers[10:]) <= n // 2 and min(askers[10:]) >= 1
    assert 0.1 * n <= sum(askers[10:]) / len(askers[10:]) <= 0.5 * n


def test_a_viewer_that_did_not_ask_for_oneway_answers_every_call():
    stream = Stream("m", queue_limit=1000, batch_max=500)
    p = Pipe(stream, oneway=False)
    calls = []
    for r in (1, 2, 3):
        stream.publish(ev(r))
        calls += p.fill(0.0)
    assert calls == [(False, [1]), (False, [2])]  # two calls in flight at most, each answered
    assert p.cursor.queued == 1


# the registry (a real loop, over socket pairs) ----------------------------------------------
@pytest.fixture
def pairs():
    p = SocketPairs()
    yield p
    p.close()


@pytest.fixture
def made(pairs):
    made = []

    def make(**kw):
        state = {"revision": 0}
        clock = Clock()
        f = Fanout("m", lambda: {"revision": state["revision"], "values": {}}, Metrics(), clock=clock,
                   connect=pairs, **kw)
        made.append(f)
        return f, clock, state

    yield make
    for f in made:
        f.close()


def test_leases_expire_unless_renewed_and_the_gauge_follows(made):
    f, clock, _ = made(lease_seconds=10)
    a = f.add("a", "PYRO:viewer.a@127.0.0.1:9", [])
    b = f.add("b", "PYRO:viewer.b@127.0.0.1:9", [])
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
    assert f.renew([b.id]) == [b.id] and b.stopped


def test_a_drop_is_counted_before_the_viewer_leaves_the_count(made):
    """Whoever sees a dropped viewer gone (the viewers gauge, the subscriber count) sees its drop
    counted already: the count falls after the counter rises, never before (a test or a dashboard
    that waits for the count to fall then reads the counter once found it still at 0)."""
    f, clock, _ = made(lease_seconds=10)
    sub = f.add("a", "PYRO:viewer.a@127.0.0.1:9", [])
    seen: list[tuple[str, int]] = []
    registry = Registry(lambda n: seen.append(("count", n)))
    registry.add(sub)
    assert registry.remove("ghost/1", before=lambda s: seen.append(("before", 0))) is None
    assert registry.remove(sub.id, before=lambda s: seen.append(("before", len(registry)))) == (sub, 0)
    assert seen == [("count", 0), ("count", 1), ("before", 1), ("count", 0)]
    # the fan-out counts its drops in that hook: the viewer is still counted when the counter rises
    counted_at: list[int] = []
    real = f.metrics.viewers_dropped

    class Spy:
        def labels(self, *labels):
            child = real.labels(*labels)

            class Child:
                def inc(self):
                    counted_at.append(len(f))
                    child.inc()
            return Child()

    f.metrics.viewers_dropped = Spy()
    clock.now = 11
    assert f.expire() == 1 and len(f) == 0 and counted_at == [1]
    assert f.metrics.registry.get_sample_value(
        "remote_mvc_viewers_dropped_total", {"model": "m", "reason": "lease_expired"}) == 1


def test_resubscribing_viewer_replaces_its_old_subscription(made):
    f, _, _ = made()
    # two object ids: the socket pairs are kept by object id, and a connection made for the old
    # subscription after the new one's would replace (and close) the new one's peer: a drop
    old = f.add("v", "PYRO:viewer.v1@127.0.0.1:9", [])
    new = f.add("v", "PYRO:viewer.v2@127.0.0.1:8", [])
    assert len(f) == 1 and f.renew([old.id]) == [old.id] and f.renew([new.id]) == []
    assert old.stopped and f.of_viewer("v") is new
    assert f.remove(new.id) and not f.remove(new.id) and len(f) == 0


def test_owned_counts_identities_and_anonymous_addresses(made):
    f, _, _ = made()
    f.add("a", "PYRO:viewer.a@127.0.0.1:9", [], identity="controller")
    f.add("b", "PYRO:viewer.b@127.0.0.1:9", [], identity="anonymous", host="10.0.0.1")
    f.add("c", "PYRO:viewer.c@127.0.0.1:9", [], identity="anonymous", host="10.0.0.1")
    assert f.owned("controller") == (1, 0)
    assert f.owned("anonymous", "10.0.0.1") == (2, 2) and f.owned("anonymous", "10.0.0.2") == (2, 0)
    f.drop_viewer("b")
    assert f.owned("anonymous", "10.0.0.1") == (1, 1)


def _messages(peer, timeout=10.0):
    """Every whole Pyro5 message the peer has received so far, waiting for at least one."""
    data = b""
    wait_until(lambda: _has_message(peer), timeout, message="a call")
    try:
        while chunk := peer.recv(65536):
            data += chunk
    except BlockingIOError:
        pass
    out = []
    while data:
        msg = protocol.ReceivingMessage(data[:HEADER])
        size = HEADER + msg.annotations_size + msg.data_size
        out.append((msg, data[:size]))
        data = data[size:]
    return out


def _has_message(peer):
    import socket

    try:
        return len(peer.recv(HEADER, socket.MSG_PEEK)) == HEADER
    except BlockingIOError:
        return False


def test_calls_are_pyro5_json_messages_with_the_capability_and_each_event_encoded_once(made, pairs):
    f, _, state = made(batch_max=10)
    sub = f.add("v", "PYRO:viewer.v@127.0.0.1:9", backlog=[])
    peer = pairs.peer("viewer.v")
    events = [{"revision": r, "values": {"name": 'q"u\\o\u2028te', "value": r}, "time": 1.5} for r in (1, 2, 3)]
    for e in events:
        f.publish(e)
    got = []
    while sum(len(c["params"][0]["events"]) for c in got) < 3:
        for msg, data in _messages(peer):
            assert msg.type == protocol.MSG_INVOKE and msg.serializer_id == serializers["json"].serializer_id
            assert data == protocol.SendingMessage(protocol.MSG_INVOKE, msg.flags, msg.seq, msg.serializer_id,
                                                   data[HEADER:]).data  # byte for byte what Pyro5 makes
            obj, method, vargs, kwargs = serializers["json"].loadsCall(data[HEADER:])
            assert (obj, method, kwargs) == ("viewer.v", "notify", {})
            assert vargs[0]["capability"] == sub.capability and vargs[0]["model"] == "m"  # every call carries it
            got.append({"params": vargs, "seq": msg.seq})
            peer.send(protocol.SendingMessage(protocol.MSG_RESULT, 0, msg.seq, 3, b"0").data)
    assert [e for c in got for e in c["params"][0]["events"]] == events
    assert all(f.stream.is_encoded(r) for r in (1, 2, 3))  # encoded once, shared by every subscriber's calls
    wait_until(lambda: sub.delivered_revision == 3, 10, message="acknowledged")
    state["revision"] = 3
    sub.cursor.offer_snapshot("behind")
    f.publish(ev(4))  # wakes the loop: the snapshot goes first, and covers 3 (not 4)
    (msg, data), *_ = _messages(peer)
    _, _, vargs, _ = serializers["json"].loadsCall(data[HEADER:])
    assert vargs[0]["snapshot"]["revision"] == 3 and vargs[0]["reason"] == "behind"
    assert vargs[0]["capability"] == sub.capability
    other = f.add("w", "PYRO:viewer.w@127.0.0.1:9", backlog=[])
    assert other.capability != sub.capability and len(sub.capability) >= 32  # one secret per subscription


def test_handler_failures_reported_in_answers_are_counted_and_the_viewer_kept(made, pairs):
    f, _, _ = made()
    sub = f.add("v", "PYRO:viewer.v@127.0.0.1:9", backlog=[])
    peer = pairs.peer("viewer.v")
    f.publish(ev(1))
    ((msg, _),) = _messages(peer)
    peer.send(protocol.SendingMessage(protocol.MSG_RESULT, 0, msg.seq, 3, b"2").data)
    failed = lambda: f.metrics.registry.get_sample_value("remote_mvc_notifications_failed_total", {"model": "m"})  # noqa: E731
    wait_until(lambda: failed() == 2, 10, message="two failures counted")
    assert sub.delivered_revision == 1 and f.get(sub.id) is sub


def test_an_answer_to_no_call_drops_the_viewer(made, pairs):
    f, _, _ = made()
    f.add("v", "PYRO:viewer.v@127.0.0.1:9", backlog=[])
    pairs.peer("viewer.v").send(protocol.SendingMessage(protocol.MSG_RESULT, 0, 1, 3, b"0").data)
    wait_until(lambda: len(f) == 0, 10, message="dropped")
    assert f.metrics.registry.get_sample_value(
        "remote_mvc_viewers_dropped_total", {"model": "m", "reason": "unreachable"}) == 1


def test_a_turn_sends_to_the_viewers_of_one_host_one_after_another():
    """Viewers hosted together (one daemon address) get a change back to back, so their host wakes
    once for all of them, not once per viewer interleaved with the other hosts."""
    order, lock = [], threading.Lock()
    hosts = [f"10.0.0.{h}:900{h}" for h in range(4)]
    destination = {}

    def sent(object_id):
        with lock:
            order.append(destination[object_id])

    pairs = SocketPairs(on_send=sent)
    f = Fanout("m", lambda: {"revision": 0, "values": {}}, Metrics(), connect=pairs)
    try:
        for i in range(24):  # subscribed in an order that interleaves the hosts
            destination[f"viewer.v{i}"] = hosts[i % 4]
            f.add(f"v{i}", f"PYRO:viewer.v{i}@{hosts[i % 4]}", backlog=[], oneway=True)
        # every connection is the loop's before the change (else they would meet it in several turns)
        wait_until(lambda: f.connected == 24, 10, message="every viewer connected")
        f.publish(ev(1))
        wait_until(lambda: len(order) == 24, timeout=10, message="a call to every viewer")
        runs = [d for k, d in enumerate(order) if k == 0 or order[k - 1] != d]
        assert sorted(runs) == hosts  # one run per host: 4 runs of 6
    finally:
        f.close()
        pairs.close()


def test_notify_frames_round_trip_through_pyro5():
    """The sender's packing, checked against Pyro5's own parser and SendingMessage."""
    env = notify.envelope("viewer.x", "secret")
    body = b'{"model":"m","events":[]}'
    for two_way in (True, False):
        data = notify.pack_call(7, env, body, two_way)
        msg = protocol.ReceivingMessage(data[:HEADER])
        assert bool(msg.flags & protocol.FLAGS_ONEWAY) is not two_way
        assert data == protocol.SendingMessage(protocol.MSG_INVOKE, msg.flags, 7, 3, data[HEADER:]).data
        assert serializers["json"].loadsCall(data[HEADER:]) == \
            ("viewer.x", "notify", [{"capability": "secret", "model": "m", "events": []}], {})
