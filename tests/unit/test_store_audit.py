import json

import pytest

from remote_mvc import AuditLog, Metrics, PersistenceError, read_audit
from remote_mvc._store import Store


def event(rev, **values):
    return {"model": "m", "revision": rev, "time": 1.0, "identity": "t", "changes": {}, "values": values}


def test_commit_load_and_reopen(tmp_path):
    path = tmp_path / "s.sqlite3"
    s = Store(path)
    assert s.load("m") == (0, None)
    for r in range(1, 4):
        s.commit("m", event(r, value=r))
    s.close()
    s = Store(path)
    assert s.load("m") == (3, {"value": 3})
    assert [e["revision"] for e in s.events("m", 1, 10)] == [2, 3]
    assert s.load("other") == (0, None)


def test_history_is_pruned_to_the_limit(tmp_path):
    s = Store(tmp_path / "s.sqlite3", history_limit=50)
    for r in range(1, 201):
        s.commit("m", event(r, value=r))
    assert s.first_revision("m") == 151
    assert len(s.events("m", 0, 1000)) == 50


def test_duplicate_revision_is_refused_and_state_kept(tmp_path):
    s = Store(tmp_path / "s.sqlite3")
    s.commit("m", event(1, value=1))
    with pytest.raises(PersistenceError):
        s.commit("m", event(1, value=99))
    assert s.load("m") == (1, {"value": 1})


def test_unopenable_state_file(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(PersistenceError, match="cannot open"):
        Store(tmp_path / "dir")


def test_audit_records_are_json_lines(tmp_path):
    metrics = Metrics()
    log = AuditLog(tmp_path / "a" / "audit.jsonl", metrics, clock=lambda: 0.0)
    log.record("modify", "ctl", "1.2.3.4:5", "accepted", revision=1, changes={"v": 1})
    log.record("modify", "anonymous", None, "forbidden", error="no")
    records = read_audit(tmp_path / "a" / "audit.jsonl")
    assert [r["result"] for r in records] == ["accepted", "forbidden"]
    assert records[0]["time"] == "1970-01-01T00:00:00.000000+00:00"
    assert records[0]["identity"] == "ctl" and records[0]["changes"] == {"v": 1}
    json.dumps(records)




def test_audit_write_failure_raises_and_counts(tmp_path):
    metrics = Metrics()
    target = tmp_path / "audit.jsonl"
    target.mkdir()  # a directory where the file should be: open() fails even for root
    log = AuditLog(target, metrics)
    with pytest.raises(PersistenceError, match="not writable"):
        log.record("modify", "ctl", None, "accepted")
    assert metrics.registry.get_sample_value("remote_mvc_audit_write_failures_total") == 1
