"""Commit pipelines: how a validated change becomes durable, applied and published.

:class:`~remote_mvc.server.ModelServer` validates a change and hands it to its
pipeline, which owns the model's applied state (revision, values, recent history,
request ids seen) and decides when a change counts as done. Two pipelines exist:

* :class:`GroupCommit` (this module): the embedded SQLite store. Whoever takes the
  commit lock writes every change queued by then with one audit write and fsync and
  one SQLite transaction (a group commit), then applies and publishes them in
  revision order. At start-up it rolls forward what the audit log holds past the
  state file.
* :class:`~remote_mvc.cluster.EtcdPipeline`: the state lives in etcd, any number
  of replicas write through guarded etcd transactions and apply what etcd's watch
  tells them (see ``docs/cluster.md``).

Both publish applied events through the ``publish`` callable the server gives them
(its fan-out), under the pipeline's lock, in revision order.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .audit import AuditLog
from .errors import HistoryCompacted, MVCError, PersistenceError
from .logs import log_event
from .metrics import Metrics
from .model import Model
from .store import Store

__all__ = ["Pending", "Pipeline", "GroupCommit"]

log = logging.getLogger("remote_mvc.server")

# (identity, address, changes, result, error): audit a refusal the pipeline decided on
RefusalRecorder = Callable[[str, "str | None", Any, str, str], None]


class Pending:
    """A validated change on its way to durable storage, with what its thread learns of the outcome."""

    __slots__ = ("event", "changes", "identity", "address", "audited", "done", "error", "exception",
                 "expected_revision", "deadline")

    def __init__(self, event: dict[str, Any], changes: dict[str, Any], address: str | None, audited: bool,
                 expected_revision: int | None = None) -> None:
        self.event = event
        self.changes = changes
        self.identity: str = event["identity"]
        self.address = address
        self.audited = audited
        self.expected_revision = expected_revision
        self.done = False  # applied, or refused (then error says why)
        self.error: str | None = None
        self.exception: MVCError | None = None  # the error to raise, when not a PersistenceError
        self.deadline: float | None = None  # (monotonic) the pipeline answers by then, when it sets one

    @property
    def revision(self) -> int:
        """The revision of the last applied change."""
        return self.event["revision"]

    def outcome(self) -> int:
        """The change's revision, or its error raised."""
        if self.exception is not None:
            raise self.exception
        if self.error is not None:
            raise PersistenceError(self.error)
        return self.event["revision"]


