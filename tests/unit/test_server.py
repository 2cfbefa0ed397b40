"""ModelServer in process: validation, revisions, durability, audit, history, dedupe."""

import pytest

from remote_mvc import (
    AuditLog,
    ConflictError,
    ExampleModel,
    HistoryCompacted,
    Metrics,
    ModelServer,
    PersistenceError,
    ValidationError,
    read_audit,
)
from remote_mvc.store import SQLiteStore


def make(tmp_path, metrics=None, **kw):
    metrics = metrics or Metrics()
    store = SQLiteStore(tmp_path / "state.sqlite3", kw.get("history_limit", 10000))
    audit = AuditLog(tmp_path / "audit.jsonl", metrics)
    return ModelServer("m", ExampleModel, store, audit, metrics, clock=lambda: 123.0, **kw).start()


def test_modify_bumps_revision_and_records_an_event(tmp_path):
    m = make(tmp_path)
    assert m.query() == {"name": "xxx", "value": 0}
    assert m.snapshot()["revision"] == 0
    assert m.modify({"name": "newname"}) == 1
    assert m.modify({"value": 99}) == 2
    assert m.modify({"name": "both", "value": 1}) == 3
    assert m.query() == {"name": "both", "value": 1}
    events = m.history(0)
    assert [e["revision"] for e in events] == [1, 2, 3]
    assert events[1]["changes"] == {"value": {"old": 0, "new": 99}}
    assert events[1]["values"] == {"name": "newname", "value": 99}
    assert events[1]["time"] == 123.0 and events[1]["identity"] == "local"
    assert m.history(2) == events[2:]
    assert m.history(3) == []
    m.close()


@pytest.mark.parametrize("bad", [{}, {"nope": 1}, {"value": "1"}, {"value": None}, [1], "x", None,
                                 {"name": "x" * 201}])
def test_invalid_changes_change_nothing(tmp_path, bad):
    metrics = Metrics()
    m = make(tmp_path, metrics)
    m.modify({"value": 5})
    with pytest.raises(ValidationError):
        m.modify(bad)
    assert m.snapshot()["revision"] == 1 and m.query()["value"] == 5
    assert len(m.history(0)) == 1
    results = [r["result"] for r in read_audit(tmp_path / "audit.jsonl")]
    assert results == ["accepted", "invalid"]
    assert metrics.registry.get_sample_value("remote_mvc_modifications_total",
                                             {"model": "m", "result": "invalid"}) == 1
    m.close()


def test_expected_revision_conflict(tmp_path):
    m = make(tmp_path)
    assert m.modify({"value": 1}, expected_revision=0) == 1
    with pytest.raises(ConflictError, match="expected revision 0, model is at 1"):
        m.modify({"value": 2}, expected_revision=0)
    assert m.query()["value"] == 1
    m.close()


def test_restart_restores_values_revision_and_history(tmp_path):
    m = make(tmp_path)
    for i in range(1, 6):
        m.modify({"value": i})
    m.close()
    m.pipeline.store.close()
    m2 = make(tmp_path)
    assert m2.snapshot()["revision"] == 5 and m2.query() == {"name": "xxx", "value": 5}
    assert [e["revision"] for e in m2.history(2)] == [3, 4, 5]
    assert m2.modify({"value": 6}) == 6
    m2.close()


def test_request_id_makes_retries_apply_once_even_across_restart(tmp_path):
    m = make(tmp_path)
    assert m.modify({"value": 1}, request_id="r1") == 1
    assert m.modify({"value": 1}, request_id="r1") == 1
    assert m.snapshot()["revision"] == 1
    m.close()
    m.pipeline.store.close()
    m2 = make(tmp_path)
    assert m2.modify({"value": 1}, request_id="r1") == 1
    assert m2.modify({"value": 2}, request_id="r2") == 2
    with pytest.raises(ValidationError):
        m2.modify({"value": 3}, request_id=["not", "a", "string"])
    m2.close()


def test_history_compacted_when_it_no_longer_reaches_back(tmp_path):
    m = make(tmp_path, history_limit=3)
    for i in range(1, 7):
        m.modify({"value": i})
    assert [e["revision"] for e in m.history(3)] == [4, 5, 6]
    with pytest.raises(HistoryCompacted) as info:
        m.history(1)
    assert info.value.first_revision == 4
    with pytest.raises(ValidationError):
        m.history("0")
    m.close()


def test_commit_failure_is_refused_and_not_applied(tmp_path):
    metrics = Metrics()
    m = make(tmp_path, metrics)
    m.modify({"value": 1})
    m.pipeline.store.close()  # the disk is gone
    with pytest.raises(PersistenceError):
        m.modify({"value": 2})
    assert m.query()["value"] == 1 and m.snapshot()["revision"] == 1
    assert [r["result"] for r in read_audit(tmp_path / "audit.jsonl")] == ["accepted", "accepted", "failed"]
    assert metrics.registry.get_sample_value("remote_mvc_modifications_total",
                                             {"model": "m", "result": "persist_failed"}) == 1
    m.close()
    m2 = make(tmp_path)  # the failed record cancels the accepted one: nothing rolled forward
    assert m2.snapshot()["revision"] == 1 and m2.query()["value"] == 1
    m2.close()


