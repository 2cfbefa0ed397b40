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

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from Pyro5.api import expose

from . import auth
from ._fanout import Fanout
from .audit import AuditLog
from .commit import GroupCommit, Pending, Pipeline
from .config import Settings
from .controller import group_tag
from .errors import (
    ConflictError,
    HistoryCompacted,
    MVCError,
    PermissionDenied,
    PersistenceError,
    ServiceUnavailable,
    ValidationError,
)
from .logs import log_event
from .metrics import Metrics
from .model import Model
from .service import Service
from .store import ReadableStore, is_etcd, open_store

__all__ = ["ModelServer", "ModelService"]

log = logging.getLogger("remote_mvc.server")


def _summary(value: Any, limit: int = 2000) -> Any:
    """A JSON-safe, bounded copy of untrusted input for the audit log."""
    if isinstance(value, dict) and len(repr(value)) <= limit:
        return value
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


@expose
class ModelServer:
    """A model's values, revision, history and subscribers, served over Pyro5."""

    def __init__(self, name: str, schema: type[Model], store: ReadableStore, audit: AuditLog, metrics: Metrics, *,
                 lease_seconds: float = 10.0, call_timeout: float = 3.0, queue_limit: int = 1000,
                 batch_max: int = 500, history_limit: int = 10000,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._name = name
        self._schema = schema
        self._store = store
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._fanout_settings = {"lease_seconds": lease_seconds, "call_timeout": call_timeout,
                                 "queue_limit": queue_limit, "batch_max": batch_max}
        # the commit path: a store that brings its own (etcd) makes it, else SQLite's group commit
        make = getattr(store, "pipeline", None)
        self._pipeline: Pipeline = (
            make(name, schema, audit, metrics, history_limit=history_limit, clock=clock,
                 call_timeout=call_timeout)
            if make is not None else
            GroupCommit(name, schema, store, audit, metrics, history_limit=history_limit, clock=clock))  # type: ignore[arg-type]
        self._lock = self._pipeline.lock
        self._requests = self._pipeline.requests
        self._inflight = self._pipeline.inflight
        self._fanout = self._new_fanout()
        self._pipeline.publish = self._publish
        self._pipeline.refuse = self._record_refusal
        self._pipeline.on_reset = self._reset_fanout
        self._closed = threading.Event()
        self._pipeline.start()
        self._reaper = threading.Thread(target=self._reap, name=f"lease-reaper-{name}", daemon=True)
        self._reaper.start()
        log_event(log, "model_loaded", "model loaded", model=name, revision=self._revision, values=self._values)

    def _new_fanout(self) -> Fanout:
        return Fanout(self._name, self.snapshot, self._metrics, revision=self._revision,
                      clock=self._monotonic, **self._fanout_settings)

    def _publish(self, event: dict[str, Any]) -> None:
        """An applied event goes to this server's viewers (pipeline lock held)."""
        self._fanout.publish(event)

    def _reset_fanout(self, reason: str) -> None:
        """The applied state jumped (a new epoch, or history that no longer continues ours): every
        viewer is dropped from a fresh fan-out; their hosts subscribe again and get a snapshot
        (pipeline lock held)."""
        old, self._fanout = self._fanout, self._new_fanout()
        log_event(log, "viewers_reset", f"every viewer resubscribes: {reason}", level=logging.WARNING,
                  model=self._name, viewers=len(old), revision=self._revision, reason=reason)
        threading.Thread(target=old.close, name=f"fanout-close-{self._name}", daemon=True).start()

    # the pipeline's state, under the names the rest of this class uses
    @property
    def _revision(self) -> int:
        return self._pipeline.revision

    @property
    def _values(self) -> dict[str, Any]:
        return self._pipeline.values

    @property
    def _queue(self) -> list[Pending]:
        return self._pipeline.queue

    # reads -----------------------------------------------------------------
    def query(self) -> dict[str, Any]:
        """The current values (ServiceUnavailable when this replica cannot tell they are current)."""
        with self._lock:
            if self._pipeline.stale:
                raise ServiceUnavailable("this replica cannot reach etcd: its values may be stale; "
                                         "use snapshot() (it says stale) or another replica")
            return dict(self._values)

    def snapshot(self) -> dict[str, Any]:
        """Revision and values, read together (in cluster mode with ``epoch`` and ``stale``)."""
        return self._pipeline.snapshot()

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
        return self._pipeline.history_after(since_revision, limit)

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
                pending = self._enqueue(normalized, identity, address, request_id,
                                        expected_revision=expected_revision)
        return self._commit(pending)

    def _modify_local(self, changes: dict[str, Any], identity: str, expected_revision: int | None = None) -> int:
        """An in-process change (the ticker's clock): validated and durable, not audited.
        ``expected_revision``: refused with ConflictError unless the model is still there."""
        with self._lock:
            revision, values = self._head()
            if expected_revision is not None and expected_revision != revision:
                raise ConflictError(f"expected revision {expected_revision}, model is at {revision}")
            pending = self._enqueue(self._schema.validate(values, changes), identity, None, None,
                                    audited=False, expected_revision=expected_revision)
        return self._commit(pending)

    def _head(self) -> tuple[int, dict[str, Any]]:
        """What the next change is validated against (lock held): see Pipeline.head."""
        return self._pipeline.head()

    def _enqueue(self, normalized: dict[str, Any], identity: str, address: str | None, request_id: str | None,
                 audited: bool = True, expected_revision: int | None = None) -> Pending:
        """Queue a validated change for the commit pipeline (lock held)."""
        return self._pipeline.enqueue(normalized, identity, address, request_id, audited, expected_revision)

    def _commit(self, pending: Pending) -> int:
        """Make ``pending`` durable, applied and published; its revision, or its error raised."""
        return self._pipeline.commit(pending)

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
                  ordered_oneway: bool = False, epoch: str | None = None) -> dict[str, Any]:
        """Subscribe a viewer's callback object; it first gets what it missed.

        With ``since_revision`` the viewer gets the events after it (or a snapshot
        when the history no longer reaches back); without, a snapshot.
        ``ordered_oneway``: the viewer's daemon runs oneway ``notify`` calls in
        order (remote-mvc's viewer hosts do), so most calls need no answer.
        ``epoch`` (cluster mode): the model incarnation ``since_revision`` belongs
        to; another one than the model's gets a snapshot, never another history.
        """
        if not isinstance(callback_uri, str) or not isinstance(viewer_id, str) or not viewer_id:
            raise ValidationError("subscribe needs a callback URI and a viewer id (strings)")
        if since_revision is not None and not isinstance(since_revision, int):
            raise ValidationError("since_revision must be an integer or None")
        if epoch is not None and (not isinstance(epoch, str) or len(epoch) > 64):
            raise ValidationError("epoch must be a string of at most 64 characters or None")
        if (since_revision is not None and self._pipeline.epoch is not None and epoch == self._pipeline.epoch
                and not self._pipeline.wait_applied(since_revision, self._fanout.call_timeout)):
            # a viewer coming from a replica further ahead: never send it backwards
            raise ServiceUnavailable(f"this replica has not reached revision {since_revision} yet; "
                                     "subscribe to another one or try again")
        with self._lock:
            backlog = None
            if epoch is not None and epoch != self._pipeline.epoch:
                since_revision = None  # revisions of another incarnation of the model
            if since_revision is not None and since_revision <= self._revision:
                try:
                    backlog = self.history(since_revision, limit=self._fanout.queue_limit + 1)
                except HistoryCompacted:
                    backlog = None
                if backlog is not None and len(backlog) != self._revision - since_revision:
                    backlog = None  # too far behind: a snapshot is cheaper
            sub = self._fanout.add(viewer_id, callback_uri, backlog, oneway=ordered_oneway is True)
            reply = {"subscription": sub.id, "lease": self._fanout.lease_seconds, "revision": self._revision}
            if self._pipeline.epoch is not None:
                reply["epoch"] = self._pipeline.epoch
            return reply

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
        self._pipeline.close()
        self._fanout.close()

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def pipeline(self) -> Pipeline:
        """The commit pipeline behind this server (its backend's state and write path)."""
        return self._pipeline

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
        self.store = open_store(settings)
        audit_path = settings.audit_file()
        self.replica = settings.replica_name()
        if is_etcd(settings.store) and not settings.audit_path:  # replicas may share a state directory
            audit_path = Path(settings.state_dir) / f"{settings.service}-{self.replica}-audit.jsonl"
        self.audit = AuditLog(audit_path, self.metrics, clock=clock)
        self.model = ModelServer(
            name, schema or ExampleModel, self.store, self.audit, self.metrics,
            lease_seconds=settings.lease_seconds, call_timeout=settings.call_timeout,
            queue_limit=settings.queue_limit, batch_max=settings.batch_max,
            history_limit=settings.history_limit, clock=clock)
        self.on_refused = self.model._on_handshake_refused
        self.membership = None
        if is_etcd(settings.store):  # cluster mode: one name per replica, found through the group's metadata
            from .replicas import Membership

            self.serve(self.model, f"{name}.replica.{self.replica}", object_id=name, metadata={group_tag(name)})
            self.membership = Membership(self.store, settings, name, self.replica)  # type: ignore[arg-type]
            self.on_stop(self.membership.stop, early=True)
        else:
            self.serve(self.model, name)
        self.on_stop(self.model.close)
        self.on_stop(self.store.close)
        self.on_stop(self.audit.close)

    def start(self) -> ModelService:
        super().start()
        if self.membership is not None:
            self.membership.start()
        return self