class Pipeline:
    """The state a model server serves and the path of its changes (base of the two pipelines).

    ``lock`` guards every field below; the server takes it to validate a change
    against :meth:`head` and :meth:`enqueue` it atomically.
    """

    epoch: str | None = None  # the model's incarnation, where the backend has one

    def __init__(self, name: str, schema: type[Model], audit: AuditLog, metrics: Metrics, *,
                 history_limit: int = 10000, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.schema = schema
        self.audit = audit
        self.metrics = metrics
        self.clock = clock
        self.lock = threading.RLock()
        self.commit_lock = threading.Lock()  # one batch on its way to storage at a time
        self.queue: list[Pending] = []  # validated changes waiting for storage, in order
        self.writing: list[Pending] = []  # the batch on its way to storage (before the queue)
        self.inflight: dict[str, Pending] = {}  # their request ids
        self.revision = 0
        self.values: dict[str, Any] = schema.defaults()
        self.history: collections.deque[dict] = collections.deque(maxlen=history_limit)
        # request ids of recent changes, so a retried modify is applied at most once
        self.requests: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.publish: Callable[[dict], None] = lambda event: None
        self.refuse: RefusalRecorder = lambda identity, address, changes, result, error: None
        # the applied state jumped (new epoch, or a history gap): the server's viewers start over
        self.on_reset: Callable[[str], None] = lambda reason: None
        self._revision_gauge = metrics.model_revision.labels(name)
        self._commit_batch = metrics.commit_batch.labels(name)
        self._accepted = metrics.modifications.labels(name, "accepted")  # looked up once, counted per change

    # reads (lock held by the caller or taken here) ------------------------------------
    @property
    def stale(self) -> bool:
        """True when the served state may be behind the truth (the backend cannot be reached)."""
        return False

    def snapshot(self) -> dict[str, Any]:
        """Revision and values, read together."""
        with self.lock:
            snap = {"model": self.name, "revision": self.revision, "values": dict(self.values),
                    "time": self.clock()}
            if self.epoch is not None:
                snap["epoch"] = self.epoch
                snap["stale"] = self.stale
            return snap

    def history_after(self, since_revision: int, limit: int) -> list[dict[str, Any]]:
        """Change events after ``since_revision`` (HistoryCompacted when it no longer reaches back)."""
        with self.lock:
            if since_revision >= self.revision:
                return []
            first = self.history[0]["revision"] if self.history else self.revision + 1
            if since_revision + 1 < first:
                raise HistoryCompacted(f"history starts at revision {first}; take a snapshot", first)
            skip = since_revision + 1 - first
            return list(self.history)[skip:skip + limit]

    # the way in ------------------------------------------------------------------------
    def head(self) -> tuple[int, dict[str, Any]]:
        """Revision and values after every change validated so far, applied or on its way (lock held):
        what the next change is validated against."""
        ahead = self.queue or self.writing
        if ahead:
            event = ahead[-1].event
            return event["revision"], event["values"]
        return self.revision, self.values

    def event(self, normalized: dict[str, Any], identity: str, request_id: str | None,
              at: float | None = None, base: tuple[int, dict[str, Any]] | None = None,
              via: str | None = None) -> dict[str, Any]:
        """The change event of an already validated change, at the revision after ``base`` (default
        :meth:`head`)."""
        revision, values = base or self.head()
        event = {
            "model": self.name, "revision": revision + 1, "time": self.clock() if at is None else at,
            "identity": identity,
            "changes": {k: {"old": values.get(k), "new": v} for k, v in normalized.items()},
            "values": {**values, **normalized},
        }
        if request_id is not None:
            event["request"] = request_id
        if via is not None:  # made through a delegate (the web gateway) for ``identity``
            event["via"] = via
        if self.epoch is not None:
            event["epoch"] = self.epoch
        return event

    def enqueue(self, normalized: dict[str, Any], identity: str, address: str | None, request_id: str | None,
                audited: bool = True, expected_revision: int | None = None, via: str | None = None) -> Pending:
        """Give a validated change the next revision and queue it for storage (lock held)."""
        pending = Pending(self.event(normalized, identity, request_id, via=via), normalized, address, audited,
                          expected_revision)
        self.queue.append(pending)
        if request_id is not None:
            self.inflight[request_id] = pending
        return pending

    def commit(self, pending: Pending) -> int:
        """Make ``pending`` durable, apply and publish it; return its revision or raise its error."""
        raise NotImplementedError

    # applying --------------------------------------------------------------------------
    def remember(self, event: dict[str, Any]) -> None:
        """An applied event becomes the state, the history's newest entry and, with its request id,
        a retry's answer (lock held)."""
        self.values, self.revision = event["values"], event["revision"]
        self.history.append(event)
        request_id = event.get("request")
        if request_id is not None:
            self.inflight.pop(request_id, None)
            self.requests[request_id] = self.revision
            while len(self.requests) > (self.history.maxlen or 10000):
                self.requests.popitem(last=False)

    def wait_applied(self, revision: int, timeout: float) -> bool:
        """Block until ``revision`` is applied here (at once for the embedded store: it is the writer)."""
        return self.revision >= revision

    def start(self) -> None:
        """Start background work (none for the embedded store)."""

    def close(self) -> None:
        """Stop background work."""


class GroupCommit(Pipeline):
    """The SQLite pipeline: audit fsync + one transaction per batch, roll-forward at start-up."""

    def __init__(self, name: str, schema: type[Model], store: Store, audit: AuditLog, metrics: Metrics, *,
                 history_limit: int = 10000, clock: Callable[[], float] = time.time) -> None:
        super().__init__(name, schema, audit, metrics, history_limit=history_limit, clock=clock)
        self.store = store
        revision, values = store.load(name)
        self.revision = revision
        self.values = {**schema.defaults(), **(values or {})}
        first = max(0, revision - history_limit)
        self.history.extend(store.events(name, first, history_limit))
        self._roll_forward()
        self.requests.update((e["request"], e["revision"]) for e in self.history if e.get("request"))
        self._revision_gauge.set(self.revision)

    def _roll_forward(self) -> None:
        """Apply the changes whose audit record outlived their commit (see AuditLog.unapplied)."""
        for record in self.audit.unapplied(self.name, self.revision):
            try:
                normalized = self.schema.validate(self.values, record.get("changes") or {})
                at = datetime.fromisoformat(record["time"]).timestamp()
                event = self.event(normalized, record["identity"], record.get("request"), at, via=record.get("via"))
                self.store.commit(self.name, event)
            except (MVCError, KeyError, TypeError, ValueError) as exc:
                log_event(log, "roll_forward_failed", "an audited change could not be applied at start-up",
                          level=logging.ERROR, model=self.name, revision=record["revision"], error=str(exc))
                try:  # the log must not claim a change that was never applied
                    self.audit.record("modify", record.get("identity", "unknown"), record.get("client"), "failed",
                                      model=self.name, revision=record["revision"], request=record.get("request"),
                                      error=f"not applied at start-up: {exc}")
                except PersistenceError:
                    pass
                return
            self.values, self.revision = event["values"], event["revision"]
            self.history.append(event)
            log_event(log, "modify_rolled_forward", "audited change applied at start-up", model=self.name,
                      revision=self.revision, identity=event["identity"], request=event.get("request"))

    def commit(self, pending: Pending) -> int:
        """Make ``pending`` durable together with every change queued with it (a group commit: one
        audit fsync and one transaction for all of them), then apply and publish them in revision
        order; return its revision or raise its error. Whoever gets the commit lock writes
        everything queued by then; a change written meanwhile by another thread is done when its
        own thread gets the lock."""
        with self.commit_lock:
            if not pending.done:
                with self.lock:
                    batch = self.writing = self.queue
                    self.queue = []
                try:
                    self._write(batch)
                except Exception as exc:  # a bug, not the disk (handled in _write): refuse, never hang
                    self._fail(batch, "error", "modify_failed", "change refused", f"{type(exc).__name__}: {exc}")
                    raise
        return pending.outcome()

    def _write(self, batch: list[Pending]) -> None:
        """Record, commit, apply and publish one batch (commit lock held)."""
        audited = [p for p in batch if p.audited]
        try:
            if audited:
                self.audit.record_many([("modify", p.identity, p.address, "accepted",
                                         {"model": self.name, "changes": p.changes, "revision": p.revision,
                                          "request": p.event.get("request"),
                                          **({"via": p.event["via"]} if "via" in p.event else {})})
                                        for p in audited])
        except PersistenceError as exc:
            self._fail(batch, "audit_failed", "modify_refused", "audit log not writable: change refused", str(exc))
            return
        try:  # an audited change is durable already: its commit is synced only with unaudited ones
            self.store.commit_many(self.name, [p.event for p in batch], fsync=len(audited) < len(batch))
        except PersistenceError as exc:
            error = str(exc)
            try:  # the accepted records above must not stand alone
                if audited:
                    self.audit.record_many([("modify", p.identity, p.address, "failed",
                                             {"model": self.name, "revision": p.revision, "error": error})
                                            for p in audited])
            except PersistenceError:
                # they stand alone: a restart would roll the changes forward, so their outcome
                # is not "refused" but unknown until then (a retry with its request id tells)
                error = (f"{exc}; its failure could not be recorded either, so it may still be applied when "
                         "the server restarts: retry with the same request id")
            self._fail(batch, "persist_failed", "modify_failed", "state not durable: change refused", error)
            return
        with self.lock:
            for p in batch:
                self._applied(p)
            self.writing = []
            self._revision_gauge.set(self.revision)
        self._commit_batch.observe(len(batch))

    def _applied(self, pending: Pending) -> None:
        """A durable change becomes the model's state, and its viewers' news (lock held)."""
        self.remember(pending.event)
        self._accepted.inc()
        self.publish(pending.event)
        pending.done = True
        # logged here, under the commit lock, on purpose: changes queued meanwhile join the next batch
        # (logging after the lock shrinks the batches: more fsyncs per change under concurrent controllers)
        log_event(log, "modified", "model modified", model=self.name, revision=self.revision,
                  identity=pending.identity, client=pending.address, changes=pending.changes)

    def _fail(self, batch: list[Pending], result: str, event: str, message: str, error: str) -> None:
        """Refuse a batch that could not be made durable, and every change queued behind it (each was
        validated on top of it): nothing of them is applied (commit lock held)."""
        with self.lock:
            behind, self.queue, self.writing = self.queue, [], []
            for p in [q for q in batch if not q.done] + behind:
                p.error = error if p in batch else f"not applied: a change before it could not be made durable: {error}"
                p.done = True
                request_id = p.event.get("request")
                if request_id is not None:
                    self.inflight.pop(request_id, None)
                self.metrics.modifications.labels(self.name, result).inc()
                log_event(log, event, message, level=logging.ERROR, identity=p.identity, model=self.name,
                          revision=p.revision, error=p.error)
            for p in behind:
                if p.audited:  # its attempt is on record, as every attempt is
                    self.refuse(p.identity, p.address, p.changes, result, p.error or error)  # set above