def test_a_failed_commit_whose_failure_cannot_be_recorded_is_reported_as_undecided(tmp_path):
    m = make(tmp_path)
    m.modify({"value": 1})
    m.pipeline.store.close()  # the state disk is gone...
    real = m.pipeline.audit.record_many

    def record_many(records):
        if any(result == "failed" for _, _, _, result, _ in records):  # ...and the audit disk is full
            raise PersistenceError("audit log not writable: No space left on device")  # by the time the
        return real(records)  # failure is recorded

    m.pipeline.audit.record_many = record_many
    with pytest.raises(PersistenceError, match="may still be applied when the server restarts"):
        m.modify({"value": 2}, request_id="r2")
    assert m.query()["value"] == 1
    m2 = _restart(m, tmp_path)  # the accepted record stands alone: rolled forward
    assert m2.snapshot()["revision"] == 2
    assert m2.modify({"value": 2}, request_id="r2") == 2  # the controller's retry learns it was applied
    m2.close()


def test_audit_failure_refuses_the_change(tmp_path):
    m = make(tmp_path)
    m.pipeline.audit.close()
    m.pipeline.audit.path = tmp_path  # a directory: the audit log cannot be written
    with pytest.raises(PersistenceError, match="audit"):
        m.modify({"value": 2})
    assert m.snapshot()["revision"] == 0 and m.pipeline.store.load("m") == (0, None)
    m.close()


def _restart(m, tmp_path, **kw):
    m.close()
    m.pipeline.store.close()
    return make(tmp_path, **kw)


def test_restart_after_a_crash_between_audit_and_commit_rolls_the_change_forward(tmp_path):
    m = make(tmp_path)
    m.modify({"value": 1})
    # the crash: the record of revision 2 is written (and fsynced), the commit never happens
    m.pipeline.audit.record("modify", "controller", "10.0.0.9:5", "accepted", model="m", changes={"value": 2},
                    revision=2, request="r2")
    m2 = _restart(m, tmp_path)
    assert m2.snapshot()["revision"] == 2 and m2.query()["value"] == 2
    event = m2.history(1)[0]
    assert event["request"] == "r2" and event["identity"] == "controller"
    assert event["changes"] == {"value": {"old": 1, "new": 2}}
    assert m2.modify({"value": 2}, request_id="r2") == 2  # the controller's retry: applied once
    assert [(r["result"], r["revision"]) for r in read_audit(tmp_path / "audit.jsonl")] == [
        ("accepted", 1), ("accepted", 2)]
    m3 = _restart(m2, tmp_path)  # committed now: a second start applies nothing again
    assert m3.snapshot()["revision"] == 2 and [e["revision"] for e in m3.history(0)] == [1, 2]
    m3.close()


def test_a_state_file_that_lost_its_unsynced_tail_is_restored_from_the_audit_log(tmp_path):
    import sqlite3

    m = make(tmp_path)
    for v in (1, 2, 3):
        m.modify({"value": v}, request_id=f"r{v}")
    m.modify({"name": "last"})
    m.close()
    m.pipeline.store.close()
    # a power loss: the audited commits were not fsynced; the state file is back at revision 1
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    db.execute("DELETE FROM events WHERE revision > 1")
    db.execute("""UPDATE state SET revision = 1, vals = '{"name": "xxx", "value": 1}'""")
    db.commit()
    db.close()
    m2 = make(tmp_path)
    assert m2.snapshot()["revision"] == 4 and m2.query() == {"name": "last", "value": 3}
    assert [e["values"] for e in m2.history(0)] == [
        {"name": "xxx", "value": 1}, {"name": "xxx", "value": 2}, {"name": "xxx", "value": 3},
        {"name": "last", "value": 3}]
    assert m2.pipeline.store.load("m") == (4, {"name": "last", "value": 3})  # and committed again
    assert m2.modify({"value": 3}, request_id="r3") == 3  # request ids restored with the history
    m2.close()


def test_an_audited_change_that_cannot_be_applied_at_start_up_is_recorded_as_failed(tmp_path):
    m = make(tmp_path)
    m.modify({"value": 1})
    m.pipeline.audit.record("modify", "controller", None, "accepted", model="m", changes={"value": "x"}, revision=2)
    m.pipeline.audit.record("modify", "controller", None, "accepted", model="m", changes={"value": 3}, revision=3)
    m2 = _restart(m, tmp_path)
    assert m2.snapshot()["revision"] == 1  # nothing past the change that failed
    records = read_audit(tmp_path / "audit.jsonl")
    assert [(r["result"], r["revision"]) for r in records] == [
        ("accepted", 1), ("accepted", 2), ("accepted", 3), ("failed", 2)]
    assert "not applied at start-up" in records[-1]["error"]
    assert m2.modify({"value": 5}) == 2  # revision 2 is taken by the next change
    m3 = _restart(m2, tmp_path)  # whose record is the last of revision 2: nothing to roll forward
    assert m3.snapshot()["revision"] == 2 and m3.query()["value"] == 5
    m3.close()


def test_a_constructed_server_runs_nothing_until_started_and_a_with_block_closes_it(tmp_path):
    import threading

    metrics = Metrics()
    store, audit = SQLiteStore(tmp_path / "state.sqlite3"), AuditLog(tmp_path / "audit.jsonl", metrics)
    before = set(threading.enumerate())
    server = ModelServer("m", ExampleModel, store, audit, metrics)
    assert set(threading.enumerate()) - before == set()  # no thread from the constructor
    assert not server.healthy()  # its reaper is not running yet
    with server as same:
        assert same is server and server.healthy()
        assert any(t.name == "lease-reaper-m" for t in threading.enumerate())
        assert server.start() is server  # idempotent
        assert server.modify({"value": 3}) == 1
    assert not server.healthy()
