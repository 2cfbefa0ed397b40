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

Who may subscribe, renew, replace or end a subscription (owners, caps, the
callback's host, a stream's member viewers) is :mod:`remote_mvc.subscriptions`'
policy; the server's subscription methods hand it the caller and add what it
admits to the fan-out. Every refusal is audited (per address throttled, see
:meth:`AuditLog.refusal`) with the claimed identity, the address, the method and
the reason.

A change event, as viewers and ``history`` see it::

    {"model": "remote_mvc.model", "revision": 7, "time": 1764057600.12,
     "identity": "controller", "changes": {"value": {"old": 0, "new": 99}},
     "values": {"name": "xxx", "value": 99}}
"""

from __future__ import annotations

import logging
import reprlib
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import auth
from .audit import AuditLog
from .client import group_tag
from .commit import GroupCommit, Pending, Pipeline
from .config import Settings
from .errors import (
    ConflictError,
    HistoryCompacted,
    MVCError,
    PermissionDenied,
    PersistenceError,
    ServiceUnavailable,
    ValidationError,
)
from .fanout import Fanout
from .logs import log_event, log_exception
from .metrics import Metrics
from .model import Model
from .service import Service
from .store import ReadableStore, is_etcd, open_store
from .subscriptions import Caller, Subscriptions

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


@auth.declared
class ModelServer:
    """A model's values, revision, history and subscribers, served over Pyro5."""

    def __init__(self, name: str, schema: type[Model], store: ReadableStore, audit: AuditLog, metrics: Metrics, *,
                 lease_seconds: float = 10.0, call_timeout: float = 3.0, queue_limit: int = 1000,
                 batch_max: int = 500, history_limit: int = 10000,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 max_subscriptions_per_identity: int = 1000, max_subscriptions_per_address: int = 200,
                 callback_hosts: Iterable[str] = (), role_of: Callable[[str], str | None] | None = None,
                 max_stream_members: int = 5000) -> None:
        self._name = name
        self._role_of = role_of  # identity -> role from this server's own table; None: no delegation
        self._schema = schema
        self._audit = audit
        self._metrics = metrics
        self._monotonic = monotonic
        self._fanout_settings: dict[str, Any] = {"lease_seconds": lease_seconds, "call_timeout": call_timeout,
                                 "queue_limit": queue_limit, "batch_max": batch_max}
        # the commit path: etcd's pipeline for a store in etcd (cluster mode), else SQLite's group commit
        self._pipeline: Pipeline
        if getattr(store, "backend", "sqlite") == "etcd":
            from .cluster import EtcdPipeline  # only cluster mode needs the etcd client

            self._pipeline = EtcdPipeline(name, schema, store, audit, metrics,  # type: ignore[arg-type]
                                          history_limit=history_limit, call_timeout=call_timeout, clock=clock)
        else:
            self._pipeline = GroupCommit(name, schema, store, audit, metrics,  # type: ignore[arg-type]
                                         history_limit=history_limit, clock=clock)
        self._lock = self._pipeline.lock
        self._requests = self._pipeline.requests
        self._inflight = self._pipeline.inflight
        # the subscription policy, over the fan-out it holds (replaced when every viewer is reset)
        self._subscriptions = Subscriptions(
            self._new_fanout(), self._lock, max_per_identity=max_subscriptions_per_identity,
            max_per_address=max_subscriptions_per_address, callback_hosts=callback_hosts,
            max_members=max_stream_members)
        self._pipeline.publish = self._publish
        self._pipeline.refuse = self._record_refusal
        self._pipeline.on_reset = self._reset_fanout
        self._closed = threading.Event()
        self._reaper_errors = metrics.loop_errors.labels("reaper")
        self._reaper: threading.Thread | None = None  # made and started by start()
        self._started = False

    def start(self) -> ModelServer:
        """Start the commit pipeline's background work and the lease reaper (once; returns self).

        Nothing runs before: a constructed server holds no thread, so building one (a test, a
        service being wired) never leaves work behind; :meth:`close` ends what this started."""
        if not self._started:
            self._started = True
            self._pipeline.start()
            self._reaper = threading.Thread(target=self._reap, name=f"lease-reaper-{self._name}", daemon=True)
            self._reaper.start()
            log_event(log, "model_loaded", "model loaded", model=self._name, revision=self._revision,
                      values=self._values)
        return self

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_fanout(self) -> Fanout:
        return Fanout(self._name, self.snapshot, self._metrics, revision=self._revision,
                      clock=self._monotonic, **self._fanout_settings)

    @property
    def _fanout(self) -> Fanout:
        """The fan-out to this server's viewers (the subscription policy holds it)."""
        return self._subscriptions.fanout

    def _publish(self, event: dict[str, Any]) -> None:
        """An applied event goes to this server's viewers (pipeline lock held)."""
        self._fanout.publish(event)

    def _reset_fanout(self, reason: str) -> None:
        """The applied state jumped (a new epoch, or history that no longer continues ours): every
        viewer is dropped from a fresh fan-out; their hosts subscribe again and get a snapshot
        (pipeline lock held)."""
        old, self._subscriptions.fanout = self._fanout, self._new_fanout()
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

    # reads -----------------------------------------------------------------
    @auth.remote(auth.READ)
    def query(self) -> dict[str, Any]:
        """The current values (ServiceUnavailable when this replica cannot tell they are current)."""
        with self._lock:
            if self._pipeline.stale:
                raise ServiceUnavailable("this replica cannot reach etcd: its values may be stale; "
                                         "use snapshot() (it says stale) or another replica")
            return dict(self._values)

    @auth.remote(auth.READ)
    def snapshot(self) -> dict[str, Any]:
        """Revision and values, read together (in cluster mode with ``epoch`` and ``stale``)."""
        return self._pipeline.snapshot()

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
        return self._pipeline.history_after(since_revision, limit)

    @auth.remote(auth.READ)
    def whoami(self) -> dict[str, Any]:
        """The caller's identity and role, as this server sees them."""
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
        identity, _, address = auth.caller()
        return self._modify(changes, expected_revision, request_id, identity, address)

    @auth.remote(auth.DELEGATE)
    def modify_for(self, on_behalf_of: str, changes: dict[str, Any], expected_revision: int | None = None,
                   request_id: str | None = None) -> int:
        """:meth:`modify` for another identity (the web gateway acting for a person it authenticated).

        The caller needs ``delegate`` (role ``gateway``); the named identity's role is looked up in
        this server's own credentials table and must hold ``modify``; the change is audited and
        published as that identity, with ``via`` naming the caller.
        """
        via, _, address = auth.caller()
        if not isinstance(on_behalf_of, str) or not 0 < len(on_behalf_of) <= 128:
            exc = PermissionDenied("on_behalf_of must name an identity (at most 128 characters)")
            self._refused(_summary(on_behalf_of), address, changes, "forbidden", exc, via=via)
            raise exc
        role = self._role_of(on_behalf_of) if self._role_of is not None else None
        if role is None or auth.MODIFY not in auth.ROLES.get(role, ()):
            exc = PermissionDenied(f"{on_behalf_of} ({role or 'unknown identity'}) via {via} may not modify"
                                   + ("" if self._role_of is not None else ": delegation not enabled here"))
            self._refused(on_behalf_of, address, changes, "forbidden", exc, via=via)
            raise exc
        return self._modify(changes, expected_revision, request_id, on_behalf_of, address, via)

    def _modify(self, changes: Any, expected_revision: Any, request_id: Any, identity: str, address: str | None,
                via: str | None = None) -> int:
        """The one path of a remote change: request id dedupe, validation, the commit pipeline."""
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
                    self._refused(identity, address, changes, "conflict", exc, via=via)
                    raise
                except ValidationError as exc:
                    self._refused(identity, address, changes, "invalid", exc, via=via)
                    raise
                pending = self._enqueue(normalized, identity, address, request_id,
                                        expected_revision=expected_revision, via=via)
        return self._commit(pending)

    def modify_local(self, changes: dict[str, Any], identity: str, expected_revision: int | None = None) -> int:
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
                 audited: bool = True, expected_revision: int | None = None, via: str | None = None) -> Pending:
        """Queue a validated change for the commit pipeline (lock held)."""
        return self._pipeline.enqueue(normalized, identity, address, request_id, audited, expected_revision, via)

    def _commit(self, pending: Pending) -> int:
        """Make ``pending`` durable, applied and published; its revision, or its error raised."""
        return self._pipeline.commit(pending)

    def _refused(self, identity: str, address: str | None, changes: Any, result: str, exc: MVCError,
                 via: str | None = None) -> None:
        """A modify refused by the model (invalid, conflict): counted, logged, audited with its changes."""
        auth.mark_audited(exc)
        self._metrics.modifications.labels(self._name, result).inc()
        self._metrics.refusals.labels("modify", result).inc()
        log_event(log, "modify_refused", f"modify refused: {exc}", level=logging.WARNING, model=self._name,
                  identity=identity, client=address, result=result, via=via)
        self._record_refusal(identity, address, changes, result, str(exc), throttled=True, via=via)

    def _record_refusal(self, identity: str, address: str | None, changes: Any, result: str, error: str,
                        throttled: bool = False, via: str | None = None) -> None:
        record = self._audit.refusal if throttled else self._audit.record
        try:
            record("modify", identity, address, result, model=self._name, changes=_summary(changes),
                   error=error[:1000], **({"via": via} if via else {}))
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
                  ordered_oneway: bool = False, capability: str | None = None,
                  epoch: str | None = None, members: list[str] | None = None) -> dict[str, Any]:
        """Subscribe a viewer's callback object; it first gets what it missed.

        With ``since_revision`` the viewer gets the events after it (or a snapshot
        when the history no longer reaches back); without, a snapshot.
        ``ordered_oneway``: the viewer's daemon runs oneway ``notify`` calls in
        order (remote-mvc's viewer hosts do), so most calls need no answer.
        ``epoch`` (cluster mode): the model incarnation ``since_revision`` belongs
        to; another one than the model's gets a snapshot, never another history.
        The reply holds the subscription id, the lease granted (renew well within
        it), the revision and the subscription's secret ``capability``, which
        every notification carries: the viewer applies only those.

        The callback must be on the caller's own address (or a host allowed by
        ``MVC_CALLBACK_HOSTS``). A viewer id already subscribed is replaced only
        for its owner (same identity; for anonymous callers the same address),
        an admin, or a caller that shows the old subscription's ``capability``
        (a viewer host whose address changed).

        ``members`` (a viewer host's stream, see :mod:`remote_mvc.hoststream`): the ids of the
        viewers this one subscription serves, at most ``max_stream_members``, each listed by
        ``viewers()``; an id another client's subscription or stream holds is refused.
        """
        caller = Caller(*auth.caller())
        member_ids = self._subscriptions.check_request(caller, callback_uri, viewer_id, since_revision, capability,
                                                       epoch, members)
        if (since_revision is not None and self._pipeline.epoch is not None and epoch == self._pipeline.epoch
                and not self._pipeline.wait_applied(since_revision, self._fanout.call_timeout)):
            # a viewer coming from a replica further ahead: never send it backwards
            raise ServiceUnavailable(f"this replica has not reached revision {since_revision} yet; "
                                     "subscribe to another one or try again")
        with self._lock:
            old = self._subscriptions.admit(caller, viewer_id, capability, member_ids)
            backlog = self._backlog(since_revision if epoch is None or epoch == self._pipeline.epoch else None)
            sub = self._fanout.add(viewer_id, callback_uri, backlog, oneway=ordered_oneway is True,
                                   identity=caller.identity, host=caller.host)
            self._subscriptions.added(sub, old, member_ids)
            reply = {"subscription": sub.id, "lease": self._fanout.lease_seconds, "revision": self._revision,
                     "capability": sub.capability}
            if self._pipeline.epoch is not None:
                reply["epoch"] = self._pipeline.epoch
            return reply

    def _backlog(self, since_revision: int | None) -> list[dict[str, Any]] | None:
        """The events a viewer at ``since_revision`` missed, or None for a snapshot instead (no
        revision of this model's incarnation, history compacted, or too far behind; lock held)."""
        if since_revision is None or since_revision > self._revision:
            return None
        try:
            backlog = self.history(since_revision, limit=self._fanout.queue_limit + 1)
        except HistoryCompacted:
            return None
        if len(backlog) != self._revision - since_revision:
            return None  # too far behind: a snapshot is cheaper
        return backlog

    @auth.remote(auth.READ)
    def renew(self, subscription_ids: list[str]) -> list[str]:
        """Renew leases; returns the ids this server does not know (re-subscribe those). Only the
        owner's subscriptions are renewed: another's id is answered as unknown (and audited)."""
        caller = Caller(*auth.caller())
        unknown, foreign = self._subscriptions.renew(caller, subscription_ids)
        if foreign:
            self.on_refusal(auth.Refusal("renew", caller.identity, caller.role, caller.address, "forbidden",
                                         f"{len(foreign)} of the subscriptions are another client's",
                                         (foreign[:5],)))
        return unknown + foreign

    @auth.remote(auth.READ)
    def set_members(self, subscription_id: str, viewer_ids: list[str]) -> bool:
        """A viewer host's stream says which viewers it serves now (one joined or left); its owner's
        call only (or an admin's). False when the subscription is unknown (subscribe again)."""
        return self._subscriptions.set_members(Caller(*auth.caller()), subscription_id, viewer_ids)

    @auth.remote(auth.READ)
    def unsubscribe(self, subscription_id: str) -> bool:
        """End a subscription (its owner's or an admin's call); False when it is unknown."""
        return self._subscriptions.unsubscribe(Caller(*auth.caller()), subscription_id)

    @auth.remote(auth.READ)
    def viewers(self) -> list[dict[str, Any]]:
        """Who is subscribed, with queue depth and last delivered revision; subscription ids and
        callback URIs only of the caller's own subscriptions (an admin sees all of them). A viewer
        host's stream is listed as one entry per member viewer, with ``stream`` naming the stream."""
        return self._subscriptions.describe(Caller(*auth.caller()))

    @auth.remote(auth.DROP)
    def drop_viewer(self, viewer_id: str) -> bool:
        """Force a viewer off (admin role); a member of a viewer host's stream takes its stream off
        (the host subscribes again)."""
        identity, _, address = auth.caller()
        dropped = self._subscriptions.drop_viewer(viewer_id, "admin")
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
                self._subscriptions.prune()
                self._audit.flush_summaries()
            except Exception as exc:  # noqa: BLE001 - the reaper outlives whatever one round hits
                self._reaper_errors.inc()
                log_exception(log, "loop_error", "unexpected error in the lease reaper; it goes on", exc,
                              model=self._name, loop="reaper")

    def may_be_stale(self) -> bool:
        """True in cluster mode while this replica cannot reach etcd: what it serves may be behind."""
        return self._pipeline.stale

    def healthy(self) -> bool:
        """The reaper and the fan-out loop are running (see Fanout.healthy)."""
        reaper = self._reaper
        return not self._closed.is_set() and reaper is not None and reaper.is_alive() and self._fanout.healthy()

    def close(self) -> None:
        """Stop the pipeline, the reaper and the fan-out."""
        self._closed.set()
        self._pipeline.close()
        self._fanout.close()

    @property
    def revision(self) -> int:
        """The revision of the last applied change."""
        return self._revision

    @property
    def pipeline(self) -> Pipeline:
        """The commit pipeline behind this server (its backend's state and write path)."""
        return self._pipeline

    @property
    def subscriber_count(self) -> int:
        """How many viewers are subscribed."""
        return len(self._fanout)


