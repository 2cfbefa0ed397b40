"""The model server: a typed, versioned, durable, observable model over Pyro5.

:class:`ModelServer` is the one object a model service registers. Reads
(``query``, ``snapshot``, ``history``) and subscriptions are open to every
authenticated connection; ``modify`` needs the controller role and runs
validate → audit → commit → apply → notify, in that order, so revisions are
gap-free and every acknowledged change is durable and recorded. A change is
validated and given its revision under the model lock, against the values of
every change ahead of it, then queued for the disk: whoever takes the commit lock
writes every change queued by then with one audit write and fsync and one SQLite
transaction (a group commit; concurrent controllers share fsyncs, a lone one
waits for nothing), and only then applies and publishes them in revision order.
Reads see durable state only. The audit record's fsync is the one fsync of a
change: the commit after it is not synced, and at start-up the server rolls
forward what the audit log holds past the state file (so a change recorded, then
cut off by a crash, is applied).

A change event, as viewers and ``history`` see it::

    {"model": "remote_mvc.model", "revision": 7, "time": 1764057600.12,
     "identity": "controller", "changes": {"value": {"old": 0, "new": 99}},
     "values": {"name": "xxx", "value": 99}}
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from Pyro5.api import expose

from . import auth
from ._fanout import Fanout
from ._store import Store
from .audit import AuditLog
from .config import Settings
from .errors import (
    ConflictError,
    HistoryCompacted,
    MVCError,
    PermissionDenied,
    PersistenceError,
    ValidationError,
)
from .logs import log_event
from .metrics import Metrics
from .model import Model
from .service import Service

__all__ = ["ModelServer", "ModelService"]

log = logging.getLogger("remote_mvc.server")


def _summary(value: Any, limit: int = 2000) -> Any:
    """A JSON-safe, bounded copy of untrusted input for the audit log."""
    if isinstance(value, dict) and len(repr(value)) <= limit:
        return value
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


class _Pending:
    """A validated change on its way to disk, with what its thread learns of the outcome."""

    __slots__ = ("event", "changes", "identity", "address", "audited", "done", "error")

    def __init__(self, event: dict[str, Any], changes: dict[str, Any], address: str | None, audited: bool) -> None:
        self.event = event
        self.changes = changes
        self.identity: str = event["identity"]
        self.address = address
        self.audited = audited
        self.done = False  # applied, or refused (then error says why)
        self.error: str | None = None

    @property
    def revision(self) -> int:
        return self.event["revision"]


@expose
class ModelServer:
    """A model's values, revision, history and subscribers, served over Pyro5."""

    def __init__(self, name: str, schema: type[Model], store: Store, audit: AuditLog, metrics: Metrics, *,
                 lease_seconds: float = 10.0, call_timeout: float = 3.0, queue_limit: int = 1000,
                 batch_max: int = 500, history_limit: int = 10000,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._name = name
        self._schema = schema
        self._store = store
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.RLock()
        self._commit_lock = threading.Lock()  # one batch on its way to disk at a time
        self._queue: list[_Pending] = []  # validated changes waiting for the disk, in revision order
        self._writing: list[_Pending] = []  # the batch on its way to disk (before the queue)
        self._inflight: dict[str, _Pending] = {}  # their request ids
        revision, values = store.load(name)
        self._revision = revision
        self._values = {**schema.defaults(), **(values or {})}
        self._history: collections.deque[dict] = collections.deque(maxlen=history_limit)
        first = max(0, revision - history_limit)
        self._history.extend(store.events(name, first, history_limit))
        self._roll_forward()
        # request ids of recent changes, so a retried modify is applied at most once
        self._requests: collections.OrderedDict[str, int] = collections.OrderedDict(
            (e["request"], e["revision"]) for e in self._history if e.get("request"))
        self._fanout = Fanout(name, self.snapshot, metrics, revision=self._revision, lease_seconds=lease_seconds,
                              call_timeout=call_timeout, queue_limit=queue_limit, batch_max=batch_max,
                              clock=monotonic)
        self._revision_gauge = metrics.model_revision.labels(name)
        self._commit_batch = metrics.commit_batch.labels(name)
        self._revision_gauge.set(self._revision)
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name=f"lease-reaper-{name}", daemon=True)
        self._reaper.start()
        log_event(log, "model_loaded", "model loaded", model=name, revision=self._revision, values=self._values)

    # reads -----------------------------------------------------------------
    def query(self) -> dict[str, Any]:
        """The current values."""
        with self._lock:
            return dict(self._values)

    def snapshot(self) -> dict[str, Any]:
        """Revision and values, read together."""
        with self._lock:
            return {"model": self._name, "revision": self._revision, "values": dict(self._values),
                    "time": self._clock()}

    def schema(self) -> dict[str, dict[str, Any]]:
        """The fields with their types and defaults."""
        return self._schema.describe()

    def history(self, since_revision: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Change events after ``since_revision``, oldest first (at most ``limit``).

        Raises HistoryCompacted when the history no longer reaches back that far:
        the caller should take a snapshot instead.
        """
        if not isinstance(since_revision, int) or not isinstance(limit, int) or limit < 1:
            raise ValidationError("since_revision and limit must be integers, limit at least 1")
        with self._lock:
            if since_revision >= self._revision:
                return []
            first = self._history[0]["revision"] if self._history else self._revision + 1
            if since_revision + 1 < first:
                raise HistoryCompacted(f"history starts at revision {first}; take a snapshot", first)
            skip = since_revision + 1 - first
            return list(self._history)[skip:skip + limit]

    def whoami(self) -> dict[str, Any]:
        identity, role, address = auth.caller()
        return {"identity": identity, "role": role, "address": address}

    # changes ---------------------------------------------------------------
    def modify(self, changes: dict[str, Any], expected_revision: int | None = None,
               request_id: str | None = None) -> int:
        """Validate, record, persist and apply a change; notify viewers; return the new revision.

        ``request_id`` (optional, unique per change) makes retries safe: a request
        id seen before returns the revision it produced without applying again.
        """
        identity, role, address = auth.caller()
        try:
            auth.require(auth.MODIFY)
        except PermissionDenied as exc:
            self._refused(identity, address, changes, "forbidden", exc)
            raise
        if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 128):
            raise ValidationError("request_id must be a string of at most 128 characters")
        with self._lock:
            pending = None
            if request_id is not None:
                if request_id in self._requests:
                    return self._requests[request_id]
                pending = self._inflight.get(request_id)  # a retry while the first try is on its way
            if pending is None:
                revision, values = self._head()
                try:
                    normalized = self._schema.validate(values, changes)
                    if expected_revision is not None and expected_revision != revision:
                        raise ConflictError(f"expected revision {expected_revision}, model is at {revision}")
                except ConflictError as exc:
                    self._refused(identity, address, changes, "conflict", exc)
                    raise
                except ValidationError as exc:
                    self._refused(identity, address, changes, "invalid", exc)
                    raise
                pending = self._enqueue(normalized, identity, address, request_id)
        return self._commit(pending)

    def _modify_local(self, changes: dict[str, Any], identity: str) -> int:
        """An in-process change (the ticker's clock): validated and durable, not audited."""
        with self._lock:
            pending = self._enqueue(self._schema.validate(self._head()[1], changes), identity, None, None,
                                    audited=False)
        return self._commit(pending)

    def _head(self) -> tuple[int, dict[str, Any]]:
        """Revision and values after every change validated so far, durable or on its way (lock held):
        what the next change is validated against."""
        ahead = self._queue or self._writing
        if ahead:
            event = ahead[-1].event
            return event["revision"], event["values"]
        return self._revision, self._values

    def _event(self, normalized: dict[str, Any], identity: str, request_id: str | None,
               at: float | None = None) -> dict[str, Any]:
        """The change event of an already validated change, at the next revision."""
        revision, values = self._head()
        event = {
            "model": self._name, "revision": revision + 1, "time": self._clock() if at is None else at,
            "identity": identity,
            "changes": {k: {"old": values.get(k), "new": v} for k, v in normalized.items()},
            "values": {**values, **normalized},
        }
        if request_id is not None:
            event["request"] = request_id
        return event

    def _roll_forward(self) -> None:
        """Apply the changes whose audit record outlived their commit (see AuditLog.unapplied)."""
        for record in self._audit.unapplied(self._name, self._revision):
            try:
                normalized = self._schema.validate(self._values, record.get("changes") or {})
                at = datetime.fromisoformat(record["time"]).timestamp()
                event = self._event(normalized, record["identity"], record.get("request"), at)
                self._store.commit(self._name, event)
            except (MVCError, KeyError, TypeError, ValueError) as exc:
                log_event(log, "roll_forward_failed", "an audited change could not be applied at start-up",
                          level=logging.ERROR, model=self._name, revision=record["revision"], error=str(exc))
                try:  # the log must not claim a change that was never applied
                    self._audit.record("modify", record.get("identity", "unknown"), record.get("client"), "failed",
                                       model=self._name, revision=record["revision"], request=record.get("request"),
                                       error=f"not applied at start-up: {exc}")
                except PersistenceError:
                    pass
                return
            self._values, self._revision = event["values"], event["revision"]
            self._history.append(event)
            log_event(log, "modify_rolled_forward", "audited change applied at start-up", model=self._name,
                      revision=self._revision, identity=event["identity"], request=event.get("request"))

    def _enqueue(self, normalized: dict[str, Any], identity: str, address: str | None, request_id: str | None,
                 audited: bool = True) -> _Pending:
        """Give a validated change the next revision and queue it for the disk (lock held)."""
        pending = _Pending(self._event(normalized, identity, request_id), normalized, address, audited)
        self._queue.append(pending)
        if request_id is not None:
            self._inflight[request_id] = pending
        return pending

    def _commit(self, pending: _Pending) -> int:
        """Make ``pending`` durable together with every change queued with it (a group commit: one
        audit fsync and one transaction for all of them), then apply and publish them in revision
        order; return its revision or raise its error. Whoever gets the commit lock writes
        everything queued by then; a change written meanwhile by another thread is done when its
        own thread gets the lock."""
        with self._commit_lock:
            if not pending.done:
                with self._lock:
                    batch = self._writing = self._queue
                    self._queue = []
                try:
                    self._write(batch)
                except Exception as exc:  # a bug, not the disk (handled in _write): refuse, never hang
                    self._fail(batch, "error", "modify_failed", "change refused", f"{type(exc).__name__}: {exc}")
                    raise
        if pending.error is not None:
            raise PersistenceError(pending.error)
        return pending.event["revision"]

    def _write(self, batch: list[_Pending]) -> None:
        """Record, commit, apply and publish one batch (commit lock held)."""
        audited = [p for p in batch if p.audited]
        try:
            if audited:
                self._audit.record_many([("modify", p.identity, p.address, "accepted",
                                          {"model": self._name, "changes": p.changes, "revision": p.revision,
                                           "request": p.event.get("request")}) for p in audited])
        except PersistenceError as exc:
            self._fail(batch, "audit_failed", "modify_refused", "audit log not writable: change refused", str(exc))
            return
        try:  # an audited change is durable already: its commit is synced only with unaudited ones
            self._store.commit_many(self._name, [p.event for p in batch], fsync=len(audited) < len(batch))
        except PersistenceError as exc:
            error = str(exc)
            try:  # the accepted records above must not stand alone
                if audited:
                    self._audit.record_many([("modify", p.identity, p.address, "failed",
                                              {"model": self._name, "revision": p.revision, "error": error})
                                             for p in audited])
            except PersistenceError:
                # they stand alone: a restart would roll the changes forward, so their outcome
                # is not "refused" but unknown until then (a retry with its request id tells)
                error = (f"{exc}; its failure could not be recorded either, so it may still be applied when "
                         "the server restarts: retry with the same request id")
            self._fail(batch, "persist_failed", "modify_failed", "state not durable: change refused", error)
            return
        with self._lock:
            for p in batch:
                self._applied(p)
            self._writing = []
            self._revision_gauge.set(self._revision)
        self._commit_batch.observe(len(batch))

    def _applied(self, pending: _Pending) -> None:
        """A durable change becomes the model's state, and its viewers' news (lock held)."""
        event = pending.event
        self._values, self._revision = event["values"], event["revision"]
        self._history.append(event)
        request_id = event.get("request")
        if request_id is not None:
            self._inflight.pop(request_id, None)
            self._requests[request_id] = self._revision
            while len(self._requests) > (self._history.maxlen or 10000):
                self._requests.popitem(last=False)
        self._metrics.modifications.labels(self._name, "accepted").inc()
        self._fanout.publish(event)
        pending.done = True
        log_event(log, "modified", "model modified", model=self._name, revision=self._revision,
                  identity=pending.identity, client=pending.address, changes=pending.changes)

    def _fail(self, batch: list[_Pending], result: str, event: str, message: str, error: str) -> None:
        """Refuse a batch that could not be made durable, and every change queued behind it (each was
        validated on top of it): nothing of them is applied (commit lock held)."""
        with self._lock:
            behind, self._queue, self._writing = self._queue, [], []
            for p in [q for q in batch if not q.done] + behind:
                p.error = error if p in batch else f"not applied: a change before it could not be made durable: {error}"
                p.done = True
                request_id = p.event.get("request")
                if request_id is not None:
                    self._inflight.pop(request_id, None)
                self._metrics.modifications.labels(self._name, result).inc()
                log_event(log, event, message, level=logging.ERROR, identity=p.identity, model=self._name,
                          revision=p.revision, error=p.error)
            for p in behind:
                if p.audited:  # its attempt is on record, as every attempt is
                    self._record_refusal(p.identity, p.address, p.changes, result, p.error)

    def _refused(self, identity: str, address: str | None, changes: Any, result: str, exc: MVCError) -> None:
        self._metrics.modifications.labels(self._name, result).inc()
        log_event(log, "modify_refused", f"modify refused: {exc}", level=logging.WARNING, model=self._name,
                  identity=identity, client=address, result=result)
        self._record_refusal(identity, address, changes, result, str(exc))

    def _record_refusal(self, identity: str, address: str | None, changes: Any, result: str, error: str) -> None:
        try:
            self._audit.record("modify", identity, address, result, model=self._name,
                               changes=_summary(changes), error=error)
        except PersistenceError:
            pass  # counted in the metric; the refusal stands either way

    def _on_handshake_refused(self, address: str, reason: str) -> None:
        """Audit a connection refused in the handshake (the service counts and logs it)."""
        try:
            self._audit.record("connect", "unknown", address, "refused", model=self._name, error=reason)
        except PersistenceError:
            pass

    # subscriptions ---------------------------------------------------------
    def subscribe(self, callback_uri: str, viewer_id: str, since_revision: int | None = None,
                  ordered_oneway: bool = False) -> dict[str, Any]:
        """Subscribe a viewer's callback object; it first gets what it missed.

        With ``since_revision`` the viewer gets the events after it (or a snapshot
        when the history no longer reaches back); without, a snapshot.
        ``ordered_oneway``: the viewer's daemon runs oneway ``notify`` calls in
        order (remote-mvc's viewer hosts do), so most calls need no answer.
        """
        if not isinstance(callback_uri, str) or not isinstance(viewer_id, str) or not viewer_id:
            raise ValidationError("subscribe needs a callback URI and a viewer id (strings)")
        if since_revision is not None and not isinstance(since_revision, int):
            raise ValidationError("since_revision must be an integer or None")
        with self._lock:
            backlog = None
            if since_revision is not None and since_revision <= self._revision:
                try:
                    backlog = self.history(since_revision, limit=self._fanout.queue_limit + 1)
                except HistoryCompacted:
                    backlog = None
                if backlog is not None and len(backlog) != self._revision - since_revision:
                    backlog = None  # too far behind: a snapshot is cheaper
            sub = self._fanout.add(viewer_id, callback_uri, backlog, oneway=ordered_oneway is True)
            return {"subscription": sub.id, "lease": self._fanout.lease_seconds, "revision": self._revision}

    def renew(self, subscription_ids: list[str]) -> list[str]:
        """Renew leases; returns the ids this server does not know (re-subscribe those)."""
        if not isinstance(subscription_ids, (list, tuple)):
            raise ValidationError("renew takes a list of subscription ids")
        return self._fanout.renew(list(subscription_ids))

    def unsubscribe(self, subscription_id: str) -> bool:
        return self._fanout.remove(subscription_id)

    def viewers(self) -> list[dict[str, Any]]:
        """Who is subscribed, with queue depth and last delivered revision."""
        return self._fanout.describe()

    def drop_viewer(self, viewer_id: str) -> bool:
        """Force a viewer off (admin role)."""
        identity, _, address = auth.require(auth.DROP)
        dropped = self._fanout.drop_viewer(viewer_id, "admin")
        self._audit.record("drop_viewer", identity, address, "accepted" if dropped else "unknown",
                           model=self._name, viewer_id=viewer_id)
        return dropped

    # lifecycle -------------------------------------------------------------
    def _reap(self) -> None:
        interval = max(0.05, self._fanout.lease_seconds / 4)
        while not self._closed.wait(interval):
            self._fanout.expire()

    def close(self) -> None:
        self._closed.set()
        self._fanout.close()

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def subscriber_count(self) -> int:
        return len(self._fanout)


class ModelService(Service):
    """A process serving one model: store, audit log, model server, daemon, metrics."""

    def __init__(self, settings: Settings, schema: type[Model] | None = None, name: str | None = None,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(settings, metrics)
        from .model import ExampleModel

        name = name or settings.model_name
        self.store = Store(settings.state_file(), settings.history_limit, wal_limit=settings.wal_limit_bytes)
        self.audit = AuditLog(settings.audit_file(), self.metrics, clock=clock)
        self.model = ModelServer(
            name, schema or ExampleModel, self.store, self.audit, self.metrics,
            lease_seconds=settings.lease_seconds, call_timeout=settings.call_timeout,
            queue_limit=settings.queue_limit, batch_max=settings.batch_max,
            history_limit=settings.history_limit, clock=clock)
        self.on_refused = self.model._on_handshake_refused
        self.serve(self.model, name)
        self.on_stop(self.model.close)
        self.on_stop(self.store.close)
        self.on_stop(self.audit.close)
