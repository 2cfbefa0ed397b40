"""Cluster mode's commit pipeline: the model's state in etcd, any number of replicas.

Every replica writes through etcd transactions (see :mod:`remote_mvc.etcd_store`
for the keys) and applies only what etcd's watch tells it, so every replica, and
so every viewer, sees one sequence of revisions, its own writes in the same place
as everyone else's.

The way of a change (:meth:`EtcdPipeline.commit`): the server validated it against
this replica's applied state; the committer takes every change queued by then
(a group commit), validates them again, in order, on top of the head it last
knew, gives them consecutive revisions and writes them in ONE transaction:
events, audit records, request ids and the new head, guarded by compares on the
head's mod revision, the epoch and the absence of each request id. When the
compare fails (another replica wrote first) the failure branch brings the new
head and the request ids that exist: changes whose request id is already there
are answered with the revision it produced (exactly-once across replicas), the
rest are validated again on the new head and tried again. A call that gets no
answer has an unknown outcome: it is tried again (the compares make that safe)
until the deadline, and then refused with ServiceUnavailable, saying to retry
with the same request id. Nothing is acknowledged before etcd answered the
transaction (durable on a majority of members); the acknowledgement waits for
this replica's watch to apply the revision (read-your-writes), at most
``call_timeout``.

The follower thread watches ``epoch`` and ``events/`` from the last etcd revision
it applied. A watch that ends (a read time-out: nothing new for a second, or a
broken connection) is followed by a linearizable read of the head (a probe): its
success is what keeps the replica "fresh"; a probe that fails, or none for
``stale_after`` seconds, makes the replica stale (``query`` refuses, ``snapshot``
says ``stale``). Missed events are read back from ``events/`` by range (they
outlive etcd's MVCC compaction, so a compacted watch loses nothing); when our own
history pruning removed some of them (a replica far behind), or the epoch
changed (the etcd data was wiped and recreated), the replica reloads the model
and its viewers resubscribe and get a snapshot.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

from .audit import AuditLog
from .commit import Pending, Pipeline
from .errors import ConflictError, MVCError, PersistenceError, ServiceUnavailable, ValidationError
from .etcd_store import EtcdStore, b64, prefix_end, rev_key, unb64
from .logs import log_event
from .metrics import Metrics
from .model import Model

__all__ = ["EtcdPipeline", "MAX_BATCH"]

log = logging.getLogger("remote_mvc.cluster")

MAX_BATCH = 32  # changes per transaction: 3 puts each + the head stay under etcd's 128 operations


class _Head(NamedTuple):
    """What the next transaction is based on."""

    revision: int
    values: dict[str, Any]
    mod_revision: int  # etcd mod revision of the head key (0: never written)
    epoch: str


class _Resync(Exception):
    """The watch cannot go on from where it is: read back from etcd."""


class EtcdPipeline(Pipeline):
    """A model replica's state, followed from etcd, and its writes through guarded transactions."""

    def __init__(self, name: str, schema: type[Model], store: EtcdStore, audit: AuditLog, metrics: Metrics, *,
                 history_limit: int = 10000, clock: Callable[[], float] = time.time, call_timeout: float = 3.0,
                 probe_interval: float = 1.0, stale_after: float = 3.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name, schema, audit, metrics, history_limit=history_limit, clock=clock)
        self.store = store
        self.call_timeout = call_timeout
        self.probe_interval = probe_interval  # the watch's read time-out: how often an idle replica probes
        self.stale_after = stale_after
        self.monotonic = monotonic
        self.history_limit = history_limit
        self.k_epoch = store.key(name, "epoch")
        self.k_head = store.key(name, "head")
        self.k_events = store.key(name, "events/")
        self.k_audit = store.key(name, "audit/")
        self.k_requests = store.key(name, "requests/")
        self._applied_cond = threading.Condition(self.lock)
        self._etcd_revision = 0  # the etcd store revision applied up to
        self._last_contact = monotonic()
        self._failing = False
        self._base: _Head | None = None  # what the committer compares against (None: read it)
        # an extra compare for this process's own (unaudited) changes: the ticker's election fence
        self.fence: Callable[[], dict[str, Any]] | None = None
        self._stop = threading.Event()
        self._resync = False
        self._compact_due = threading.Event()
        self._stream_lock = threading.Lock()
        self._stream: Any = None
        self._lag = metrics.watch_lag.labels(name)
        self._etcd_gauge = metrics.etcd_revision.labels(name)
        self._stale_gauge = metrics.stale.labels(name)
        self._conflicts = metrics.txn_conflicts.labels(name)
        self._retries = metrics.txn_retries.labels(name)
        self._load_at_start()
        self._threads = [threading.Thread(target=self._follow, name=f"etcd-follower-{name}", daemon=True),
                         threading.Thread(target=self._compactor, name=f"etcd-compactor-{name}", daemon=True)]

    # state ----------------------------------------------------------------------------
    @property
    def stale(self) -> bool:
        """True while this replica may be behind etcd (no contact for ``stale_after``, or failing)."""
        stale = self._failing or self.monotonic() - self._last_contact > self.stale_after
        self._stale_gauge.set(1 if stale else 0)
        return stale

    def wait_applied(self, revision: int, timeout: float) -> bool:
        """Block until ``revision`` is applied here, at most ``timeout`` seconds; False on timeout."""
        with self._applied_cond:
            return self._applied_cond.wait_for(lambda: self.revision >= revision, timeout)

    @property
    def etcd_revision(self) -> int:
        """The etcd store revision this replica has applied up to (tests, metrics)."""
        return self._etcd_revision

    def _contact(self) -> None:
        self._last_contact = self.monotonic()
        self._failing = False

    def _load_at_start(self) -> None:
        """The model as etcd has it now (or ServiceUnavailable once ``call_timeout`` has passed)."""
        deadline = self.monotonic() + 3 * self.call_timeout
        while True:
            try:
                self._sync()
                return
            except ServiceUnavailable as exc:
                if self.monotonic() > deadline:
                    raise ServiceUnavailable(f"cannot load model {self.name} from etcd: {exc}") from exc
                time.sleep(0.2)

    def _sync(self) -> None:
        """Bring the applied state up to etcd's: the same epoch catches up by range, another reloads."""
        value, _, _ = self.store.get(self.k_epoch)
        if value is None:  # a new model, or the etcd data was wiped: a new incarnation
            created = uuid.uuid4().hex
            answer = self.store.txn([{"key": b64(self.k_epoch), "result": "EQUAL", "target": "CREATE",
                                      "create_revision": 0}],
                                    [{"request_put": {"key": b64(self.k_epoch), "value": b64(created)}}], [])
            if answer.get("succeeded"):
                log_event(log, "epoch_created", "a new incarnation of the model in etcd", model=self.name,
                          epoch=created)
            value, _, _ = self.store.get(self.k_epoch)
            if value is None:
                raise ServiceUnavailable("the model's epoch key vanished while it was being created")
        epoch = value.decode()
        with self.lock:
            same = epoch == self.epoch
        if same:
            try:
                self._catch_up()
                return
            except _Resync:
                self._reload(epoch, "gap")
                return
        self._reload(epoch, "epoch" if self.epoch is not None else "")

    def _reload(self, epoch: str, reason: str) -> None:
        """Load head and history at one etcd revision; with a reason, viewers start over."""
        value, _, at = self.store.get(self.k_head)
        head: dict[str, Any] = json.loads(value) if value is not None else {"revision": 0, "values": {}}
        first = max(0, head["revision"] - self.history_limit)
        events: list[dict[str, Any]] = []
        start = self.k_events + rev_key(first + 1)
        while True:
            kvs, _, more = self.store.range(start, prefix_end(self.k_events), limit=1000, revision=at)
            events.extend(json.loads(unb64(kv.get("value"))) for kv in kvs)
            if not more or not kvs:
                break
            start = unb64(kvs[-1]["key"]).decode() + "\0"
        with self.lock:
            self.epoch = epoch
            self.revision = head["revision"]
            self.values = {**self.schema.defaults(), **head["values"]}
            self.history.clear()
            self.history.extend(e for e in events if e["revision"] <= head["revision"])
            self.requests.clear()
            self.requests.update((e["request"], e["revision"]) for e in self.history if e.get("request"))
            self._etcd_revision = at
            self._base = None
            self._revision_gauge.set(self.revision)
            self._etcd_gauge.set(at)
            self._contact()
            if reason:
                self.metrics.cluster_resets.labels(self.name, reason).inc()
                log_event(log, "model_reloaded", f"model reloaded from etcd ({reason})", level=logging.WARNING,
                          model=self.name, epoch=epoch, revision=self.revision, reason=reason)
                self.on_reset(reason)
            self._applied_cond.notify_all()

    def _catch_up(self) -> None:
        """Read the events after the applied revision back from etcd (raises _Resync on a gap)."""
        while True:
            with self.lock:
                start = self.k_events + rev_key(self.revision + 1)
            kvs, at, more = self.store.range(start, prefix_end(self.k_events), limit=500)
            self._apply([json.loads(unb64(kv.get("value"))) for kv in kvs], at if not more else 0)
            if not more:
                self._contact()
                return

    def _apply(self, events: list[dict[str, Any]], etcd_revision: int) -> None:
        """Apply consecutive events, publish them; ``etcd_revision`` (when not 0) is now reached."""
        with self.lock:
            for event in sorted(events, key=lambda e: e["revision"]):
                if event["revision"] <= self.revision:
                    continue
                if event["revision"] != self.revision + 1 or event.get("epoch") != self.epoch:
                    raise _Resync(f"event {event['revision']} does not follow {self.revision}")
                self.remember(event)
                self.publish(event)
            if etcd_revision > self._etcd_revision:
                self._etcd_revision = etcd_revision
                self._etcd_gauge.set(etcd_revision)
            self._revision_gauge.set(self.revision)
            self._applied_cond.notify_all()

    # the follower -----------------------------------------------------------------------
    def _follow(self) -> None:
        delay = 0.05
        while not self._stop.is_set():
            try:
                if self._resync:
                    self._resync = False
                    self._sync()
                self._watch()
                self._probe()
                delay = 0.05
            except ServiceUnavailable as exc:
                if not self._failing:
                    log_event(log, "etcd_unreachable", "etcd unreachable: this replica's reads may be stale, "
                              "its writes are refused", level=logging.WARNING, model=self.name, error=str(exc))
                self._failing = True
                self._resync = True
                self._stop.wait(delay)
                delay = min(1.0, delay * 2)
            except _Resync as exc:
                self._resync = True
                log_event(log, "watch_resync", f"reading back from etcd: {exc}", model=self.name)
            except Exception:  # a bug: logged with its traceback, counted, and the follower goes on
                log.exception("etcd follower error")
                self.metrics.loop_errors.labels("etcd-follower").inc()
                self.metrics.cluster_resets.labels(self.name, "error").inc()
                self._failing = True
                self._resync = True
                self._stop.wait(delay)
                delay = min(1.0, delay * 2)
            self.stale  # noqa: B018 - refreshes the stale gauge

    def _watch(self) -> None:
        """Follow the watch until it ends (a read time-out after ``probe_interval`` idle seconds)."""
        stream = self.store.watch(self.k_epoch, prefix_end(self.k_events), self._etcd_revision + 1,
                                  read_timeout=self.probe_interval)
        with self._stream_lock:
            self._stream = stream
        try:
            for result in stream:
                if self._stop.is_set():
                    return
                self._contact()
                if result.get("canceled") or int(result.get("compact_revision", 0) or 0):
                    # etcd compacted its MVCC history past where we watch from: read back by range
                    raise _Resync(f"watch canceled (compacted to {result.get('compact_revision')})")
                events, reached = [], 0
                for change in result.get("events") or ():
                    kv = change.get("kv", {})
                    key = unb64(kv.get("key")).decode()
                    reached = max(reached, int(kv.get("mod_revision", 0) or 0))
                    if key == self.k_epoch:
                        raise _Resync("the model's epoch changed")
                    if change.get("type") == "DELETE":
                        continue  # history pruning
                    events.append(json.loads(unb64(kv.get("value"))))
                if events or reached:
                    self._apply(events, reached)
        except ServiceUnavailable:
            pass  # the stream's end: the probe tells whether etcd is there
        finally:
            with self._stream_lock:
                self._stream = None
            stream.close()

    def _probe(self) -> None:
        """A linearizable read of the head: keeps us fresh, and catches up a lagging watch."""
        value, _, _ = self.store.get(self.k_head)
        self._contact()
        head = json.loads(value) if value is not None else {"revision": 0}
        with self.lock:
            lag = max(0, head["revision"] - self.revision) if head.get("epoch", self.epoch) == self.epoch else 0
        self._lag.set(lag)
        if lag or head.get("epoch", self.epoch) != self.epoch:
            self._resync = True

    # commits ---------------------------------------------------------------------------
    def commit(self, pending: Pending) -> int:
        """Write ``pending`` through etcd and wait until it is applied here; returns its revision."""
        with self.commit_lock:
            if not pending.done:
                with self.lock:
                    batch = self.writing = self.queue
                    self.queue = []
                try:
                    for start in range(0, len(batch), MAX_BATCH):
                        self._write(batch[start:start + MAX_BATCH])
                except Exception as exc:  # a bug: refuse, never hang
                    self._fail([p for p in batch if not p.done], "error",
                               PersistenceError(f"{type(exc).__name__}: {exc}"))
                    raise
                finally:
                    with self.lock:
                        self.writing = []
        if pending.exception is None and pending.error is None:
            self.wait_applied(pending.revision, self.call_timeout)
        return pending.outcome()

    def enqueue(self, normalized: dict[str, Any], identity: str, address: str | None, request_id: str | None,
                audited: bool = True, expected_revision: int | None = None, via: str | None = None) -> Pending:
        """Queue a validated change for the committer (answered within the call timeout)."""
        pending = super().enqueue(normalized, identity, address, request_id, audited, expected_revision, via)
        # answered within the caller's call timeout, however long the queue ahead of it
        pending.deadline = self.monotonic() + 0.7 * self.call_timeout
        return pending

    def _read_base(self, deadline: float) -> _Head:
        with self.lock:
            base, epoch = self._base, self.epoch
        if base is not None:
            return base
        value, kv, _ = self.store.get(self.k_head, deadline)
        if value is None:
            return _Head(0, self.schema.defaults(), 0, epoch or "")
        head = json.loads(value)
        if head.get("epoch") != epoch:
            self._resync = True
            raise ServiceUnavailable("this replica is moving to a new incarnation of the model; try again")
        return _Head(head["revision"], {**self.schema.defaults(), **head["values"]}, int(kv["mod_revision"]),
                     epoch or "")

    def _write(self, batch: list[Pending]) -> None:
        """Make one batch durable in etcd, with as many tries as conflicts need (commit lock held)."""
        keys = {id(p): p.event.get("request") or "~" + uuid.uuid4().hex for p in batch}
        todo = list(batch)
        deadline = min(p.deadline or self.monotonic() + 0.7 * self.call_timeout for p in batch)
        delay = 0.02
        while todo:
            try:
                base = self._read_base(deadline)
                todo = self._assign(todo, base, keys)
                if not todo:
                    return
                answer = self.store.txn(*self._txn(todo, base, keys), deadline=deadline)
            except ServiceUnavailable as exc:
                with self.lock:
                    self._base = None
                if self.monotonic() + delay > deadline:
                    self._fail(todo, "unavailable", ServiceUnavailable(
                        f"etcd unreachable or without quorum ({exc}); the change may or may not be applied: "
                        "retry with the same request id"))
                    return
                self._retries.inc()
                self._stop.wait(delay)
                delay = min(delay * 2, 0.5)
                continue
            if answer.get("succeeded"):
                self._committed(todo, base, int(answer["header"]["revision"]))
                return
            self._conflicts.inc()
            self._retries.inc()
            todo = self._after_conflict(todo, base, keys, answer)

    def _assign(self, todo: list[Pending], base: _Head, keys: dict[int, str]) -> list[Pending]:
        """Validate the batch again, in order, on ``base``; give each change its revision and event."""
        ready = []
        revision, values = base.revision, base.values
        for p in todo:
            try:
                normalized = self.schema.validate(values, p.changes)
                if p.expected_revision is not None and p.expected_revision != revision:
                    raise ConflictError(f"expected revision {p.expected_revision}, model is at {revision}")
            except (ValidationError, ConflictError) as exc:
                result = "conflict" if isinstance(exc, ConflictError) else "invalid"
                self._fail([p], result, exc, record=p.audited)
                continue
            event = self.event(normalized, p.identity, p.event.get("request"), base=(revision, values),
                               via=p.event.get("via"))
            event["epoch"] = base.epoch
            if "request" not in event:
                event["txn"] = keys[id(p)]
            p.event = event
            revision, values = event["revision"], event["values"]
            ready.append(p)
        return ready

    def _txn(self, todo: list[Pending], base: _Head, keys: dict[int, str]) -> tuple[list, list, list]:
        last = todo[-1].event
        head = {"revision": last["revision"], "values": last["values"], "epoch": base.epoch, "time": last["time"]}
        compare = [{"key": b64(self.k_head), "result": "EQUAL", "target": "MOD", "mod_revision": base.mod_revision},
                   {"key": b64(self.k_epoch), "result": "EQUAL", "target": "VALUE", "value": b64(base.epoch)}]
        success = [{"request_put": {"key": b64(self.k_head), "value": b64(json.dumps(head))}}]
        failure = [{"request_range": {"key": b64(self.k_head)}}, {"request_range": {"key": b64(self.k_epoch)}}]
        fence = self.fence() if self.fence is not None and any(not p.audited for p in todo) else None
        for p in todo:
            rkey = b64(self.k_requests + keys[id(p)])
            compare.append({"key": rkey, "result": "EQUAL", "target": "CREATE", "create_revision": 0})
            success.append({"request_put": {"key": b64(self.k_events + rev_key(p.revision)),
                                            "value": b64(json.dumps(p.event))}})
            if p.audited:
                record = {"time": p.event["time"], "action": "modify", "identity": p.identity, "client": p.address,
                          "result": "accepted", "model": self.name, "changes": p.changes, "revision": p.revision,
                          "request": p.event.get("request"), **({"via": p.event["via"]} if "via" in p.event else {})}
                success.append({"request_put": {"key": b64(self.k_audit + rev_key(p.revision)),
                                                "value": b64(json.dumps(record, default=repr))}})
            success.append({"request_put": {"key": rkey, "value": b64(str(p.revision))}})
            failure.append({"request_range": {"key": rkey}})
        if fence is not None:
            compare.append(fence)
            failure.append({"request_range": {"key": fence["key"]}})
        return compare, success, failure

    def _after_conflict(self, todo: list[Pending], base: _Head, keys: dict[int, str],
                        answer: dict[str, Any]) -> list[Pending]:
        """Settle what the failed compare says: known request ids are answered, the rest retried."""
        ranges = [r.get("response_range", {}) for r in answer.get("responses", [])]
        head_kvs, epoch_kvs = ranges[0].get("kvs") or [], ranges[1].get("kvs") or []
        epoch = unb64(epoch_kvs[0].get("value")).decode() if epoch_kvs else None
        if epoch != base.epoch:
            self._resync = True
            with self.lock:
                self._base = None
            self._fail(todo, "unavailable", ServiceUnavailable(
                "the model was re-created in etcd (a new epoch): change not applied; try again"))
            return []
        fence_of = self.fence
        fenced = fence_of is not None and any(not p.audited for p in todo)
        if fenced and fence_of is not None:
            fence, held = fence_of(), ranges.pop().get("kvs") or []
            if not held or held[0].get("value") != fence["value"]:  # no longer the elected one
                self._fail([p for p in todo if not p.audited], "unavailable",
                           ServiceUnavailable("this process is not the elected one (any more): not applied"))
                todo, ranges = ([p for p in todo if p.audited],
                                ranges[:2] + [r for p, r in zip(todo, ranges[2:], strict=True) if p.audited])
        rest = []
        for p, found in zip(todo, ranges[2:], strict=True):
            kvs = found.get("kvs") or []
            if kvs:  # applied before: by an earlier try of ours, or through another replica
                p.event = {**p.event, "revision": int(unb64(kvs[0].get("value")))}
                p.done = True
                with self.lock:
                    self.inflight.pop(p.event.get("request") or "", None)
                log_event(log, "modify_deduplicated", "request id already applied", model=self.name,
                          revision=p.revision, request=keys[id(p)])
            else:
                rest.append(p)
        if head_kvs:
            head = json.loads(unb64(head_kvs[0].get("value")))
            new = _Head(head["revision"], {**self.schema.defaults(), **head["values"]},
                        int(head_kvs[0]["mod_revision"]), base.epoch)
        else:
            new = _Head(0, self.schema.defaults(), 0, base.epoch)
        with self.lock:
            self._base = new
        return rest

    def _committed(self, todo: list[Pending], base: _Head, etcd_revision: int) -> None:
        last = todo[-1].event
        with self.lock:
            self._base = _Head(last["revision"], last["values"], etcd_revision, base.epoch)
        for p in todo:
            p.done = True
            self.metrics.modifications.labels(self.name, "accepted").inc()
            log_event(log, "modified", "model modified", model=self.name, revision=p.revision,
                      identity=p.identity, client=p.address, changes=p.changes)
        self._commit_batch.observe(len(todo))
        audited = [p for p in todo if p.audited]
        if audited:  # this replica's own trail too (the change is durable in etcd already)
            try:
                self.audit.record_many([("modify", p.identity, p.address, "accepted",
                                         {"model": self.name, "changes": p.changes, "revision": p.revision,
                                          "request": p.event.get("request"), "epoch": base.epoch,
                                          **({"via": p.event["via"]} if "via" in p.event else {})})
                                        for p in audited])
            except MVCError as exc:
                log_event(log, "audit_mirror_failed", "the local copy of accepted audit records failed "
                          "(they are in etcd)", level=logging.ERROR, model=self.name, error=str(exc))
        if (todo[0].revision - 1) // 100 != last["revision"] // 100:
            self._compact_due.set()

    def _fail(self, todo: list[Pending], result: str, exc: MVCError, record: bool = True) -> None:
        with self.lock:
            for p in todo:
                p.exception = exc
                p.done = True
                request_id = p.event.get("request")
                if request_id is not None:
                    self.inflight.pop(request_id, None)
        for p in todo:
            self.metrics.modifications.labels(self.name, result).inc()
            log_event(log, "modify_refused", f"change refused: {exc}", level=logging.WARNING, identity=p.identity,
                      model=self.name, client=p.address, result=result)
            if record and p.audited:
                self.refuse(p.identity, p.address, p.changes, result, str(exc))

    # history pruning ---------------------------------------------------------------------
    def _compactor(self) -> None:
        """Remove events, audit records and request ids older than the history limit, off the commit
        path, after every hundredth revision (any replica may do it; deleting twice is harmless).
        A prune that etcd did not answer is tried again every second until one goes through, not
        left to the next hundredth revision (which may never come); the first failure is logged."""
        failing = False
        while not self._stop.is_set():
            if not self._compact_due.wait(1.0):
                continue
            self._compact_due.clear()
            try:
                self.prune()
                failing = False
            except ServiceUnavailable as exc:
                if not failing:
                    log_event(log, "prune_failed", "history pruning failed; trying again every second",
                              level=logging.WARNING, model=self.name, error=str(exc))
                failing = True
                if not self._stop.wait(1.0):
                    self._compact_due.set()
            except Exception:  # a bug: logged with its traceback, counted, and pruning goes on
                log.exception("history pruning error")
                self.metrics.loop_errors.labels("etcd-compactor").inc()

    def prune(self) -> int:
        """Prune what lies past the history limit now; return how many events went."""
        with self.lock:
            cutoff = self.revision - self.history_limit
        removed = 0
        while cutoff > 0:
            kvs, _, more = self.store.range(self.k_events, self.k_events + rev_key(cutoff + 1), limit=100)
            if not kvs:
                break
            events = [json.loads(unb64(kv.get("value"))) for kv in kvs]
            upto = events[-1]["revision"]
            ops = [{"request_delete_range": {"key": b64(self.k_events),
                                             "range_end": b64(self.k_events + rev_key(upto + 1))}},
                   {"request_delete_range": {"key": b64(self.k_audit),
                                             "range_end": b64(self.k_audit + rev_key(upto + 1))}}]
            for e in events:
                rid = e.get("request") or e.get("txn")
                if rid:
                    ops.append({"request_delete_range": {"key": b64(self.k_requests + rid)}})
            self.store.txn([], ops, [])
            removed += len(events)
            if not more:
                break
        return removed

    # lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the etcd follower and the history compactor."""
        for t in self._threads:
            t.start()

    def close(self) -> None:
        """Stop the follower and the compactor, ending the watch stream."""
        self._stop.set()
        with self._stream_lock:
            stream = self._stream
        if stream is not None:
            stream.close()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=2 * self.probe_interval + 1)