class ModelService(Service):
    """A process serving one model: store, audit log, model server, daemon, metrics.

    ``server`` is the :class:`ModelServer` this process serves (the remote object); ``model``
    is kept as an alias of it for code written before the name was clarified.
    """

    def __init__(self, settings: Settings, schema: type[Model] | None = None, name: str | None = None,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(settings, metrics)
        from .model import ExampleModel

        name = name or settings.model_name
        self.store = open_store(settings, self.metrics)
        audit_path = settings.audit_file()
        self.replica = settings.replica_name()
        if is_etcd(settings.store) and not settings.audit_path:  # replicas may share a state directory
            audit_path = Path(settings.state_dir) / f"{settings.service}-{self.replica}-audit.jsonl"
        self.audit = AuditLog(audit_path, self.metrics, clock=clock,
                              refusals_per_second=settings.audit_refusals_per_second,
                              refusal_burst=settings.audit_refusal_burst)
        self.server = ModelServer(
            name, schema or ExampleModel, self.store, self.audit, self.metrics,
            lease_seconds=settings.lease_seconds, call_timeout=settings.call_timeout,
            queue_limit=settings.queue_limit, batch_max=settings.batch_max,
            history_limit=settings.history_limit, clock=clock,
            max_subscriptions_per_identity=settings.max_subscriptions_per_identity,
            max_subscriptions_per_address=settings.max_subscriptions_per_address,
            callback_hosts=settings.callback_hosts.split(","), role_of=self._role_of,
            max_stream_members=settings.max_stream_members)
        self.refusal_audit = self.audit
        self.membership = None
        if is_etcd(settings.store):  # cluster mode: one name per replica, found through the group's metadata
            from .replicas import Membership

            self.serve(self.server, f"{name}.replica.{self.replica}", object_id=name, metadata={group_tag(name)})
            self.membership = Membership(self.store, settings, name, self.replica,  # type: ignore[arg-type]
                                         metrics=self.metrics)
            self.on_stop(self.membership.stop, early=True)
        else:
            self.serve(self.server, name)
        self.on_stop(self.server.close)
        self.on_stop(self.store.close)
        self.on_stop(self.audit.close)

    @property
    def model(self) -> ModelServer:
        """Alias of :attr:`server` (the served :class:`ModelServer`, not a :class:`Model`)."""
        return self.server

    def start(self) -> ModelService:
        """Start the model server, then serve it; returns self."""
        self.server.start()  # before the daemon takes calls for it
        super().start()
        if self.membership is not None:
            self.membership.start()
        return self

    def healthy(self) -> bool:
        """True while the service and its model server are healthy."""
        return super().healthy() and self.server.healthy()

    def may_register(self) -> bool:
        """Not while the replica may be stale (cut off from etcd): its siblings remove its name when
        its liveness key expires, and it must not put the name back until it is in touch again."""
        return not self.server.may_be_stale()

    def _role_of(self, identity: str) -> str | None:
        """The role of ``identity`` in this service's credentials table (for delegated modifies)."""
        ident = self.credentials.get(identity)
        return ident.role if ident is not None else None
