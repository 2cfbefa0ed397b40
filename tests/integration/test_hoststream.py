"""One stream per viewer host (issue 13): the viewers of one model in one host share one subscription
and one connection; a slow handler holds up only its own viewer, which is conflated to the latest
state; the server lists every member; hostile member lists are refused and audited. Real daemons on
127.0.0.1."""

import logging
import subprocess
import threading
from pathlib import Path

import pytest

from remote_mvc import AuthProxy, LimitExceeded, PermissionDenied, ValidationError, Viewer, read_audit
from remote_mvc.testing import wait_until

REPO = Path(__file__).resolve().parents[2]


def sample(metrics, name, labels):
    return metrics.registry.get_sample_value(name, labels) or 0.0


def staller():
    """A handler that blocks (I/O without a timeout) in its first change until the gate is set,
    and the ids of the viewers it blocked."""
    gate = threading.Event()
    blocked: list[str] = []

    def stall(viewer, event):
        if event is not None:
            blocked.append(viewer.viewer_id)
            gate.wait(60)

    return gate, blocked, stall


def test_viewers_of_one_host_share_one_subscription_and_one_connection(mvc_stack):
    model = mvc_stack.model()
    host, views = mvc_stack.viewers(20)
    assert model.server.subscriber_count == 1  # one sender on the server for 20 viewers
    assert host.subscriptions() == 1 and host.subscribed() == 20 and host.healthy()
    rm = mvc_stack.client("controller")
    revs = [rm.modify({"value": i}) for i in range(1, 31)]
    for view in views:
        assert view.wait_for(revs[-1], 10)
        assert view.received == [0, *revs]  # the first snapshot, then every change once, in order
        assert view.values["value"] == 30
    assert host.daemon.connections_from("127.0.0.1") == 1  # the model server's one connection
    sent = sample(model.metrics, "remote_mvc_events_delivered_total", {"model": model.settings.model_name})
    assert sent == 30  # each change sent once to the host, not once per viewer


def test_the_server_lists_every_member_viewer(mvc_stack):
    model = mvc_stack.model()
    host, views = mvc_stack.viewers(3)
    admin = mvc_stack.client("admin")
    entries = admin.viewers()
    assert sorted(e["viewer_id"] for e in entries) == ["viewer-0", "viewer-1", "viewer-2"]
    assert len({e["stream"] for e in entries}) == 1 and all("subscription" in e for e in entries)
    stranger = AuthProxy(model.uri(mvc_stack.settings.model_name))
    seen = stranger.viewers()  # an outsider sees the viewers, not the subscription ids or callback URIs
    assert sorted(e["viewer_id"] for e in seen) == ["viewer-0", "viewer-1", "viewer-2"]
    assert not any("subscription" in e or "uri" in e for e in seen)
    stranger._pyroRelease()
    assert admin.drop_viewer("viewer-1")  # a member: its stream goes, and the host subscribes again
    wait_until(lambda: host.subscribed() == 3 and len(admin.viewers()) == 3, 10, message="the host to resubscribe")
    rev = mvc_stack.client("controller").modify({"value": 7})
    for view in views:
        assert view.wait_for(rev, 10)
        assert view.received == sorted(set(view.received))


def test_viewers_join_and_leave_a_running_stream(mvc_stack):
    model = mvc_stack.model()
    host, (a, b) = mvc_stack.viewers(2)
    rm = mvc_stack.client("controller")
    for i in range(1, 6):
        rm.modify({"value": i})
    assert a.wait_for(5, 10) and b.wait_for(5, 10)
    fresh = host.add(Viewer("fresh", model.settings.model_name, record=True, log_values=False, metrics=host.metrics))
    late = Viewer("late", model.settings.model_name, record=True, log_values=False, metrics=host.metrics)
    late.revision, late.synced = 2, True  # it held revision 2: it catches up from history itself
    host.add(late)
    assert fresh.wait_for(5, 10) and late.wait_for(5, 10)
    assert fresh.received == [5] and fresh.values["value"] == 5  # from the stream's own mirror
    assert late.received == [3, 4, 5]
    admin = mvc_stack.client("admin")
    wait_until(lambda: len(admin.viewers()) == 4 and host.subscribed() == 4, 10, message="the server to learn")
    assert model.server.subscriber_count == 1
    assert host.remove(b) and not host.remove(b)
    wait_until(lambda: sorted(e["viewer_id"] for e in admin.viewers()) == ["fresh", "late", "viewer-0"], 10,
               message="the server to learn the leave")
    rev = rm.modify({"value": 6})
    for view in (a, fresh, late):
        assert view.wait_for(rev, 10)
    assert b.revision == 5  # left: it gets nothing more
    for view in (a, fresh, late):
        host.remove(view)
    wait_until(lambda: model.server.subscriber_count == 0, 10, message="the empty stream to unsubscribe")
    assert admin.viewers() == []


