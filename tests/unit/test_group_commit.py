"""Group commit: changes validated while another is being written share the next write's one fsync.

Each test holds the first write inside its audit fsync (a gate), queues more changes behind it from
other threads, then lets it go; nothing here depends on timing.
"""

import threading

import pytest

from remote_mvc import (
    AuditLog,
    ConflictError,
    ExampleModel,
    Metrics,
    ModelServer,
    PersistenceError,
    read_audit,
)
from remote_mvc._store import Store
from remote_mvc.testing import wait_until


def make(tmp_path, metrics=None, audit=None):
    metrics = metrics or Metrics()
    audit = audit or AuditLog(tmp_path / "audit.jsonl", metrics)
    return ModelServer("m", ExampleModel, Store(tmp_path / "state.sqlite3"), audit, metrics, clock=lambda: 123.0).start()


class Gate(AuditLog):
    """An audit log that holds its first write until opened; records the size of every write, and
    can make the held write fail."""

    def __init__(self, path, metrics=None, fail_first=False):
        super().__init__(path, metrics)
        self.sizes = []
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.fail_first = fail_first

    def record_many(self, records):
        self.sizes.append(len(records))
        if len(self.sizes) == 1:
            self.entered.set()
            assert self.opened.wait(10)
            if self.fail_first:
                raise PersistenceError("audit log not writable: No space left on device")
        return super().record_many(records)


def gated(tmp_path, metrics=None, fail_first=False):
    """A started model server whose audit log is a :class:`Gate`."""
    metrics = metrics or Metrics()
    gate = Gate(tmp_path / "audit.jsonl", metrics, fail_first)
    return make(tmp_path, metrics, gate), gate


def run(target, *args, **kwargs):
    """Call in a thread; the thread's ``outcome`` is the return value or the exception."""
    t = threading.Thread(target=lambda: setattr(t, "outcome", _call(target, *args, **kwargs)))
    t.start()
    return t


def _call(target, *args, **kwargs):
    try:
        return target(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return exc


def test_changes_queued_during_a_write_are_made_durable_together_with_one_fsync(tmp_path):
    metrics = Metrics()
    m, gate = gated(tmp_path, metrics)
    first = run(m.modify, {"value": 100}, request_id="r0")
    assert gate.entered.wait(10)  # the first change is in its fsync...
    others = [run(m.modify, {"value": i}, request_id=f"r{i}") for i in range(1, 8)]
    wait_until(lambda: len(m.pipeline.queue) == 7, message="seven changes queued behind it")
    syncs = gate.syncs
    gate.opened.set()
    for t in [first, *others]:
        t.join(10)
    assert gate.sizes == [1, 7]
    assert gate.syncs - syncs == 2  # eight changes, two fsyncs
    revisions = {t.outcome: t for t in [first, *others]}
    assert sorted(revisions) == list(range(1, 9))  # each caller told its own revision, gap-free
    history = m.history(0)
    assert [e["revision"] for e in history] == list(range(1, 9))
    for value, t in zip([100, *range(1, 8)], [first, *others], strict=True):  # the revision each caller
        assert history[t.outcome - 1]["values"]["value"] == value  # was told holds the value it set
    accepted = [r for r in read_audit(tmp_path / "audit.jsonl") if r["result"] == "accepted"]
    assert sorted(r["revision"] for r in accepted) == list(range(1, 9))  # one record each
    assert metrics.registry.get_sample_value("remote_mvc_commit_batch_size_count", {"model": "m"}) == 2
    assert metrics.registry.get_sample_value("remote_mvc_commit_batch_size_sum", {"model": "m"}) == 8
    m.close()
    m.pipeline.store.close()
    m2 = make(tmp_path)  # and all of it survives a restart
    assert m2.snapshot()["revision"] == 8 and [e["revision"] for e in m2.history(0)] == list(range(1, 9))
    m2.close()


def test_a_queued_change_is_validated_against_the_changes_ahead_of_it(tmp_path):
    m, gate = gated(tmp_path)
    first = run(m.modify, {"value": 1})
    assert gate.entered.wait(10)
    with pytest.raises(ConflictError, match="model is at 1"):  # revision 1 is on its way: 0 is stale
        m.modify({"value": 2}, expected_revision=0)
    second = run(m.modify, {"value": 2}, expected_revision=1)
    wait_until(lambda: len(m.pipeline.queue) == 1)
    assert m.query()["value"] == 0  # nothing is visible before it is durable
    gate.opened.set()
    first.join(10)
    second.join(10)
    assert (first.outcome, second.outcome) == (1, 2)
    assert m.history(0)[1]["changes"] == {"value": {"old": 1, "new": 2}}
    m.close()


def test_a_retry_while_the_first_try_is_being_written_gets_the_same_revision(tmp_path):
    m, gate = gated(tmp_path)
    waiting = []  # the changes whose threads went on to wait for the disk
    commit = m.pipeline.commit
    m.pipeline.commit = lambda pending: (waiting.append(pending), commit(pending))[1]
    first = run(m.modify, {"value": 5}, request_id="same")
    assert gate.entered.wait(10)
    retry = run(m.modify, {"value": 5}, request_id="same")
    wait_until(lambda: len(waiting) == 2, message="the retry to wait")
    assert waiting[0] is waiting[1]  # for the first try, not as a change of its own
    gate.opened.set()
    first.join(10)
    retry.join(10)
    assert first.outcome == retry.outcome == 1
    assert m.snapshot()["revision"] == 1 and len(m.history(0)) == 1
    m.close()


def test_a_write_that_fails_refuses_its_changes_and_every_change_queued_behind_it(tmp_path):
    metrics = Metrics()
    m, gate = gated(tmp_path, metrics, fail_first=True)
    first = run(m.modify, {"value": 1}, request_id="a")
    assert gate.entered.wait(10)
    behind = [run(m.modify, {"value": i}, request_id=f"b{i}") for i in (2, 3)]
    wait_until(lambda: len(m.pipeline.queue) == 2)
    gate.opened.set()
    for t in [first, *behind]:
        t.join(10)
    assert isinstance(first.outcome, PersistenceError) and "No space left" in str(first.outcome)
    for t in behind:  # validated on top of a change that never happened: refused too
        assert isinstance(t.outcome, PersistenceError)
        assert "a change before it could not be made durable" in str(t.outcome)
    assert m.snapshot()["revision"] == 0 and m.query()["value"] == 0 and m.history(0) == []
    assert m.pipeline.store.load("m") == (0, None)
    refusals = [r for r in read_audit(tmp_path / "audit.jsonl") if r["result"] == "audit_failed"]
    assert sorted(r["changes"]["value"] for r in refusals) == [2, 3]  # their attempts are on record
    assert metrics.registry.get_sample_value("remote_mvc_modifications_total",
                                             {"model": "m", "result": "audit_failed"}) == 3
    assert m.modify({"value": 9}, request_id="b2") == 1  # then all is as before; a retry is a new change
    assert m.query()["value"] == 9
    m.close()
