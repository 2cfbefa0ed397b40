"""The model server: a typed, versioned, durable, observable model over Pyro5.

:class:`ModelServer` is the one object a model service registers. Its remote
methods are declared one by one with their permission (``ModelServer.SURFACE``;
nothing else of it, no lifecycle, no property, is remote). Reads (``query``,
``snapshot``, ``history``) and subscriptions are open to every connection;
``modify`` needs the controller role and runs
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

A subscription belongs to whoever made it: its identity, and for anonymous
callers the address they called from. Only they (or an admin) renew, replace or
end it; each identity, and each address of anonymous callers, holds a bounded
number; the callback must be on the subscriber's own address (or a host named in
``MVC_CALLBACK_HOSTS``); each gets a secret capability, which every notification
to it carries (see :mod:`remote_mvc.viewer`). Every refusal is audited (per
address throttled, see :meth:`AuditLog.refusal`) with the claimed identity, the
address, the method and the reason.

A change event, as viewers and ``history`` see it::

    {"model": "remote_mvc.model", "revision": 7, "time": 1764057600.12,
     "identity": "controller", "changes": {"value": {"old": 0, "new": 99}},
     "values": {"name": "xxx", "value": 99}}
"""

from __future__ import annotations

import collections
import hmac
import logging
import reprlib
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from Pyro5.core import URI
from Pyro5.errors import PyroError

from . import auth
from ._fanout import Fanout
from ._sender import Subscriber
from ._store import Store
from .audit import AuditLog
from .config import Settings
from .errors import (
    ConflictError,
    HistoryCompacted,
    LimitExceeded,
    MVCError,
    PermissionDenied,
    PersistenceError,
    ValidationError,
)
from .logs import log_event, log_exception
from .metrics import Metrics
from .model import Model
from .service import Service

__all__ = ["ModelServer", "ModelService"]

log = logging.getLogger("remote_mvc.server")


SUMMARY_LIMIT = 256  # characters of a refused call's arguments kept in its audit record


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 20
_REPR.maxlevel = 4