def test_a_slow_handler_holds_up_only_its_own_viewer_and_is_conflated(mvc_stack, caplog):
    model = mvc_stack.model()
    gate = threading.Event()
    blocked = threading.Event()

    def slow(viewer, event):
        if event is not None:
            blocked.set()
            gate.wait(30)  # a handler far slower than the change rate

    name = model.settings.model_name
    caplog.set_level(logging.WARNING, logger="remote_mvc.hoststream")
    host, (stuck, *others) = mvc_stack.viewers(6, viewer_backlog=5, viewer_dispatch_threads=2)
    stuck.on_change = slow  # each already holds the model's state
    rm = mvc_stack.client("controller")
    rm.modify({"value": 1})
    assert blocked.wait(10)  # the slow handler now holds its worker
    revs = []
    for i in range(2, 41):
        # The others keep up with every change while the stuck handler holds its worker. The
        # controller waits for them each time: a burst of 39 changes on a starved CI machine could
        # otherwise overflow their backlog of 5 too, which is conflation working, not what this tests.
        revs.append(rm.modify({"value": i}))
        for view in others:
            assert view.wait_for(revs[-1], 10)
    for view in others:  # every change once, in order
        assert view.received == [0, 1, *revs]
    assert stuck.revision == 1  # still in its first handler call
    conflated = sample(host.metrics, "remote_mvc_viewer_conflated_total", {"model": name})
    assert conflated >= 1
    assert any(getattr(r, "event", None) == "viewer_conflated" or "viewer_conflated" in r.getMessage()
               for r in caplog.records)
    gate.set()
    assert stuck.wait_for(revs[-1], 10)  # it ends at the latest state, from the stream's mirror
    assert stuck.values["value"] == 40 and stuck.received[-1] == 40
    assert len(stuck.received) < len(others[0].received)  # it skipped changes: conflated, not queued
    assert stuck.snapshots >= 2  # its first snapshot, and the latest state at least once
    # the server never noticed: the host answered all along, nothing was dropped
    assert model.server.subscriber_count == 1
    assert sample(model.metrics, "remote_mvc_viewers_dropped_total",
                  {"model": name, "reason": "timeout"}) == 0
    rev = rm.modify({"value": 41})
    assert stuck.wait_for(rev, 10) and stuck.received[-1] == rev  # and it follows every change again


def test_stalled_handlers_get_spare_workers_up_to_the_ceiling(mvc_stack, caplog):
    """Three handlers block (I/O without a timeout) on a host of two dispatch workers: a watchdog adds
    spare workers, never past the ceiling, so the other viewers get every change; the spares retire
    once the stalled handlers return."""
    model = mvc_stack.model()
    gate, blocked, stall = staller()
    name = model.settings.model_name
    caplog.set_level(logging.WARNING, logger="remote_mvc.hoststream")
    host, views = mvc_stack.viewers(6, viewer_dispatch_threads=2, viewer_dispatch_threads_max=4,
                                    viewer_stall_seconds=0.2, viewer_spare_idle_seconds=0.5)
    stuck, others = views[:3], views[3:]
    for view in stuck:  # each already holds the model's state
        view.on_change = stall
    assert host.dispatch_workers() == 2
    rm = mvc_stack.client("controller")
    revs = [rm.modify({"value": 1})]
    wait_until(lambda: len(blocked) == 3, 10, message="all three handlers to stall")  # two workers were not enough
    revs += [rm.modify({"value": i}) for i in range(2, 11)]
    for view in others:  # a spare worker runs them, every change once, in order
        assert view.wait_for(revs[-1], 10)
        assert view.received == [0, *revs]
    assert host.dispatch_workers() == 4  # three stalled and one spare for the rest: the ceiling, never more
    assert all(view.revision == revs[0] for view in stuck)  # each still in its first handler call
    assert sample(host.metrics, "remote_mvc_viewer_stalls_total", {"model": name}) >= 1
    stalls = [r for r in caplog.records if getattr(r, "event", None) == "viewer_handler_stalled"]
    assert stalls and set(stalls[-1].viewer_ids) <= {v.viewer_id for v in stuck}
    gate.set()
    for view in stuck:  # the stalled handlers return and their viewers catch up
        assert view.wait_for(revs[-1], 10)
        assert view.received == sorted(set(view.received)) and view.values["value"] == 10
    wait_until(lambda: host.dispatch_workers() == 2, 10, message="the spares to retire")
    rev = rm.modify({"value": 11})
    for view in [*stuck, *others]:
        assert view.wait_for(rev, 10)


