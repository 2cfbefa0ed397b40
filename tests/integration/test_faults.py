"""Dead, stalled and lagging viewers; model server and name server restarts."""

import logging
import signal
import threading
import time

from remote_mvc import ModelClient
from remote_mvc.testing import wait_until


def dropped(model, reason):
    return model.metrics.registry.get_sample_value(
        "remote_mvc_viewers_dropped_total", {"model": "remote_mvc.model", "reason": reason}) or 0


def test_killed_viewer_is_dropped_and_others_keep_receiving(mvc_stack):
    model = mvc_stack.model()
    host, views = mvc_stack.viewers(3)
    doomed = mvc_stack.process("viewer", viewer_id="doomed")
    doomed.wait_for_log(lambda r: r.get("event") == "subscribed", 15)
    wait_until(lambda: model.server.subscriber_count == 2)  # one stream per host: 3 viewers in one, 1 in the other
    doomed.kill()
    rm = mvc_stack.client("controller")
    for i in range(1, 11):
        rm.modify({"value": i})
    for v in views:
        assert v.wait_for(10, 5)
        assert v.received == list(range(0, 11))
    wait_until(lambda: model.server.subscriber_count == 1, 10, message="the dead viewer to be dropped")
    assert dropped(model, "unreachable") + dropped(model, "lease_expired") == 1


def test_stalled_viewer_does_not_hold_the_others_back(mvc_stack):
    model = mvc_stack.model(call_timeout=2.0, lease_seconds=4.0)
    host, views = mvc_stack.viewers(3)
    stalled = mvc_stack.process("viewer", viewer_id="stalled")
    stalled.wait_for_log(lambda r: r.get("event") == "values", 15)  # connected: its snapshot arrived
    wait_until(lambda: model.server.subscriber_count == 2)  # one stream per host
    stalled.signal(signal.SIGSTOP)
    rm = mvc_stack.client("controller")
    for i in range(1, 21):
        rev = rm.modify({"value": i})
        for v in views:  # each change reaches the healthy viewers while the stalled one is still subscribed
            assert v.wait_for(rev, 5)
    assert "stalled" in {d["viewer_id"] for d in model.server.viewers()}
    wait_until(lambda: model.server.subscriber_count == 1, 15, message="the stalled viewer to be dropped")
    assert dropped(model, "timeout") + dropped(model, "lease_expired") == 1
    for v in views:
        assert v.received == list(range(0, 21))
    # resumed, it finds its subscription gone, re-subscribes and catches up
    stalled.signal(signal.SIGCONT)
    wait_until(lambda: model.server.subscriber_count == 2, 15, message="the resumed viewer to re-subscribe")
    last = rm.modify({"value": 100})
    line = stalled.wait_for_log(lambda r: r.get("event") == "values" and r.get("revision") == last, 10)
    assert line["values"]["value"] == 100


def test_idle_stalled_viewer_loses_its_lease(mvc_stack):
    model = mvc_stack.model(lease_seconds=1.0, call_timeout=5.0)
    stalled = mvc_stack.process("viewer", viewer_id="idle", lease_seconds=1.0)
    stalled.wait_for_log(lambda r: r.get("event") == "values", 15)  # its first snapshot is delivered
    wait_until(lambda: model.server.subscriber_count == 1)
    stalled.signal(signal.SIGSTOP)  # no changes flow: only the lease can notice
    wait_until(lambda: model.server.subscriber_count == 0, 10, message="the lease to expire")
    assert dropped(model, "lease_expired") == 1


def test_a_viewer_host_stops_in_its_budget_while_the_model_server_hangs(mvc_stack, caplog):
    """SIGTERM to a viewer host whose model server is frozen mid-call: the stop must still end within
    MVC_STOP_TIMEOUT, or the orchestrator's SIGKILL comes first (compose: 10 s). Waiting for the keeper's
    call, then resolving, connecting and retrying an unsubscribe would take several call timeouts."""
    server = mvc_stack.process("model")
    server.wait_for_log(lambda r: r.get("event") == "registered", 15)
    host, views = mvc_stack.viewers(2, call_timeout=3.0, stop_timeout=3.0)
    server.signal(signal.SIGSTOP)
    try:
        renewals = host.renewals
        wait_until(lambda: host.renewals > renewals, 10, message="a renewal the frozen server does not answer")
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="remote_mvc.viewer"):
            host.stop()
        took = time.monotonic() - started
    finally:
        server.signal(signal.SIGCONT)
    assert took < 3.0 + 2.5, f"the stop took {took:.1f} s, its budget is 3 s"
    said = {getattr(r, "event", None) for r in caplog.records}
    assert said & {"unsubscribe_unfinished", "unsubscribe_failed"}, "a stop that did not say goodbye says so"


