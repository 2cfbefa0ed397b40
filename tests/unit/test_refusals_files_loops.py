"""Refusal audit throttling, private file modes, and background loops that survive faults."""

import os
import stat
import threading

import pytest

from remote_mvc import AuditLog, Metrics, read_audit
from remote_mvc._files import create_private, open_private_append, private_dir, write_private
from remote_mvc._store import Store
from remote_mvc.auth import Credentials, Identity, generate_credentials
from remote_mvc.fanout import STUCK_AFTER, Fanout
from remote_mvc.testing import SocketPairs, wait_until


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# audit volume (finding 11) --------------------------------------------------------------------------

def test_refusals_beyond_the_rate_are_aggregated_per_address_never_dropped(tmp_path):
    clock = FakeClock()
    metrics = Metrics()
    log = AuditLog(tmp_path / "a.jsonl", metrics, refusals_per_second=10, refusal_burst=20, monotonic=clock)
    written = [log.refusal("modify", "anonymous", "10.0.0.1:4000", "forbidden", changes="x") for _ in range(50)]
    assert written.count(True) == 20 and written.count(False) == 30
    assert log.refusal("modify", "anonymous", "10.0.0.2:5000", "forbidden")  # another address: its own bucket
    records = read_audit(log.path)
    assert len(records) == 21 and not any(r["action"] == "refusals_aggregated" for r in records)
    clock.t += 1.0  # the interval is over: the next refusal (or the owner's flush) writes the summary
    assert log.flush_summaries() == 1
    summary = read_audit(log.path)[-1]
    assert summary["action"] == "refusals_aggregated" and summary["client"] == "10.0.0.1"
    assert summary["count"] == 30 and summary["actions"] == {"modify:forbidden": 30}
    assert summary["identities"] == ["anonymous"]
    assert metrics.registry.get_sample_value("remote_mvc_audit_refusals_aggregated_total") == 30
    # the bucket refills at the rate: 10 more records of their own a second later
    assert [log.refusal("connect", "x", "10.0.0.1:1", "refused") for _ in range(11)].count(True) == 10
    log.close()  # what is held at close is written too
    assert read_audit(log.path)[-1]["count"] == 1