def test_a_host_whose_every_worker_is_stalled_at_the_ceiling_says_so(mvc_stack, caplog):
    """Two handlers block on a host of at most two dispatch workers: the third viewer's change waits
    with no worker left. The host reports it (ERROR log, gauge, unhealthy) instead of going quiet,
    and recovers when a handler returns."""
    mvc_stack.model()
    gate, blocked, stall = staller()
    caplog.set_level(logging.INFO, logger="remote_mvc.hoststream")
    host, views = mvc_stack.viewers(3, viewer_dispatch_threads=1, viewer_dispatch_threads_max=2,
                                    viewer_stall_seconds=0.2)
    stuck, free = views[:2], views[2]
    for view in stuck:
        view.on_change = stall
    assert host.healthy()

    def exhausted():
        return sample(host.metrics, "remote_mvc_viewer_dispatch_exhausted", {})

    rev = mvc_stack.client("controller").modify({"value": 1})
    wait_until(lambda: not host.healthy(), 10, message="the host to report its workers exhausted")
    assert sorted(blocked) == sorted(v.viewer_id for v in stuck) and free.revision < rev
    assert exhausted() == 1 and host.dispatch_workers() == 2
    said = [r for r in caplog.records if getattr(r, "event", None) == "viewer_dispatch_exhausted"]
    assert len(said) == 1 and said[0].levelname == "ERROR"
    assert set(said[0].viewer_ids) == {v.viewer_id for v in stuck}
    gate.set()
    assert free.wait_for(rev, 10)
    wait_until(host.healthy, 10, message="the host healthy again")
    assert exhausted() == 0
    assert any(getattr(r, "event", None) == "viewer_dispatch_recovered" for r in caplog.records)


def test_the_stream_resubscribes_once_after_a_model_server_restart(mvc_stack):
    server = mvc_stack.process("model")
    server.wait_for_log(lambda r: r.get("event") == "registered", 15)
    host, views = mvc_stack.viewers(5)
    rm = mvc_stack.client("controller", retry_seconds=15)
    for i in range(1, 6):
        rm.modify({"value": i})
    server.kill()
    server2 = mvc_stack.process("model")
    server2.wait_for_log(lambda r: r.get("event") == "registered", 15)
    for i in range(6, 11):
        rm.modify({"value": i})
    for view in views:
        assert view.wait_for(10, 20)
        # gap-free from its first state: a server killed before its sender ran sends nothing, and the
        # host's first state is then the restarted server's snapshot (at 5), not revisions 0 to 4
        assert view.received == list(range(view.received[0], 11)) and view.received[0] <= 5
    wait_until(lambda: host.subscribed() == 5, 10, message="the stream to resubscribe")
    assert host.subscriptions() == 1
    assert sorted(e["viewer_id"] for e in mvc_stack.client("admin").viewers()) == [f"viewer-{i}" for i in range(5)]
    subscribed = [r for r in server2.events("viewer_subscribed")]
    assert len(subscribed) == 1  # one subscription for the host's five viewers