def test_lagging_viewer_gets_batches_then_a_snapshot(mvc_stack):
    """The server side of a slow subscriber (the per-viewer subscribe API, kept for plain Pyro5
    viewers): its calls batch up, then one snapshot replaces an overflowing queue. A viewer host's
    stream never lags like this (it answers at once); its slow viewers are conflated in the host,
    see test_hoststream.py."""
    model = mvc_stack.model(queue_limit=20, batch_max=8, call_timeout=10.0)

    working = threading.Event()  # cleared: the lagging viewer's handler is busy until it is set again
    working.set()

    def slow(viewer, event):
        assert working.wait(20)  # a viewer doing real work: its changes queue up meanwhile

    from remote_mvc import Viewer
    from remote_mvc.pyro.daemons import make_viewer_daemon

    host, (fast,) = mvc_stack.viewers(1, prefix="fast")
    lagging = Viewer("lagging", mvc_stack.settings.model_name, on_change=slow, record=True, log_values=False)
    batches = []  # events per call the lagging viewer got
    receive = lagging.notify
    lagging.notify = lambda batch: (batches.append(len(batch.get("events", ()))), receive(batch))[1]
    daemon = make_viewer_daemon("thread", host="127.0.0.1", port=0)
    uri = daemon.register(lagging, objectId="viewer.lagging")
    threading.Thread(target=daemon.requestLoop, daemon=True).start()
    client = mvc_stack.client(None)
    lagging.fetch = lambda since: client.history(since)
    lagging.fetch_snapshot = client.snapshot
    lagging.expect_capability()
    reply = client.subscribe(str(uri), "lagging", None, True)
    lagging.accept_capability(reply["capability"])
    done = threading.Event()

    def renew():  # the lease, as a host's keeper would
        while not done.wait(0.3):
            client.renew([reply["subscription"]])

    threading.Thread(target=renew, daemon=True).start()
    try:
        wait_until(lambda: model.server.subscriber_count == 2)
        wait_until(lambda: lagging.synced)
        rm = mvc_stack.client("controller")
        # 12 changes while it works on the first: more than its window of calls in flight (8), fewer
        # than queue_limit (20): what queues behind the window goes out as one call once it answers
        working.clear()
        for i in range(1, 13):
            rm.modify({"value": i})
        assert fast.wait_for(12, 10)
        working.set()
        assert lagging.wait_for(12, 20)
        assert max(batches) > 1
        # 40 more while it works again: more than queue_limit behind, so one snapshot replaces them
        working.clear()
        for i in range(13, 53):
            rm.modify({"value": i})
        assert fast.wait_for(52, 10) and fast.received == list(range(0, 53))
        working.set()
        assert lagging.wait_for(52, 20)
        assert lagging.values["value"] == 52
        assert lagging.received == sorted(set(lagging.received))  # in order, nothing twice
        assert lagging.snapshots >= 2  # the one at subscribe, and one that replaced the overflowing queue
        m = model.metrics.registry
        wait_until(lambda: m.get_sample_value("remote_mvc_snapshots_sent_total", {"model": "remote_mvc.model"}) >= 3,
                   5, message="the server to count its snapshots (2 at subscribe, 1 for the overflow)")
        assert sum(batches) < 52  # the overflow was replaced by a snapshot, not sent
    finally:
        done.set()
        working.set()
        daemon.shutdown()
        daemon.close()


def test_model_server_sigkill_restart_loses_nothing_acknowledged(mvc_stack):
    server = mvc_stack.process("model")
    server.wait_for_log(lambda r: r.get("event") == "registered", 15)
    host, views = mvc_stack.viewers(3)
    rm = mvc_stack.client("controller", retry_seconds=15)
    acked = [rm.modify({"value": i}) for i in range(1, 21)]
    assert acked == list(range(1, 21))
    server.kill()  # SIGKILL: no goodbye
    server2 = mvc_stack.process("model")
    server2.wait_for_log(lambda r: r.get("event") == "registered", 15)
    snap = rm.snapshot()
    assert snap["revision"] == 20 and snap["values"]["value"] == 20
    assert [e["revision"] for e in rm.history(0)] == list(range(1, 21))
    for i in range(21, 26):
        rm.modify({"value": i})
    for v in views:
        assert v.wait_for(25, 20)
        assert v.values["value"] == 25
        assert v.received == sorted(set(v.received)), "never twice, never out of order"
        assert set(range(21, 26)) <= set(v.received)


def test_name_server_restart_services_register_again(mvc_stack):
    from remote_mvc import NameServer

    model = mvc_stack.model()
    host, (view,) = mvc_stack.viewers(1)
    port = mvc_stack.nameserver.port
    mvc_stack.nameserver.stop()
    mvc_stack.nameserver = NameServer(mvc_stack.settings.replace(service="nameserver", ns_port=port),
                                      storage="memory").start()
    client = ModelClient(None, mvc_stack.settings.replace(identity="controller"), retry_seconds=10)
    try:
        rev = client.modify({"value": 5})  # found by name again, with no manual step
    finally:
        client.close()
    assert view.wait_for(rev, 10)
    wait_until(lambda: model.healthy(), 10)


def test_a_viewer_whose_handler_raises_is_kept_and_the_failure_counted(mvc_stack):
    model = mvc_stack.model()
    host, (view,) = mvc_stack.viewers(1)
    failed = lambda: model.metrics.registry.get_sample_value(  # noqa: E731
        "remote_mvc_notifications_failed_total", {"model": "remote_mvc.model"}) or 0
    before = failed()

    attempts = []

    def broken(viewer, event):
        attempts.append(event["revision"])
        raise RuntimeError("handler bug")

    view.on_change = broken
    rm = mvc_stack.client("controller")
    for i in range(1, 6):  # one call each (a batch would fail as one): most go oneway, and their
        rm.modify({"value": i})  # failures come with a later answer
        wait_until(lambda i=i: i in attempts, 5, message=f"the viewer to try change {i}")
    # counted in the host (its dispatcher runs the handler; the server's call was answered at once)
    wait_until(lambda: host.metrics.registry.get_sample_value(
        "remote_mvc_viewer_handler_errors_total", {"model": "remote_mvc.model"}) == 5, 5,
        message="each of the handler's failures to be counted")
    assert failed() == before  # the host kept answering: nothing failed on the server's side
    view.on_change = None
    assert rm.modify({"value": 6}) == 6
    assert view.wait_for(6, 5)
    assert model.server.subscriber_count == 1 and dropped(model, "unreachable") == 0
