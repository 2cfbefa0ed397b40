"""Viewers: callback objects that mirror a model, and the host that keeps them subscribed.

A :class:`Viewer` receives batches from the model server's sender for it and
applies each change exactly once, in revision order: duplicates are skipped, a
gap is filled from ``history`` (or a snapshot when the history no longer
reaches back). A :class:`ViewerHost` is one Pyro5 daemon holding one or many
viewers (a viewer process holds one; a benchmark holds hundreds). Its keeper
thread subscribes them, renews all their leases in one call per model,
re-subscribes from the last revision after a model server restart or a drop,
and unsubscribes them when the host stops.

A viewer applies only what its model server sends it: the subscribe reply gives
the host a secret capability for the subscription, every notification carries
it, and a notification without it is refused (counted in
``remote_mvc_refusals_total{method="notify"}`` and logged), whoever can reach
the daemon. ``notify`` is the viewer's only remote method (``Viewer.SURFACE``).
An event is not applied blindly either: a revision past what the model server's
own history or snapshot says is refused, and the viewer re-syncs from the server
instead of jumping. The host renews at a fraction of the lease the server grants
(not its own setting), and its keeper thread survives any error (logged, counted
in ``remote_mvc_loop_errors_total{loop="viewer-keeper"}``); ``healthy()`` is
False while a viewer is not subscribed or the keeper is not turning.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import Pyro5.api
from Pyro5.errors import CommunicationError, PyroError
from Pyro5.errors import TimeoutError as PyroTimeout

from . import auth
from ._backoff import Backoff
from .client import ModelClient
from .config import Settings
from .errors import HistoryCompacted, MVCError, PermissionDenied, SubscriptionError, ValidationError
from .hoststream import Dispatcher, Stream
from .logs import log_event, log_exception
from .metrics import Metrics
from .pyro.daemons import make_viewer_daemon
from .service import Service

__all__ = ["Viewer", "ViewerHost", "Unsubscriber", "unsubscribe"]

log = logging.getLogger("remote_mvc.viewer")

ChangeHandler = Callable[["Viewer", dict[str, Any] | None], None]


@auth.declared
class Viewer:
    """Mirror of one model, kept current by the server's notifications."""

    _mvc_notify = True  # notify.NOTIFY_MARKER: ViewerDaemon may hand notify calls over directly

    def __init__(self, viewer_id: str, model: str, *, on_change: ChangeHandler | None = None,
                 metrics: Metrics | None = None, log_values: bool = True, record: bool = False,
                 clock: Callable[[], float] = time.time, max_gap: int = 10000, admit_wait: float = 2.0) -> None:
        self.viewer_id = viewer_id
        self.model = model
        self.on_change = on_change
        self.log_values = log_values
        self.clock = clock
        self.values: dict[str, Any] = {}
        self.revision = 0
        self.synced = False  # True once a snapshot or the first events were applied
        self.epoch: str | None = None  # cluster mode: the model incarnation our revisions belong to
        self.received: list[int] | None = [] if record else None  # revisions applied, in order
        self.snapshots = 0
        self.fetch: Callable[[int], list[dict[str, Any]]] | None = None  # history(since) for gaps
        self.fetch_snapshot: Callable[[], dict[str, Any]] | None = None
        self.max_gap = max_gap  # a gap wider than this is not walked through history: a snapshot instead
        self.admit_wait = admit_wait  # how long a notification may wait for the capability being subscribed for
        # a host's stream mirror records what it applied here (as notifications), to hand exactly that on
        self.applied: list[dict[str, Any]] | None = None
        self.measure = True  # observe notification latency (a host's stream mirror does not)
        self.refused = 0  # notifications refused (no capability, malformed, implausible revision)
        self._capabilities: tuple[str, ...] = ()  # the current subscription's, and the one before it
        self._subscribing = False
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting = 0  # threads in wait_for
        metrics = metrics or Metrics()
        self._latency = metrics.notification_latency.labels(model)
        self._revision_gauge = metrics.viewer_revision.labels(model)
        self._resyncs = metrics.resyncs
        self._refusals = metrics.refusals
        self._refusal_logged = 0.0

    # the subscription's capability (set by the viewer host from the subscribe reply) ------------------
    @property
    def capability(self) -> str | None:
        """The capability of the current subscription (shown when re-subscribing, see ModelServer)."""
        return self._capabilities[0] if self._capabilities else None

    def expect_capability(self) -> None:
        """A subscription is being made: its first notifications may come before its reply, so they
        wait (up to ``admit_wait``) for :meth:`accept_capability` rather than being refused."""
        with self._lock:
            self._subscribing = True

    def accept_capability(self, capability: str | None) -> None:
        """The subscribe reply's capability (None: the subscription failed; keep the current one)."""
        with self._changed:
            if capability is not None:
                self._capabilities = (capability, *self._capabilities[:1])
            self._subscribing = False
            self._changed.notify_all()

    def _admit(self, batch: Any) -> bool:
        """Whether ``batch`` carries this viewer's capability (lock held); constant-time compare."""
        given = batch.get("capability") if isinstance(batch, dict) else None
        if not isinstance(given, str):
            return False
        given_bytes = given.encode("utf-8", "surrogatepass")

        def known() -> bool:
            return any(hmac.compare_digest(c.encode(), given_bytes) for c in self._capabilities)

        if known():
            return True
        if self._subscribing and self._changed.wait_for(lambda: not self._subscribing, self.admit_wait):
            return known()
        return False

    def _refuse(self, reason: str, detail: str) -> None:
        """Count and log (at most once a second, with the count) a refused notification (lock held)."""
        self.refused += 1
        self._refusals.labels("notify", reason).inc()
        now = time.monotonic()
        if now - self._refusal_logged >= 1.0:
            self._refusal_logged = now
            log_event(log, "notify_refused", f"notification refused: {detail}", level=logging.WARNING,
                      viewer_id=self.viewer_id, model=self.model, reason=reason, refused=self.refused,
                      revision=self.revision)

    @auth.remote(auth.CAPABILITY)
    def notify(self, batch: dict[str, Any]) -> None:
        """Called by the model server: ``{"capability": ..., "events": [...]}`` or ``{..., "snapshot": {...}}``.

        Refused (PermissionDenied, counted, logged) without this viewer's
        subscription capability; refused (ValidationError) when malformed.
        """
        arrived = self.clock()
        with self._lock:
            if not self._admit(batch):
                self._refuse("capability", "without this viewer's subscription capability")
                raise PermissionDenied("notification refused: it does not carry this viewer's capability")
            problem = _malformed(batch)
            if problem:
                self._refuse("malformed", problem)
                raise ValidationError(f"notification refused: {problem}")
            self._apply_batch(batch, arrived)

    def deliver(self, batches: list[dict[str, Any]]) -> None:
        """Apply notifications a viewer host's stream already admitted and checked (not remote: the
        stream checked the capability and the shape, see :mod:`remote_mvc.hoststream`), in order;
        this viewer's own exactness still holds (duplicates skipped, gaps filled)."""
        arrived = self.clock()
        with self._lock:
            for batch in batches:
                self._apply_batch(batch, arrived)

    def _apply_batch(self, batch: dict[str, Any], arrived: float) -> None:
        """Apply one checked notification (lock held)."""
        if "snapshot" in batch:
            snap = batch["snapshot"]
            reason = str(batch.get("reason", "subscribe"))[:40]
            if reason != "conflated" or not self.synced or snap["revision"] >= self.revision \
                    or snap.get("epoch") != self.epoch:
                self._apply_snapshot(snap, reason)
        for event in batch.get("events", ()):
            if self.measure:
                self._latency.observe(max(0.0, arrived - event["time"]))
            self._apply_event(event)
        self._moved()

    def _moved(self) -> None:
        """The revision may have moved (lock held): the gauge, and whoever waits in wait_for."""
        self._revision_gauge.set(self.revision)
        if self._waiting:  # notify_all costs a few µs even with nobody waiting
            self._changed.notify_all()

    def state(self) -> dict[str, Any] | None:
        """Revision, values and epoch, read together (None before anything was applied)."""
        with self._lock:
            if not self.synced:
                return None
            return {"revision": self.revision, "values": dict(self.values), "epoch": self.epoch}

    def catch_up_to(self, revision: int) -> None:
        """Fill what this viewer misses up to ``revision`` from history (or a snapshot): a viewer
        joining a host's running stream behind it does so itself."""
        with self._lock:
            if self.synced and revision > self.revision:
                if revision - self.revision > self.max_gap:
                    self._resync("gap")
                else:
                    self._catch_up(revision)
                self._moved()

    def _apply_event(self, event: dict[str, Any]) -> None:
        revision = event["revision"]
        epoch = event.get("epoch")
        if epoch is not None and self.synced and self.epoch is not None and epoch != self.epoch:
            if self.fetch_snapshot is not None:  # another incarnation of the model: never mix histories
                self._apply_snapshot(self.fetch_snapshot(), "epoch")
            return
        if self.synced and revision <= self.revision:
            return  # already applied (a re-subscription can resend it)
        if self.synced and revision > self.revision + 1:
            if revision - self.revision > self.max_gap:  # not worth walking the history: a snapshot
                self._resync("gap")
            else:
                self._catch_up(revision - 1)
            if revision <= self.revision:
                return
            if revision > self.revision + 1:  # the server's own history and snapshot do not reach it
                self._refuse("implausible", f"revision {revision} is past what the model server has "
                                            f"({self.revision})")
                return
        if epoch is not None:
            self.epoch = epoch
        self._set(event["values"], revision, event)

    def _resync(self, reason: str) -> None:
        """Take a snapshot from the model server (lock held); without a source, leave the gap."""
        if self.fetch_snapshot is None:
            return
        try:
            snap = self.fetch_snapshot()
        except (MVCError, CommunicationError, PyroError) as exc:
            log_event(log, "gap", "snapshot for a re-sync failed; gap left open", level=logging.WARNING,
                      viewer_id=self.viewer_id, revision=self.revision, error=str(exc))
            return
        if snap["revision"] >= self.revision:
            self._apply_snapshot(snap, reason)

    def _catch_up(self, upto: int) -> None:
        """Fill the gap before ``upto + 1`` from history, or a snapshot."""
        try:
            if self.fetch is None:
                raise HistoryCompacted("no history source")
            while self.revision < upto:
                events = self.fetch(self.revision)
                if not events:
                    break
                for event in events:
                    if event["revision"] == self.revision + 1 and event["revision"] <= upto:
                        self._set(event["values"], event["revision"], event)
                if self.revision < upto and events[-1]["revision"] >= upto:
                    raise HistoryCompacted("history does not continue from our revision")
            self._resyncs.labels(self.model, "history").inc()
            log_event(log, "caught_up", "caught up from history", viewer_id=self.viewer_id, revision=self.revision)
        except (HistoryCompacted, MVCError, CommunicationError, PyroError) as exc:
            if self.fetch_snapshot is None:
                log_event(log, "gap", "gap in revisions left open", level=logging.WARNING,
                          viewer_id=self.viewer_id, revision=self.revision, error=str(exc))
                return
            self._resync("gap")

    def _apply_snapshot(self, snap: dict[str, Any], reason: str) -> None:
        self.snapshots += 1
        self.epoch = snap.get("epoch", self.epoch)
        self._resyncs.labels(self.model, "snapshot").inc()
        self._set(snap["values"], snap["revision"], None, reason=reason)

    def _set(self, values: dict[str, Any], revision: int, event: dict[str, Any] | None, reason: str = "") -> None:
        self.values = dict(values)
        self.revision = revision
        self.synced = True
        if self.applied is not None:
            if event is None:
                self.applied.append({"snapshot": {"revision": revision, "values": self.values, "epoch": self.epoch},
                                     "reason": reason})
            elif self.applied and "events" in self.applied[-1]:
                self.applied[-1]["events"].append(event)
            else:
                self.applied.append({"events": [event]})
        if self.received is not None:
            self.received.append(revision)
        if self.log_values:
            extra = {"snapshot": reason} if event is None else {"identity": event.get("identity")}
            log_event(log, "refresh", "Received a refresh notification from the server",
                      viewer_id=self.viewer_id, model=self.model, revision=revision, **extra)
            log_event(log, "values", f"Model values now: {self.values}", viewer_id=self.viewer_id,
                      model=self.model, revision=revision, values=self.values)
        if self.on_change is not None:
            self.on_change(self, event)

    def wait_for(self, revision: int, timeout: float) -> bool:
        """Block until this viewer has applied ``revision`` (tests, tools)."""
        with self._changed:
            self._waiting += 1
            try:
                return self._changed.wait_for(lambda: self.synced and self.revision >= revision, timeout)
            finally:
                self._waiting -= 1