def test_hostile_member_lists_are_refused_and_audited(mvc_stack):
    model = mvc_stack.model(max_stream_members=10)
    host, (view, _) = mvc_stack.viewers(2)  # the stream is "viewer-0"; "viewer-1" is only its member
    p = AuthProxy(model.uri(mvc_stack.settings.model_name))  # anonymous, another client than the host
    uri = "PYRO:stream.x@127.0.0.1:9"
    with pytest.raises(LimitExceeded):
        p.subscribe(uri, "s1", None, True, None, None, [f"m{i}" for i in range(11)])
    for members in ("not-a-list", [1, 2], ["x" * 201], ["a", "a"], [""]):
        with pytest.raises(ValidationError):
            p.subscribe(uri, "s1", None, True, None, None, members)
    with pytest.raises(PermissionDenied):  # another client's viewer id
        p.subscribe(uri, "s1", None, True, None, None, ["ok", "viewer-0"])
    with pytest.raises(PermissionDenied):  # a member of another client's stream
        p.subscribe(uri, "s1", None, True, None, None, ["viewer-1"])
    with pytest.raises(PermissionDenied):  # ... also as the stream's own id
        p.subscribe(uri, "viewer-1", None, True, None, None, [])
    sid = mvc_stack.client("admin").viewers()[0]["subscription"]
    with pytest.raises(PermissionDenied):  # another client's stream
        p.set_members(sid, ["mine"])
    assert sorted(e["viewer_id"] for e in p.viewers()) == ["viewer-0", "viewer-1"]  # nothing refused got in
    p._pyroRelease()
    audit = read_audit(model.settings.audit_file())
    refused = [(r["action"], r["result"]) for r in audit if r["identity"] == "anonymous"]
    assert refused.count(("subscribe", "invalid")) == 5
    assert ("subscribe", "limit") in refused
    assert refused.count(("subscribe", "forbidden")) == 3 and ("set_members", "forbidden") in refused
    rev = mvc_stack.client("controller").modify({"value": 3})
    assert view.wait_for(rev, 10)


def test_a_stream_over_two_way_tls_with_the_default_viewer_server(tmp_path):
    """The fast path is the default and keeps TLS: the stream's one connection is TLS, every change
    reaches every viewer once, in order."""
    from remote_mvc import Settings, setup
    from remote_mvc.testing import Stack

    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "ops" / "tls" / "make-certs.sh"), str(certs)], check=True, capture_output=True)
    stack = Stack(tmp_path / "state", tls_ca=str(certs / "ca.crt"), tls_cert=str(certs / "model.crt"),
                  tls_key=str(certs / "model.key")).start()
    try:
        model = stack.model()
        host, views = stack.viewers(5)
        assert host.settings.viewer_server == Settings().viewer_server == "thread"
        rm = stack.client("controller")
        revs = [rm.modify({"value": i}) for i in range(1, 11)]
        for view in views:
            assert view.wait_for(revs[-1], 10) and view.received == [0, *revs]
        assert model.server.subscriber_count == 1 and host.daemon.connections_from("127.0.0.1") == 1
        assert host.daemon.transportServer.sock.__class__.__name__ == "SSLSocket"  # its listener is TLS
    finally:
        stack.close()
        setup(Settings())  # this test process goes back to plaintext


def test_a_streams_members_count_against_its_owners_subscription_cap(mvc_stack):
    """Sharing a connection never lets an owner claim more viewers than it could one by one: the
    host's identity ("service" here) may hold 5; a sixth viewer joining is refused and audited,
    the five go on, and once it leaves the host is whole again."""
    model = mvc_stack.model(max_subscriptions_per_identity=5)
    host, views = mvc_stack.viewers(5)
    extra = host.add(Viewer("sixth", model.settings.model_name, record=True, log_values=False, metrics=host.metrics))
    wait_until(lambda: any(r["action"] == "set_members" and r["result"] == "limit"
                           for r in read_audit(model.settings.audit_file())), 10, message="the refusal, audited")
    assert sorted(e["viewer_id"] for e in mvc_stack.client("admin").viewers()) == [f"viewer-{i}" for i in range(5)]
    rev = mvc_stack.client("controller").modify({"value": 1})
    for view in views:  # the stream goes on for the five the server knows
        assert view.wait_for(rev, 10)
    assert not host.healthy()  # the sixth is not subscribed: the host says so
    host.remove(extra)
    wait_until(lambda: host.healthy(), 15, message="the host to be whole again")