def _summary(value: Any, limit: int = SUMMARY_LIMIT) -> Any:
    """A JSON-safe, bounded copy of untrusted input for the audit log: a small dict as it is, anything
    else as a bounded ``repr`` (reprlib: a huge value's full repr is never made)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - hostile input may not even have a repr
        return "<unprintable>"
    if isinstance(value, dict) and len(text) <= limit and len(value) <= _REPR.maxdict \
            and all(_small(k) and _small(v) for k, v in value.items()):
        return value
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


def _small(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 120)


def _host(address: str | None) -> str | None:
    """The host part of a ``host:port`` client address (None for in-process callers)."""
    return None if address is None else address.rsplit(":", 1)[0].strip("[]")


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


@auth.declared
class ModelServer:
    """A model's values, revision, history and subscribers, served over Pyro5."""

    def __init__(self, name: str, schema: type[Model], store: Store, audit: AuditLog, metrics: Metrics, *,
                 lease_seconds: float = 10.0, call_timeout: float = 3.0, queue_limit: int = 1000,
                 batch_max: int = 500, history_limit: int = 10000,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 max_subscriptions_per_identity: int = 1000, max_subscriptions_per_address: int = 200,
                 callback_hosts: Iterable[str] = ()) -> None:
        self._name = name
        self._max_per_identity = max_subscriptions_per_identity
        self._max_per_address = max_subscriptions_per_address
        self._callback_hosts = frozenset(h.strip().strip("[]") for h in callback_hosts if h.strip())
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
        self._reaper_errors = metrics.loop_errors.labels("reaper")
        self._reaper = threading.Thread(target=self._reap, name=f"lease-reaper-{name}", daemon=True)
        self._reaper.start()
        log_event(log, "model_loaded", "model loaded", model=name, revision=self._revision, values=self._values)

    # reads -----------------------------------------------------------------
    @auth.remote(auth.READ)
    def query(self) -> dict[str, Any]:
        """The current values."""
        with self._lock:
            return dict(self._values)

    @auth.remote(auth.READ)
    def snapshot(self) -> dict[str, Any]:
        """Revision and values, read together."""
        with self._lock:
            return {"model": self._name, "revision": self._revision, "values": dict(self._values),
                    "time": self._clock()}

    @auth.remote(auth.READ)
    def schema(self) -> dict[str, dict[str, Any]]:
        """The fields with their types and defaults."""
        return self._schema.describe()

    @auth.remote(auth.READ)
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

    @auth.remote(auth.READ)
    def whoami(self) -> dict[str, Any]:
        identity, role, address = auth.caller()
        return {"identity": identity, "role": role, "address": address}

    # changes ---------------------------------------------------------------
    @auth.remote(auth.MODIFY)
    def modify(self, changes: dict[str, Any], expected_revision: int | None = None,
               request_id: str | None = None) -> int:
        """Validate, record, persist and apply a change; notify viewers; return the new revision.

        ``request_id`` (optional, unique per change) makes retries safe: a request
        id seen before returns the revision it produced without applying again.
        """
        identity, role, address = auth.caller()
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
        """A modify refused by the model (invalid, conflict): counted, logged, audited with its changes."""
        auth.mark_audited(exc)
        self._metrics.modifications.labels(self._name, result).inc()
        self._metrics.refusals.labels("modify", result).inc()
        log_event(log, "modify_refused", f"modify refused: {exc}", level=logging.WARNING, model=self._name,
                  identity=identity, client=address, result=result)
        self._record_refusal(identity, address, changes, result, str(exc), throttled=True)

    def _record_refusal(self, identity: str, address: str | None, changes: Any, result: str, error: str,
                        throttled: bool = False) -> None:
        record = self._audit.refusal if throttled else self._audit.record
        try:
            record("modify", identity, address, result, model=self._name, changes=_summary(changes),
                   error=error[:1000])
        except PersistenceError:
            pass  # counted in the metric; the refusal stands either way

    def on_refusal(self, refusal: auth.Refusal) -> None:
        """Every refused remote call (see :func:`auth.remote`): counted, logged and audited (per
        address throttled) with the claimed identity, the address, the method and the reason."""
        r = refusal
        self._metrics.refusals.labels(r.method, r.result).inc()
        log_event(log, "call_refused", f"{r.method} refused: {r.error}", level=logging.WARNING, model=self._name,
                  method=r.method, identity=r.identity, role=r.role, client=r.address, result=r.result)
        if r.method == "modify":
            self._metrics.modifications.labels(self._name, r.result).inc()
            detail = {"changes": _summary(r.args[0] if r.args else r.kwargs.get("changes"))}
        else:
            detail = {"arguments": _summary([*r.args, r.kwargs] if r.kwargs else list(r.args))}
        try:
            self._audit.refusal(r.method, r.identity, r.address, r.result, model=self._name, role=r.role,
                                error=r.error[:1000], **detail)
        except PersistenceError:
            pass  # counted in the audit failure metric; the refusal stands either way

    # subscriptions ---------------------------------------------------------
    @auth.remote(auth.READ)
    def subscribe(self, callback_uri: str, viewer_id: str, since_revision: int | None = None,
                  ordered_oneway: bool = False, capability: str | None = None) -> dict[str, Any]:
        """Subscribe a viewer's callback object; it first gets what it missed.

        With ``since_revision`` the viewer gets the events after it (or a snapshot
        when the history no longer reaches back); without, a snapshot.
        ``ordered_oneway``: the viewer's daemon runs oneway ``notify`` calls in
        order (remote-mvc's viewer hosts do), so most calls need no answer.
        The reply holds the subscription id, the lease granted (renew well within
        it), the revision and the subscription's secret ``capability``, which
        every notification carries: the viewer applies only those.

        The callback must be on the caller's own address (or a host allowed by
        ``MVC_CALLBACK_HOSTS``). A viewer id already subscribed is replaced only
        for its owner (same identity; for anonymous callers the same address),
        an admin, or a caller that shows the old subscription's ``capability``
        (a viewer host whose address changed).
        """
        identity, role, address = auth.caller()
        host = _host(address)
        if not isinstance(callback_uri, str) or not isinstance(viewer_id, str) or not viewer_id \
                or len(callback_uri) > 1000 or len(viewer_id) > 200:
            raise ValidationError("subscribe needs a callback URI and a viewer id (strings, at most 1000 and "
                                  "200 characters)")
        if since_revision is not None and (not isinstance(since_revision, int) or isinstance(since_revision, bool)):
            raise ValidationError("since_revision must be an integer or None")
        if capability is not None and not isinstance(capability, str):
            raise ValidationError("capability must be a string or None")
        self._check_callback(callback_uri, host)
        with self._lock:
            old = self._fanout.of_viewer(viewer_id)
            if old is not None and not (self._owns(old, identity, role, host)
                                        or self._shows(old, capability)):
                raise PermissionDenied(f"viewer id {viewer_id!r} is subscribed by another client")
            self._check_caps(identity, role, host, replacing=old)
            backlog = None
            if since_revision is not None and since_revision <= self._revision:
                try:
                    backlog = self.history(since_revision, limit=self._fanout.queue_limit + 1)
                except HistoryCompacted:
                    backlog = None
                if backlog is not None and len(backlog) != self._revision - since_revision:
                    backlog = None  # too far behind: a snapshot is cheaper
            sub = self._fanout.add(viewer_id, callback_uri, backlog, oneway=ordered_oneway is True,
                                   identity=identity, host=host)
            return {"subscription": sub.id, "lease": self._fanout.lease_seconds, "revision": self._revision,
                    "capability": sub.capability}

    def _check_callback(self, callback_uri: str, host: str | None) -> None:
        """A callback must be a ``PYRO:object@host:port`` URI on the subscriber's own address, so the
        server never connects anywhere else for anyone (no port probing, no pushing to a third party)."""
        try:
            uri = URI(callback_uri)
        except (PyroError, ValueError, TypeError) as exc:
            raise ValidationError(f"bad callback URI: {exc}") from None
        if uri.protocol != "PYRO" or not uri.host or uri.sockname or not uri.port:
            raise ValidationError("the callback must be a PYRO:object@host:port URI")
        if host is None or "*" in self._callback_hosts:
            return  # an in-process caller, or the operator turned the check off
        target = uri.host.strip("[]")
        if target != host and target not in self._callback_hosts:
            raise PermissionDenied(f"callback host {target} is not the subscriber's own address {host} "
                                   "(set MVC_CALLBACK_HOSTS for a viewer behind NAT)")

    @staticmethod
    def _owns(sub: Subscriber, identity: str, role: str, host: str | None) -> bool:
        """Whether the caller may renew, replace or end ``sub``: its owner, or an admin."""
        if auth.DROP in auth.ROLES.get(role, ()):
            return True
        if sub.identity != identity:
            return False
        return identity != auth.ANONYMOUS or sub.host == host

    @staticmethod
    def _shows(sub: Subscriber, capability: str | None) -> bool:
        return capability is not None and hmac.compare_digest(sub.capability.encode(),
                                                              capability.encode("utf-8", "surrogatepass"))

    def _check_caps(self, identity: str, role: str, host: str | None, replacing: Subscriber | None) -> None:
        """Bound the subscriptions one identity (anonymous: one address) holds; admins and in-process
        callers are not bound; a replacement by the same owner adds none."""
        if auth.DROP in auth.ROLES.get(role, ()):
            return
        per_identity, per_address = self._fanout.owned(identity, host)
        if replacing is not None and replacing.identity == identity:
            per_identity, per_address = per_identity - 1, per_address - (replacing.host == host)
        if identity == auth.ANONYMOUS:
            if per_address >= self._max_per_address:
                raise LimitExceeded(f"{per_address} subscriptions from {host} already: the limit for anonymous "
                                    f"callers from one address is {self._max_per_address}")
        elif per_identity >= self._max_per_identity:
            raise LimitExceeded(f"{identity} holds {per_identity} subscriptions already: the limit is "
                                f"{self._max_per_identity}")

    @auth.remote(auth.READ)
    def renew(self, subscription_ids: list[str]) -> list[str]:
        """Renew leases; returns the ids this server does not know (re-subscribe those). Only the
        owner's subscriptions are renewed: another's id is answered as unknown (and audited)."""
        if not isinstance(subscription_ids, (list, tuple)) or len(subscription_ids) > 100_000 \
                or not all(isinstance(sid, str) for sid in subscription_ids):
            raise ValidationError("renew takes a list of subscription ids (strings)")
        identity, role, address = auth.caller()
        host = _host(address)
        mine, foreign = [], []
        for sid in subscription_ids:
            sub = self._fanout.get(sid)
            (foreign if sub is not None and not self._owns(sub, identity, role, host) else mine).append(sid)
        unknown = self._fanout.renew(mine)
        if foreign:
            self.on_refusal(auth.Refusal("renew", identity, role, address, "forbidden",
                                         f"{len(foreign)} of the subscriptions are another client's",
                                         (foreign[:5],)))
        return unknown + foreign

    @auth.remote(auth.READ)
    def unsubscribe(self, subscription_id: str) -> bool:
        """End a subscription (its owner's or an admin's call); False when it is unknown."""
        if not isinstance(subscription_id, str):
            raise ValidationError("unsubscribe takes a subscription id (a string)")
        identity, role, address = auth.caller()
        sub = self._fanout.get(subscription_id)
        if sub is None:
            return False
        if not self._owns(sub, identity, role, _host(address)):
            raise PermissionDenied(f"subscription {subscription_id!r} is another client's")
        return self._fanout.remove(subscription_id)

    @auth.remote(auth.READ)
    def viewers(self) -> list[dict[str, Any]]:
        """Who is subscribed, with queue depth and last delivered revision; subscription ids and
        callback URIs only of the caller's own subscriptions (an admin sees all of them)."""
        identity, role, address = auth.caller()
        host = _host(address)
        return self._fanout.describe(lambda sub: self._owns(sub, identity, role, host))

    @auth.remote(auth.DROP)
    def drop_viewer(self, viewer_id: str) -> bool:
        """Force a viewer off (admin role)."""
        identity, _, address = auth.caller()
        dropped = self._fanout.drop_viewer(viewer_id, "admin")
        self._audit.record("drop_viewer", identity, address, "accepted" if dropped else "unknown",
                           model=self._name, viewer_id=_summary(viewer_id))
        return dropped

    # lifecycle -------------------------------------------------------------
    def _reap(self) -> None:
        """Expire leases, and write the audit log's due refusal summaries; survives any error."""
        interval = max(0.05, self._fanout.lease_seconds / 4)
        while not self._closed.wait(interval):
            try:
                self._fanout.expire()
                self._audit.flush_summaries()
            except Exception as exc:  # noqa: BLE001 - the reaper outlives whatever one round hits
                self._reaper_errors.inc()
                log_exception(log, "loop_error", "unexpected error in the lease reaper; it goes on", exc,
                              model=self._name, loop="reaper")

    def healthy(self) -> bool:
        """The reaper and the fan-out loop are running (see Fanout.healthy)."""
        return not self._closed.is_set() and self._reaper.is_alive() and self._fanout.healthy()

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
        self.store = Store(settings.state_file(), settings.history_limit, metrics=self.metrics)
        self.audit = AuditLog(settings.audit_file(), self.metrics, clock=clock,
                              refusals_per_second=settings.audit_refusals_per_second,
                              refusal_burst=settings.audit_refusal_burst)
        self.model = ModelServer(
            name, schema or ExampleModel, self.store, self.audit, self.metrics,
            lease_seconds=settings.lease_seconds, call_timeout=settings.call_timeout,
            queue_limit=settings.queue_limit, batch_max=settings.batch_max,
            history_limit=settings.history_limit, clock=clock,
            max_subscriptions_per_identity=settings.max_subscriptions_per_identity,
            max_subscriptions_per_address=settings.max_subscriptions_per_address,
            callback_hosts=settings.callback_hosts.split(","))
        self.refusal_audit = self.audit
        self.serve(self.model, name)
        self.on_stop(self.model.close)
        self.on_stop(self.store.close)
        self.on_stop(self.audit.close)

    def healthy(self) -> bool:
        return super().healthy() and self.model.healthy()