def _malformed(batch: dict[str, Any]) -> str:
    """What is wrong with a notification's shape ("" when nothing is): what the server sends is
    checked before any of it is applied."""
    snap = batch.get("snapshot")
    if snap is not None and not (isinstance(snap, dict) and _revision_ok(snap.get("revision"))
                                 and isinstance(snap.get("values"), dict)):
        return "a snapshot needs an integer revision and a dict of values"
    events = batch.get("events", [])
    if not isinstance(events, list):
        return "events must be a list"
    for event in events:
        if not (isinstance(event, dict) and _revision_ok(event.get("revision"))
                and isinstance(event.get("values"), dict) and isinstance(event.get("time"), (int, float))):
            return "an event needs an integer revision, a dict of values and a time"
    return ""


def _revision_ok(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class ViewerHost(Service):
    """A Pyro5 daemon hosting viewers: one stream (one subscription, one connection) per model.

    The viewers of one model share the host's :class:`~remote_mvc.hoststream.Stream` for it: the
    model server sends each change once to the host, and the host's dispatcher hands it to each
    viewer (see :mod:`remote_mvc.hoststream`). The keeper thread subscribes the streams (with their
    member viewer ids), tells the server when members join or leave, renews the leases in one call
    per model, re-subscribes from the stream's revision after a model server restart or a drop, and
    unsubscribes when the host stops.
    """

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        super().__init__(settings, metrics)
        self.viewers: list[Viewer] = []
        self._streams: dict[str, Stream] = {}  # model -> the host's stream for it
        self._subs: dict[Stream, str] = {}  # stream -> subscription id
        self._told: dict[Stream, int] = {}  # stream -> the member version the server knows
        self._host_id = uuid.uuid4().hex[:12]
        self._dispatcher = Dispatcher(settings.viewer_dispatch_threads, settings.viewer_backlog, self.metrics,
                                      max_threads=settings.viewer_dispatch_threads_max,
                                      stall_seconds=settings.viewer_stall_seconds,
                                      spare_idle_seconds=settings.viewer_spare_idle_seconds)
        self._clients: dict[str, ModelClient] = {}
        self._kick = threading.Event()
        self._keeper: threading.Thread | None = None  # the only thread that subscribes and unsubscribes
        self._granted: dict[str, float] = {}  # model -> the lease its server granted (renew well within it)
        self.renewals = 0  # renew rounds made (tests, tools)
        self._keeper_turned = time.monotonic()
        self._keeper_errors = self.metrics.loop_errors.labels("viewer-keeper")
        self.on_stop(self._await_unsubscribed, early=True)
        self.on_stop(lambda: self._dispatcher.stop(min(5.0, self.stop_time_left())), early=True)

    def make_daemon(self) -> Pyro5.api.Daemon:
        """The viewer host's daemon: notify calls take the short path."""
        s = self.settings
        daemon = make_viewer_daemon(s.viewer_server, host=s.host, port=s.port, nathost=s.advertised_host(), natport=0)
        return self.guard(daemon)  # a connection idles without limit once its notify was accepted

    def add(self, viewer: Viewer) -> Viewer:
        """Host a viewer: it joins its model's stream (subscribed by the keeper; at once when running)."""
        self._attach(viewer)
        self.viewers.append(viewer)
        self._stream(viewer).join(viewer)
        self._kick.set()
        return viewer

    def remove(self, viewer: Viewer) -> bool:
        """Stop hosting a viewer: it leaves its stream (the server learns it; a stream left empty is
        unsubscribed by the keeper). False when it is not hosted here."""
        if viewer not in self.viewers:
            return False
        self.viewers.remove(viewer)
        stream = self._streams.get(viewer.model)
        if stream is not None:
            stream.leave(viewer)
        self._kick.set()
        log_event(log, "viewer_removed", "viewer left its stream", viewer_id=viewer.viewer_id, model=viewer.model,
                  revision=viewer.revision)
        return True

    def _stream(self, first: Viewer) -> Stream:
        """The stream for ``first``'s model; a new one is named after ``first`` (the server logs and
        ``drop_viewer`` know a one-viewer host, such as a viewer service, by its viewer's id)."""
        model = first.model
        stream = self._streams.get(model)
        if stream is None:
            mirror = Viewer(first.viewer_id, model, metrics=self.metrics, log_values=False)
            mirror.measure = False
            self._attach(mirror)
            stream = self._streams[model] = Stream(mirror.viewer_id, mirror, self._dispatcher)
            object_id = f"stream.{self._host_id}.{model}"
            if self.daemon is not None:
                self.daemon.register(stream, objectId=object_id)
            else:
                self.serve(stream, object_id=object_id)
        return stream

    def _attach(self, viewer: Viewer) -> None:
        """Give a viewer its model server's history and snapshot, for the gaps it fills itself."""
        client = self._client(viewer.model)
        viewer.fetch = lambda since: client.history(since)
        viewer.fetch_snapshot = client.snapshot

    def stream(self, model: str) -> Stream | None:
        """This host's stream for ``model`` (None when no viewer of it was added)."""
        return self._streams.get(model)

    def _client(self, model: str) -> ModelClient:
        if model not in self._clients:
            self._clients[model] = ModelClient(model, self.settings, retry_seconds=0)
        return self._clients[model]

    def start(self) -> ViewerHost:
        """Serve the streams, start the dispatcher and the keeper that subscribes them; returns self."""
        super().start()
        self._dispatcher.start()
        self._keeper = self._spawn(self._keep_subscribed, "viewer-keeper")
        return self

    def healthy(self) -> bool:
        """Serving, every viewer's stream subscribed, the keeper turning (not dead, not stuck), and the
        dispatcher not exhausted by stalled handlers."""
        keeper = self._keeper
        stuck_after = max(30.0, 10 * self.settings.call_timeout + self.lease())
        keeping = keeper is None or (keeper.is_alive() and time.monotonic() - self._keeper_turned < stuck_after)
        return (super().healthy() and keeping and self.subscribed() == len(self.viewers)
                and not self._dispatcher.exhausted())

    def lease(self) -> float:
        """The shortest lease the model servers granted (our own setting until one did)."""
        return min(self._granted.values(), default=self.settings.lease_seconds)

    def subscribed(self) -> int:
        """How many viewers are subscribed now (through their stream, its members as the server knows them)."""
        return sum(len(stream) for stream in list(self._subs) if self._told.get(stream) == stream.version)

    def subscriptions(self) -> int:
        """How many subscriptions this host holds (one per model with viewers)."""
        return len(self._subs)

    def dispatch_workers(self) -> int:
        """How many threads run the viewers' handlers now (spares for stalled handlers included)."""
        return self._dispatcher.workers()

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until every viewer is subscribed, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.subscribed() < len(self.viewers):
            if time.monotonic() > deadline:
                return False
            self._stopping.wait(0.02)
        return True

    def _settled(self) -> bool:
        """Every stream with members subscribed and its members told; none without members held."""
        return all((stream in self._subs and self._told.get(stream) == stream.version) == bool(len(stream))
                   for stream in self._streams.values())

    def _keep_subscribed(self) -> None:
        """Subscribe, tell member changes, renew leases in one call per model, re-subscribe what was lost."""
        failing = False
        backoff = Backoff(0.05, min(self.settings.retry_backoff_max, self.settings.lease_seconds))
        while not self._closing.is_set():
            self._keeper_turned = time.monotonic()
            try:
                self._renew_all()
                self._subscribe_missing()
                failing = False
                backoff.reset()
            except (MVCError, CommunicationError, PyroError, OSError) as exc:
                if not failing:
                    if isinstance(exc, MVCError):  # an answer: e.g. LimitExceeded for a member too many
                        log_event(log, "subscribe_refused", f"the model server refused: {exc}",
                                  level=logging.WARNING, error=f"{type(exc).__name__}: {exc}")
                    else:
                        log_event(log, "model_unreachable", "model server unreachable; will re-subscribe",
                                  level=logging.WARNING, error=str(exc))
                failing = True
                self._close_clients()
            except Exception as exc:  # noqa: BLE001 - the keeper outlives anything one round hits
                self._keeper_errors.inc()
                log_exception(log, "loop_error", "unexpected error in the viewer keeper; it goes on", exc,
                              loop="viewer-keeper")
                failing = True
                self._close_clients()
            lease = self.lease()
            if failing:  # jittered: hundreds of hosts must not come back in lock step after a restart
                wait = backoff.next()
            else:
                wait = lease / 3 if self._settled() else min(0.5, lease / 10)
            self._kick.wait(wait)
            self._kick.clear()
        try:
            self._unsubscribe_all()
        except Exception as exc:  # noqa: BLE001 - logged, never a silently dead keeper
            self._keeper_errors.inc()
            log_exception(log, "loop_error", "unexpected error unsubscribing at stop", exc, loop="viewer-keeper")

    def _close_clients(self) -> None:
        for client in self._clients.values():
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001 - closing must not stop the keeper either
                log.debug("closing a client failed: %s", exc)

    def _renew_all(self) -> None:
        by_model: dict[str, list[Stream]] = {}
        for stream, _sid in list(self._subs.items()):
            by_model.setdefault(stream.model, []).append(stream)
        if by_model:
            self.renewals += 1
        for model, streams in by_model.items():
            unknown = set(self._client(model).renew([self._subs[s] for s in streams]))
            for stream in streams:
                if self._subs[stream] in unknown:
                    self._forget(stream)
                    log_event(log, "lease_lost", "subscription lost; re-subscribing", viewer_id=stream.viewer_id,
                              model=model, revision=stream.revision, members=len(stream))

    def _forget(self, stream: Stream) -> None:
        """The server no longer holds ``stream``'s subscription (lost, or ended by us)."""
        del self._subs[stream]
        self._told.pop(stream, None)

    def _readvertise(self) -> None:
        """Follow a change of our own address (a container reconnected to its network
        with a new IP): later subscriptions must carry a callback URI that reaches us."""
        assert self.daemon is not None, "the host is started"
        port = self.daemon.locationStr.rsplit(":", 1)[1]
        location = f"{self.settings.advertised_host()}:{port}"
        if self.daemon.natLocationStr != location:
            log_event(log, "address_changed", f"now reachable at {location}", old=self.daemon.natLocationStr,
                      new=location)
            self.daemon.natLocationStr = location

    def _subscribe_missing(self) -> None:
        for stream in list(self._streams.values()):
            version = stream.version
            sid = self._subs.get(stream)
            if not len(stream):
                if sid is not None:  # its last viewer left: end the subscription
                    error = self._unsubscribe(stream.model, sid, time.monotonic() + 2 * self.settings.call_timeout)
                    if error is not None:
                        raise error
                    self._forget(stream)
                    log_event(log, "unsubscribed", "stream left without viewers: unsubscribed",
                              viewer_id=stream.viewer_id, model=stream.model)
                continue
            if sid is not None:
                if self._told.get(stream) != version:
                    if self._client(stream.model).set_members(sid, stream.member_ids()) is True:
                        self._told[stream] = version
                        continue
                    self._forget(stream)  # the server no longer knows it: subscribe again, now
                else:
                    continue
            self._subscribe(stream, version)

    def _subscribe(self, stream: Stream, version: int) -> None:
        self._readvertise()
        assert self.daemon is not None, "the host is started"
        mirror = stream.mirror
        uri = self.daemon.uriFor(stream)
        since, epoch = mirror.revision if mirror.synced else None, mirror.epoch
        if since is None:  # a new stream: from the oldest revision a member holds (none: a snapshot)
            held = sorted((v.revision, v.epoch or "") for v in stream.members() if v.synced)
            if held:
                since, epoch = held[0][0], held[0][1] or None
        client = self._client(stream.model)
        members = stream.member_ids()
        mirror.expect_capability()
        reply = None
        extra: dict[str, Any] = {"members": members}
        if epoch is not None:
            extra["epoch"] = epoch  # cluster mode: the incarnation our revisions belong to
        try:  # our daemon runs oneway notify calls in order; our old capability proves the stream ours
            reply = _checked_reply(client.subscribe(str(uri), stream.viewer_id, since, True, mirror.capability,
                                                    **extra))
        finally:
            mirror.accept_capability(reply["capability"] if reply else None)
        self._granted[stream.model] = reply["lease"]
        self._subs[stream] = reply["subscription"]
        self._told[stream] = version
        took_ms = round((time.monotonic() - self._keeper_turned) * 1000, 1)  # this keeper turn so far
        log_event(log, "subscribed", f"subscribed to {stream.model}", viewer_id=stream.viewer_id,
                  uri=str(uri), members=len(members), revision=mirror.revision, server_revision=reply["revision"],
                  since=since, took_ms=took_ms)

    def _unsubscribe(self, model: str, sid: str, retry_until: float) -> Exception | None:
        """Unsubscribe through this host's client of ``model`` (see :func:`unsubscribe`)."""
        return unsubscribe(self._client(model), sid, retry_until)

    def _await_unsubscribed(self) -> None:
        """Early in the stop: wake the keeper, which ends its turn, unsubscribes every stream over its own
        connections (nothing to resolve, no handshake) and ends; wait for it while the stop's budget lasts,
        less a reserve for the rest of the stop. A keeper still in a call then is left: the server drops
        this host (``unreachable``) when the stop closes its connections."""
        self._kick.set()
        if self._keeper is None:
            return
        self._keeper.join(max(0.0, self.stop_time_left() - self._stop_reserve()))
        if self._keeper.is_alive():
            log_event(log, "unsubscribe_unfinished", "stopping before the model server answered; it drops this "
                      "host when its connection closes", level=logging.WARNING, streams=len(self._subs))

    def _stop_reserve(self) -> float:
        """What the stop keeps for after the unsubscribing (the dispatcher, the daemon, the threads)."""
        return min(1.0, self.settings.stop_timeout / 4)

    def _unsubscribe_all(self) -> None:
        """The keeper's last act: end every subscription. A timed-out call is tried again only while a
        whole call still fits in the stop's budget, so the stop ends in time whatever the server does."""
        now, call = time.monotonic(), self.settings.call_timeout
        retry_until = now + min(2 * call, self.stop_time_left() - self._stop_reserve() - call)
        for stream, sid in list(self._subs.items()):
            error = self._unsubscribe(stream.model, sid, retry_until)
            if error is None:
                log_event(log, "unsubscribed", "unsubscribed", viewer_id=stream.viewer_id, model=stream.model,
                          members=len(stream), revision=stream.revision)
            else:
                log_event(log, "unsubscribe_failed", "could not unsubscribe", level=logging.WARNING,
                          viewer_id=stream.viewer_id, model=stream.model, error=str(error))
        self._subs.clear()
        self._told.clear()
        self._close_clients()


class Unsubscriber(Protocol):
    """What :func:`unsubscribe` needs of a model client (a :class:`ModelClient`)."""

    def unsubscribe(self, subscription_id: str) -> Any:
        """End the subscription on the server."""

    def close(self) -> None:
        """Drop the connection: the next call makes a fresh one."""


def unsubscribe(client: Unsubscriber, subscription_id: str, retry_until: float) -> Exception | None:
    """Unsubscribe; None, or why not. A timeout means the server is there but slow (a loaded
    host): try again on a fresh connection (unsubscribing twice is harmless) until
    ``retry_until`` (a ``time.monotonic()`` value); a server that is gone, or a refusal, is not
    waited for. A viewer host's stop uses it, and the keeper for a stream left without viewers."""
    backoff = Backoff(0.01, 0.2)
    while True:
        try:
            client.unsubscribe(subscription_id)
            return None
        except PyroTimeout as exc:
            client.close()
            if time.monotonic() >= retry_until:
                return exc
            time.sleep(min(backoff.next(), max(0.0, retry_until - time.monotonic())))
        except (MVCError, CommunicationError, PyroError, OSError) as exc:
            return exc


def _checked_reply(reply: Any) -> dict[str, Any]:
    """A subscribe reply, checked: what a server that is not ours (or too old) answers is refused."""
    if not (isinstance(reply, dict) and isinstance(reply.get("subscription"), str)
            and isinstance(reply.get("capability"), str) and isinstance(reply.get("lease"), (int, float))
            and not isinstance(reply.get("lease"), bool) and reply["lease"] > 0):
        raise SubscriptionError("the model server's subscribe reply lacks a subscription, capability or lease "
                                "(a server from before subscription capabilities?)")
    return {**reply, "lease": max(0.05, float(reply["lease"]))}
