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


def test_a_state_file_of_the_earlier_schema_is_read_and_written_on(tmp_path):
    """State files made before the events table became WITHOUT ROWID (and before the state row was
    upserted) keep their schema: the same statements read and extend them."""
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE state (model TEXT PRIMARY KEY, revision INTEGER NOT NULL, vals TEXT NOT NULL);
        CREATE TABLE events (model TEXT NOT NULL, revision INTEGER NOT NULL, event TEXT NOT NULL,
                             PRIMARY KEY (model, revision));""")
    db.execute("INSERT INTO state VALUES ('m', 1, ?)", (json.dumps({"value": 1}),))
    db.execute("INSERT INTO events VALUES ('m', 1, ?)", (json.dumps(event(1, value=1)),))
    db.commit()
    db.close()
    s = Store(path)
    assert s.load("m") == (1, {"value": 1})
    s.commit_many("m", [event(2, value=2), event(3, value=3)], fsync=False)
    s.close()
    s = Store(path)
    assert s.load("m") == (3, {"value": 3})
    assert [e["revision"] for e in s.events("m", 0, 10)] == [1, 2, 3]
    s.close()


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


def test_only_commits_not_made_durable_elsewhere_are_fsynced(tmp_path):
    s = Store(tmp_path / "s.sqlite3")

    def synchronous():
        return s.pragma("synchronous")

    s.commit("m", event(1, value=1))
    assert synchronous() == 2  # FULL: the WAL is fsynced at the commit
    s.commit("m", event(2, value=2), fsync=False)
    assert synchronous() == 1  # NORMAL: an audited change, durable by its audit record
    s.commit("m", event(3, value=3))
    assert synchronous() == 2
    assert s.load("m") == (3, {"value": 3})


def test_the_wal_is_checkpointed_by_the_stores_thread_not_inside_a_commit(tmp_path):
    import os

    path = tmp_path / "s.sqlite3"
    s = Store(path, checkpoint_every=50)
    assert s.pragma("wal_autocheckpoint") == 0  # no commit checkpoints
    before = os.path.getsize(path)
    for r in range(1, 121):
        s.commit("m", event(r, value=r, pad="x" * 500), fsync=False)
        if r in (50, 100):  # one per 50 commits (each covers every commit before it started)
            assert s.wait_checkpoints(r // 50, 10.0)
    assert os.path.getsize(path) > before  # the pages were copied into the database file
    assert s.load("m")[0] == 120
    s.close()
    assert not s.checkpointing
    assert Store(path).load("m")[0] == 120


def test_the_checkpointer_starts_in_start_or_at_the_first_commit_never_in_the_constructor(tmp_path):
    """A store only read runs no thread; ``with`` starts the checkpointer and stops it; the first
    commit starts it for an owner that did not."""
    path = tmp_path / "s.sqlite3"
    reader = Store(path)
    assert not reader.checkpointing and reader.load("m") == (0, None)
    assert not reader.checkpointing
    reader.close()
    with Store(path, checkpoint_every=1) as s:
        assert s.checkpointing
        assert s.start() is s and s.checkpointing  # idempotent
        s.commit("m", event(1, value=1))
        assert s.wait_checkpoints(1, 10.0)
    assert not s.checkpointing
    lazy = Store(path, checkpoint_every=1)
    try:
        assert not lazy.checkpointing
        lazy.commit("m", event(2, value=2))
        assert lazy.checkpointing and lazy.wait_checkpoints(1, 10.0)
    finally:
        lazy.close()
    assert not lazy.checkpointing
    memory = Store(":memory:")
    memory.commit("m", event(1, value=1))
    assert not memory.checkpointing and memory.pragma("journal_mode") == "memory"
    memory.close()
    with pytest.raises(ValueError):
        lazy.pragma("synchronous; DROP TABLE state")


def test_unapplied_records_are_the_accepted_ones_past_a_revision_in_order(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", clock=lambda: 0.0)
    for r in range(1, 41):
        log.record("modify", "ctl", None, "accepted", model="m", revision=r, changes={"v": r})
        log.record("modify", "ctl", None, "accepted", model="other", revision=r, changes={"v": r})
        log.record("modify", "ctl", None, "invalid", model="m", error="no")
    log.record("modify", "ctl", None, "failed", model="m", revision=38, error="disk full")
    log.record("modify", "ctl", None, "accepted", model="m", revision=38, changes={"v": "again"})
    log.record("modify", "ctl", None, "failed", model="m", revision=40, error="disk full")
    assert [r["revision"] for r in log.unapplied("m", 35)] == [36, 37, 38, 39]  # 40 was cancelled
    assert log.unapplied("m", 35)[2]["changes"] == {"v": "again"}  # the last record of a revision wins
    assert log.unapplied("m", 40) == [] and log.unapplied("nobody", 0) == []
    assert [r["revision"] for r in log.unapplied("other", 0)] == list(range(1, 41))
    # read backwards a small chunk at a time: records cut by a chunk boundary are put back together
    assert log.modifies_after("m", 30, chunk=50) == log.modifies_after("m", 30)
    assert [r["revision"] for r in log.modifies_after("other", 30, chunk=37)] == list(range(31, 41))


def test_unapplied_stops_at_a_missing_revision_and_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, clock=lambda: 0.0)
    for r in (1, 2, 4):
        log.record("modify", "ctl", None, "accepted", model="m", revision=r, changes={"v": r})
    with open(path, "a") as f:
        f.write('{"action": "modify", "model": "m", "revision": 3, "res')  # killed mid-write
    assert [r["revision"] for r in log.unapplied("m", 0)] == [1, 2]
    assert AuditLog(tmp_path / "none.jsonl").unapplied("m", 0) == []
    again = AuditLog(path, clock=lambda: 0.0)  # the restarted server: its records are not glued to the torn one
    again.record("modify", "ctl", None, "accepted", model="m", revision=3, changes={"v": 3})
    assert [r["revision"] for r in again.unapplied("m", 0)] == [1, 2, 3, 4]


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


def test_a_wal_over_its_size_limit_is_emptied_by_a_truncate_checkpoint(tmp_path):
    """Checkpoint by WAL size: PASSIVE checkpoints never shrink the file; past wal_limit the
    checkpointer runs a TRUNCATE one and the file is empty again."""
    s = Store(tmp_path / "s.sqlite3", checkpoint_every=10**9, wal_limit=64 * 1024)
    try:
        r = 0
        while s.wal_size() < 64 * 1024:
            r += 1
            s.commit("m", event(r, name="x" * 300, value=r))
            assert r < 1000, "the WAL never grew"
        assert s.wait_checkpoints(1, 10.0)
        assert s.truncations == 1 and s.wal_size() == 0
        s.commit("m", event(r + 1, value=r + 1))
        assert s.load("m") == (r + 1, {"value": r + 1})
    finally:
        s.close()


def test_under_the_size_limit_the_wal_is_not_truncated(tmp_path):
    s = Store(tmp_path / "s.sqlite3", checkpoint_every=5, wal_limit=10**9)
    try:
        for r in range(1, 6):
            s.commit("m", event(r, value=r))
        assert s.wait_checkpoints(1, 10.0)
        assert s.truncations == 0 and s.wal_size() > 0  # PASSIVE: copied, the file kept for reuse
    finally:
        s.close()
