"""Cluster mode's store and pipeline on a real etcd (one member, on loopback), replicas in-process.

Each test uses its own etcd key prefix, so the module shares one etcd process.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid

import pytest
from kit import etcd_cluster, free_port

from remote_mvc import (
    AuditLog,
    ConflictError,
    ExampleModel,
    HistoryCompacted,
    Metrics,
    ModelServer,
    ServiceUnavailable,
    ValidationError,
)
from remote_mvc.cluster import EtcdPipeline
from remote_mvc.etcd_store import EtcdStore
from remote_mvc.testing import ServiceProcess, wait_until


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    cluster = etcd_cluster(tmp_path_factory.mktemp("etcd1"), size=1)
    yield cluster
    cluster.stop()


@pytest.fixture
def prefix():
    return f"/t-{uuid.uuid4().hex[:8]}"


def replica(etcd, prefix, tmp_path, name="a", history_limit=10000, metrics=None, store_class=EtcdStore):
    store = store_class(etcd.endpoints, prefix, history_limit, timeout=1.0)  # the production default (call_timeout / 3)
    metrics = metrics or Metrics()
    return ModelServer("m", ExampleModel, store, AuditLog(tmp_path / f"audit-{name}.jsonl", metrics), metrics,
                       history_limit=history_limit, call_timeout=3.0).start()


def test_a_change_on_one_replica_reaches_the_other_with_one_gap_free_sequence(etcd, prefix, tmp_path):
    a, b = replica(etcd, prefix, tmp_path, "a"), replica(etcd, prefix, tmp_path, "b")
    try:
        assert a.snapshot()["epoch"] == b.snapshot()["epoch"]
        assert a.modify({"value": 1}) == 1
        assert b.modify({"name": "bee"}) == 2
        assert a.modify({"value": 3}) == 3
        wait_until(lambda: b.snapshot()["revision"] == 3, message="b follows a")
        assert b.query() == {"name": "bee", "value": 3} == a.query()
        assert [e["revision"] for e in b.history(0)] == [1, 2, 3] == [e["revision"] for e in a.history(0)]
        assert a.history(0) == b.history(0)  # the same events, epoch included
        assert a.snapshot()["stale"] is False
    finally:
        a.close(), b.close()


def test_request_ids_are_exactly_once_across_replicas(etcd, prefix, tmp_path):
    a, b = replica(etcd, prefix, tmp_path, "a"), replica(etcd, prefix, tmp_path, "b")
    try:
        first = a.modify({"value": 7}, request_id="req-1")
        assert b.modify({"value": 8}, request_id="req-1") == first  # a retry through another replica
        assert a.modify({"value": 9}, request_id="req-1") == first
        wait_until(lambda: b.snapshot()["revision"] == first)
        assert b.query()["value"] == 7 and len(b.history(0)) == 1
    finally:
        a.close(), b.close()


def test_a_retry_racing_on_two_replicas_is_applied_once(etcd, prefix, tmp_path):
    a, b = replica(etcd, prefix, tmp_path, "a"), replica(etcd, prefix, tmp_path, "b")
    try:
        results = {}

        def write(k, server, rid, value):
            results[(rid, k)] = server.modify({"value": value}, request_id=rid)

        for i in range(20):
            rid = f"race-{i}"
            threads = [threading.Thread(target=write, args=(k, s, rid, i)) for k, s in enumerate((a, b))]
            [t.start() for t in threads]
            [t.join() for t in threads]
            assert results[(rid, 0)] == results[(rid, 1)]
        assert a.snapshot()["revision"] == 20 and len(a.history(0)) == 20
    finally:
        a.close(), b.close()


def test_expected_revision_keeps_its_meaning_across_replicas(etcd, prefix, tmp_path):
    a, b = replica(etcd, prefix, tmp_path, "a"), replica(etcd, prefix, tmp_path, "b")
    try:
        a.modify({"value": 1})
        wait_until(lambda: b.snapshot()["revision"] == 1)
        assert b.modify({"value": 2}, expected_revision=1) == 2
        with pytest.raises(ConflictError):
            a.modify({"value": 3}, expected_revision=1)
        with pytest.raises(ValidationError):
            a.modify({"value": "x"})
        assert a.query()["value"] == 2
    finally:
        a.close(), b.close()


def test_concurrent_writers_on_two_replicas_lose_nothing_and_share_transactions(etcd, prefix, tmp_path):
    metrics = Metrics()
    a, b = replica(etcd, prefix, tmp_path, "a", metrics=metrics), replica(etcd, prefix, tmp_path, "b")
    acked: list[tuple[int, int]] = []
    lock = threading.Lock()

    def write(server, base):
        for i in range(25):
            revision = server.modify({"value": base + i})
            with lock:
                acked.append((revision, base + i))

    threads = [threading.Thread(target=write, args=(s, k * 1000)) for k, s in enumerate((a, b, a, b, a, b))]
    try:
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert len(acked) == 150
        wait_until(lambda: b.snapshot()["revision"] == 150 and a.snapshot()["revision"] == 150)
        events = {e["revision"]: e for e in a.history(0)}
        assert sorted(events) == list(range(1, 151))
        assert all(events[r]["values"]["value"] == v for r, v in acked)
        batches = metrics.registry.get_sample_value("remote_mvc_commit_batch_size_count", {"model": "m"})
        assert batches < 75  # three writers on a: their changes shared transactions
    finally:
        a.close(), b.close()


def test_history_is_pruned_in_etcd_with_the_history_compacted_contract(etcd, prefix, tmp_path):
    a = replica(etcd, prefix, tmp_path, "a", history_limit=50)
    try:
        for i in range(130):
            a.modify({"value": i})
        # pruned after revision 100, down to what the limit keeps at that moment (and never more)
        first = wait_until(lambda: (a.pipeline.store.first_revision("m") or 1) - 1, message="events pruned") + 1
        assert 51 <= first <= 81
        with pytest.raises(HistoryCompacted):
            a.history(10)
        assert [e["revision"] for e in a.history(100)] == list(range(101, 131))
        kvs, _, _ = a.pipeline.store.range(f"{prefix}/m/requests/", f"{prefix}/m/requests0", keys_only=True)
        assert len(kvs) == 131 - first  # request ids go with their events
    finally:
        a.close()


class _FirstPruneLost(EtcdStore):
    """etcd as it is, except that the first pruning transaction (deletes only) gets no answer."""

    lost = 0

    def txn(self, compare, success, failure, deadline=None):
        if not self.lost and success and all("request_delete_range" in op for op in success):
            self.lost += 1
            raise ServiceUnavailable("no answer from etcd (injected)")
        return super().txn(compare, success, failure, deadline)


def test_a_prune_etcd_did_not_answer_is_tried_again(etcd, prefix, tmp_path):
    a = replica(etcd, prefix, tmp_path, "a", history_limit=50, store_class=_FirstPruneLost)
    store = a.pipeline.store
    try:
        for i in range(130):
            a.modify({"value": i})
        # not left until revision 200 (which never comes): tried again, and pruned
        first = wait_until(lambda: (store.first_revision("m") or 1) - 1, message="events pruned") + 1
        assert store.lost == 1 and 51 <= first <= 81
        assert [e["revision"] for e in a.history(100)] == list(range(101, 131))
    finally:
        a.close()


def test_a_watch_that_etcd_compacted_catches_up_from_the_events_it_missed(etcd, prefix, tmp_path):
    a = replica(etcd, prefix, tmp_path, "a")
    store = EtcdStore(etcd.endpoints, prefix, timeout=0.5)
    behind = EtcdPipeline("m", ExampleModel, store, AuditLog(tmp_path / "audit-p.jsonl"), Metrics())
    seen = []
    behind.publish = seen.append
    try:
        for i in range(20):
            a.modify({"value": i})
        _, _, now = store.get(f"{prefix}/m/head")
        store.compact(now)  # etcd's MVCC history is gone past where `behind` watches from
        behind.start()
        assert behind.wait_applied(20, 10)
        assert [e["revision"] for e in seen] == list(range(1, 21))
    finally:
        behind.close(), a.close()


def test_a_replica_whose_history_was_pruned_under_it_reloads_and_resets_its_viewers(etcd, prefix, tmp_path):
    a = replica(etcd, prefix, tmp_path, "a", history_limit=20)
    store = EtcdStore(etcd.endpoints, prefix, 20, timeout=0.5)
    behind = EtcdPipeline("m", ExampleModel, store, AuditLog(tmp_path / "audit-p.jsonl"), Metrics(),
                          history_limit=20)
    resets, seen = [], []
    behind.on_reset, behind.publish = resets.append, seen.append
    try:
        for i in range(110):
            a.modify({"value": i})
        wait_until(lambda: store.first_revision("m") > 1, message="history pruned")
        _, _, now = store.get(f"{prefix}/m/head")
        store.compact(now)
        behind.start()
        assert behind.wait_applied(110, 10)
        assert resets == ["gap"] and seen == []  # a snapshot for its viewers, never a silent jump
        assert behind.snapshot()["values"]["value"] == 109
    finally:
        behind.close(), a.close()


def test_a_replica_that_cannot_reach_etcd_at_start_up_exits_for_its_supervisor(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("MVC_")}
    env.update({"MVC_STORE": dead, "MVC_CALL_TIMEOUT": "0.5", "MVC_STATE_DIR": str(tmp_path),
                "MVC_METRICS_PORT": "-1", "MVC_NS_PORT": str(free_port())})
    proc = ServiceProcess([sys.executable, "-m", "remote_mvc_services.model.main"], env).start()
    try:
        assert proc.proc.wait(30) == 3
        proc.wait_for_log(lambda r: r.get("event") == "start_failed" and "etcd" in r.get("error", ""), 5)
    finally:
        proc.kill()