def test_the_throttle_forgets_quiet_addresses(tmp_path):
    clock = FakeClock()
    log = AuditLog(tmp_path / "a.jsonl", refusals_per_second=1000, refusal_burst=1, monotonic=clock)
    for i in range(10_050):
        log.refusal("connect", "u", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:1", "refused")
        clock.t += 0.01
    assert log.tracked_addresses() <= 10_000
    log.close()


def test_audited_refusal_payloads_are_truncated():
    from remote_mvc.server import SUMMARY_LIMIT, _summary

    huge = {"name": "x" * 1_000_000}
    assert len(_summary(huge)) <= SUMMARY_LIMIT + 20
    assert len(_summary(["y"] * 1_000_000)) <= SUMMARY_LIMIT + 20
    assert _summary({"value": 1}) == {"value": 1}

    class Hostile:
        def __repr__(self):
            raise RuntimeError("no")

    assert "Hostile" in _summary(Hostile())  # a repr that raises still gives a record
    assert len(_summary(["x" * 1_000_000] * 10_000)) <= SUMMARY_LIMIT + 20  # no full repr is ever made
    assert isinstance(_summary({"name": "x" * 500}), str)  # a dict with a long value: cut, as text


# file modes (finding 13) -----------------------------------------------------------------------------

def test_state_dir_and_files_are_private_from_their_creation(tmp_path):
    old = os.umask(0o000)  # the most permissive umask: modes must come from the creation itself
    try:
        state = tmp_path / "state" / "deeper"
        store = Store(state / "m.sqlite3")
        store.commit("m", {"revision": 1, "values": {"v": 1}})
        log = AuditLog(state / "audit.jsonl")
        log.record("modify", "x", None, "accepted")
        generate_credentials(state / "credentials.json")
        with open_private_append(state / "other.jsonl") as f:
            f.write("x\n")
        write_private(state / "secret", b"s")
    finally:
        os.umask(old)
    assert mode(tmp_path / "state") == 0o700 and mode(state) == 0o700
    for name in ("m.sqlite3", "m.sqlite3-wal", "m.sqlite3-shm", "audit.jsonl", "credentials.json", "other.jsonl",
                 "secret"):
        assert mode(state / name) == 0o600, name
    store.close()
    log.close()


def test_existing_modes_are_left_alone_and_rewritten_credentials_become_private(tmp_path):
    d = tmp_path / "shared"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    private_dir(d)
    assert mode(d) == 0o755  # the operator's choice
    path = d / "credentials.json"
    path.write_text("{}")
    os.chmod(path, 0o644)
    Credentials([Identity("a", "admin", ("s",))]).dump(path)  # replaced by a file made 0600
    assert mode(path) == 0o600 and Credentials.load(path).get("a").role == "admin"
    assert create_private(d / "x.sqlite3") and mode(d / "x.sqlite3") == 0o600
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary file left behind


# background loops survive (the loops item) ----------------------------------------------------------

def test_checkpointer_survives_an_unexpected_error(tmp_path):
    class Flaky(Store):
        failures = 1

        def checkpoint(self, db, truncate=False):
            if self.failures:
                self.failures -= 1
                raise RuntimeError("injected")
            return super().checkpoint(db, truncate)

    metrics = Metrics()
    store = Flaky(tmp_path / "s.sqlite3", checkpoint_every=1, metrics=metrics)
    try:
        for r in (1, 2, 3):
            store.commit("m", {"revision": r, "values": {"v": r}})
            assert store.wait_checkpoints(r, 10)
        assert metrics.registry.get_sample_value("remote_mvc_loop_errors_total", {"loop": "checkpointer"}) == 1
        assert store.failures == 0
    finally:
        store.close()


def test_fanout_loop_survives_a_failing_sender_and_drops_only_it():
    metrics = Metrics()
    calls = {"n": 0}

    def snapshot():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected: the snapshot could not be made")
        return {"revision": 0, "values": {}}

    pairs = SocketPairs()
    f = Fanout("m", snapshot, metrics, connect=pairs)
    try:
        bad = f.add("bad", "PYRO:viewer.bad@127.0.0.1:9", backlog=None)  # a snapshot is due first: it fails
        wait_until(lambda: len(f) == 0, 10, message="the failing sender dropped")
        good = f.add("good", "PYRO:viewer.good@127.0.0.1:9", backlog=[])
        peer = pairs.peer("viewer.good")
        wait_until(lambda: f.connected == 1, 10, message="the next viewer connected")
        f.publish({"revision": 1, "values": {"v": 1}, "time": 0.0})
        wait_until(lambda: _received(peer), 10, message="the next viewer served")
        assert f.healthy() and f.get(good.id) is good
        assert metrics.registry.get_sample_value("remote_mvc_loop_errors_total", {"loop": "fanout"}) == 1
        assert metrics.registry.get_sample_value("remote_mvc_viewers_dropped_total",
                                                 {"model": "m", "reason": "error"}) == 1
        assert bad.stopped
    finally:
        f.close()
        pairs.close()


def _received(peer):
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


def test_fanout_is_unhealthy_when_its_loop_is_stuck():
    clock = FakeClock()
    release, entered = threading.Event(), threading.Event()

    def snapshot():
        entered.set()
        release.wait(30)  # a snapshot that hangs: the loop is stuck in this turn
        return {"revision": 0, "values": {}}

    pairs = SocketPairs()
    f = Fanout("m", snapshot, Metrics(), clock=clock, connect=pairs)
    try:
        f.add("v", "PYRO:viewer.v@127.0.0.1:9", backlog=None)
        assert f.healthy()
        assert entered.wait(10)  # the loop is inside its turn, stuck
        clock.t += STUCK_AFTER + 1
        assert not f.healthy()
        release.set()
        wait_until(f.healthy, 10, message="turning again")
    finally:
        release.set()
        f.close()
        pairs.close()


def test_reaper_survives_an_unexpected_error(tmp_path):
    from remote_mvc import ExampleModel, ModelServer

    metrics = Metrics()
    clock = FakeClock(50.0)
    fail = threading.Event()

    def monotonic():
        if fail.is_set() and threading.current_thread().name.startswith("lease-reaper"):
            fail.clear()
            raise RuntimeError("injected: the clock failed once, in the reaper")
        return clock()

    store = Store(tmp_path / "s.sqlite3")
    audit = AuditLog(tmp_path / "a.jsonl")
    server = ModelServer("m", ExampleModel, store, audit, metrics, lease_seconds=0.2, monotonic=monotonic).start()
    try:
        server.subscribe("PYRO:viewer.v@127.0.0.1:9", "v")  # in-process: no connection made before it expires
        fail.set()
        wait_until(lambda: metrics.registry.get_sample_value("remote_mvc_loop_errors_total",
                                                             {"loop": "reaper"}) == 1, 10, message="the error")
        clock.t += 10  # the lease ran out: the reaper, still running, drops it
        wait_until(lambda: server.viewers() == [], 10, message="the lease to be reaped")
        assert server.healthy()
    finally:
        server.close()
        store.close()
        audit.close()


@pytest.mark.parametrize("price", [10**400, -(10**400)])
def test_ticker_price_overflow_is_a_validation_error(price):
    from remote_mvc import ValidationError
    from remote_mvc.ticker import TickerModel

    with pytest.raises(ValidationError, match="too large"):
        TickerModel.validate(TickerModel.defaults(), {"price": price})


# a viewer's capability, around its subscribe reply -----------------------------------------------------

def event(revision, value):
    return {"revision": revision, "values": {"value": value}, "time": 0.0}


def test_a_notification_racing_its_subscribe_reply_waits_for_the_capability():
    from remote_mvc import Viewer

    view = Viewer("v", "m", log_values=False, record=True)
    view.expect_capability()  # the host is subscribing: the server may send before its reply arrives
    reply = threading.Timer(0.2, view.accept_capability, ["new"])  # the reply, a moment after the first call
    reply.start()
    forged = []

    def forge():
        try:
            view.notify({"capability": "forged", "events": [event(2, 666)]})
        except Exception as exc:  # noqa: BLE001 - the refusal is what is checked
            forged.append(type(exc).__name__)

    attacker = threading.Thread(target=forge)
    attacker.start()
    view.notify({"capability": "new", "events": [event(1, 1)]})  # waits for the reply instead of refusing
    attacker.join(5)
    reply.join(5)
    assert view.received == [1] and forged == ["PermissionDenied"]
    view.expect_capability()  # a re-subscription: the old capability stays good for calls in flight
    view.accept_capability("newer")
    view.notify({"capability": "new", "events": [event(2, 2)]})
    view.notify({"capability": "newer", "events": [event(3, 3)]})
    assert view.received == [1, 2, 3] and view.capability == "newer"


def test_without_a_reply_the_wait_ends_and_the_notification_is_refused():
    from remote_mvc import PermissionDenied, Viewer

    view = Viewer("v", "m", log_values=False, admit_wait=0.2)
    with pytest.raises(PermissionDenied):  # never subscribed: nothing is accepted
        view.notify({"capability": "x", "events": [event(1, 1)]})
    view.expect_capability()
    with pytest.raises(PermissionDenied):  # the subscription never answered: refused after admit_wait
        view.notify({"capability": "x", "events": [event(1, 1)]})
    assert view.refused == 2 and not view.synced


def test_ticker_clock_survives_an_unexpected_error(tmp_path):
    from remote_mvc import ModelServer
    from remote_mvc.ticker import Ticker, TickerModel

    metrics = Metrics()
    store, audit = Store(tmp_path / "t.sqlite3"), AuditLog(tmp_path / "a.jsonl")
    server = ModelServer("t", TickerModel, store, audit, metrics).start()
    server.modify_local({"interval": 0.02}, "test")
    failed = []

    def wall():
        if not failed:
            failed.append(1)
            raise RuntimeError("injected: the wall clock failed once, in a tick")
        return 42.0

    ticker = Ticker(server, wall=wall, seed=1, metrics=metrics).start()
    try:
        wait_until(lambda: metrics.registry.get_sample_value("remote_mvc_loop_errors_total",
                                                             {"loop": "ticker-clock"}) == 1, 10, message="the error")
        wait_until(lambda: server.query()["tick"] >= 2, 10, message="ticks after the error")
    finally:
        ticker.stop()
        server.close()
        store.close()
        audit.close()


def test_gateway_tender_survives_an_unexpected_error():
    import asyncio

    from remote_mvc.gateway._relay import tend

    metrics = Metrics()
    sweeps = []

    class Feed:  # the tender reads only a feed's clients
        @property
        def clients(self):
            sweeps.append(1)
            if len(sweeps) == 1:
                raise RuntimeError("injected: a feed failed once, in a sweep")
            return []

    async def run():
        task = asyncio.create_task(tend([Feed()], heartbeat=0.2, send_timeout=0.2, metrics=metrics))
        while len(sweeps) < 3 and not task.done():
            await asyncio.sleep(0.01)  # polling the sweeps the tender makes, at its 50 ms period
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(run(), 10))
    assert len(sweeps) >= 3  # it went on after the error
    assert metrics.registry.get_sample_value("remote_mvc_loop_errors_total", {"loop": "gateway-tender"}) == 1
