"""Viewers: callback objects that mirror a model, and the host that keeps them subscribed.

A :class:`Viewer` receives batches from the model server's sender for it and
applies each change exactly once, in revision order: duplicates are skipped, a
gap is filled from ``history`` (or a snapshot when the history no longer
reaches back). A :class:`ViewerHost` is one Pyro5 daemon holding one or many
viewers (a viewer process holds one; a benchmark holds hundreds). Its keeper
thread subscribes them, renews all their leases in one call per model,
re-subscribes from the last revision after a model server restart or a drop,
and unsubscribes them when the host stops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import Pyro5.api
from Pyro5 import config as pyro_config
from Pyro5.errors import CommunicationError, PyroError
from Pyro5.errors import TimeoutError as PyroTimeout

from ._backoff import Backoff
from ._daemons import ViewerDaemon
from .config import Settings
from .controller import ModelClient
from .errors import HistoryCompacted, MVCError
from .logs import log_event
from .metrics import Metrics
from .service import Service

__all__ = ["Viewer", "ViewerHost"]

log = logging.getLogger("remote_mvc.viewer")

ChangeHandler = Callable[["Viewer", dict[str, Any] | None], None]


@Pyro5.api.expose
class Viewer:
    """Mirror of one model, kept current by the server's notifications."""

    _mvc_notify = True  # ViewerDaemon may hand notify calls over directly

    def __init__(self, viewer_id: str, model: str, *, on_change: ChangeHandler | None = None,
                 metrics: Metrics | None = None, log_values: bool = True, record: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.viewer_id = viewer_id
        self.model = model
        self.on_change = on_change
        self.log_values = log_values
        self.clock = clock
        self.values: dict[str, Any] = {}
        self.revision = 0
        self.synced = False  # True once a snapshot or the first events were applied
        self.received: list[int] | None = [] if record else None  # revisions applied, in order
        self.snapshots = 0
        self.fetch: Callable[[int], list[dict[str, Any]]] | None = None  # history(since) for gaps
        self.fetch_snapshot: Callable[[], dict[str, Any]] | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting = 0  # threads in wait_for
        metrics = metrics or Metrics()
        self._latency = metrics.notification_latency.labels(model)
        self._revision_gauge = metrics.viewer_revision.labels(model)
        self._resyncs = metrics.resyncs

    def notify(self, batch: dict[str, Any]) -> None:
        """Called by the model server: ``{"events": [...]}`` or ``{"snapshot": {...}}``."""
        arrived = self.clock()
        with self._lock:
            if "snapshot" in batch:
                self._apply_snapshot(batch["snapshot"], batch.get("reason", "subscribe"))
            for event in batch.get("events", ()):
                self._latency.observe(max(0.0, arrived - event["time"]))
                self._apply_event(event)
            self._revision_gauge.set(self.revision)
            if self._waiting:  # notify_all costs a few µs even with nobody waiting
                self._changed.notify_all()

    def _apply_event(self, event: dict[str, Any]) -> None:
        revision = event["revision"]
        if self.synced and revision <= self.revision:
            return  # already applied (a re-subscription can resend it)
        if self.synced and revision > self.revision + 1:
            self._catch_up(revision - 1)
            if revision <= self.revision:
                return
        self._set(event["values"], revision, event)

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
            self._apply_snapshot(self.fetch_snapshot(), "gap")

    def _apply_snapshot(self, snap: dict[str, Any], reason: str) -> None:
        self.snapshots += 1
        self._resyncs.labels(self.model, "snapshot").inc()
        self._set(snap["values"], snap["revision"], None, reason=reason)

    def _set(self, values: dict[str, Any], revision: int, event: dict[str, Any] | None, reason: str = "") -> None:
        self.values = dict(values)
        self.revision = revision
        self.synced = True
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


class ViewerHost(Service):
    """A Pyro5 daemon hosting viewers, keeping each of them subscribed."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        super().__init__(settings, metrics)
        self.viewers: list[Viewer] = []
        self._subs: dict[Viewer, str] = {}  # viewer -> subscription id
        self._clients: dict[str, ModelClient] = {}
        self._kick = threading.Event()
        self._sub_lock = threading.Lock()  # subscribing vs. unsubscribing at stop
        self.on_stop(self._unsubscribe_all, early=True)

    def make_daemon(self) -> Pyro5.api.Daemon:
        s = self.settings
        servertype, pyro_config.SERVERTYPE = pyro_config.SERVERTYPE, s.viewer_server  # read by the constructor
        try:
            daemon = ViewerDaemon(host=s.host, port=s.port, nathost=s.advertised_host(), natport=0)
        finally:
            pyro_config.SERVERTYPE = servertype
        daemon.handshake_timeout = s.handshake_timeout  # the server's sender may idle for long: no idle timeout
        return daemon

    def add(self, viewer: Viewer) -> Viewer:
        """Host a viewer; it is subscribed by the keeper thread (at once when running)."""
        client = self._client(viewer.model)
        viewer.fetch = lambda since: client.history(since)
        viewer.fetch_snapshot = client.snapshot
        self.viewers.append(viewer)
        if self.daemon is not None:
            self.daemon.register(viewer, objectId=f"viewer.{viewer.viewer_id}")
            self._kick.set()
        else:
            self.serve(viewer, object_id=f"viewer.{viewer.viewer_id}")
        return viewer

    def _client(self, model: str) -> ModelClient:
        if model not in self._clients:
            self._clients[model] = ModelClient(model, self.settings, retry_seconds=0)
        return self._clients[model]

    def start(self) -> ViewerHost:
        super().start()
        self._spawn(self._keep_subscribed, "viewer-keeper")
        return self

    def healthy(self) -> bool:
        return super().healthy() and all(v in self._subs for v in self.viewers)

    def subscribed(self) -> int:
        return len(self._subs)

    def wait_subscribed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self._subs) < len(self.viewers):
            if time.monotonic() > deadline:
                return False
            self._stopping.wait(0.02)
        return True

    def _keep_subscribed(self) -> None:
        """Subscribe, renew leases in one call per model, re-subscribe what was lost."""
        failing = False
        backoff = Backoff(0.05, min(self.settings.retry_backoff_max, self.settings.lease_seconds))
        while not self._closing.is_set():
            lease = self.settings.lease_seconds
            try:
                with self._sub_lock:
                    if self._closing.is_set():
                        break
                    self._renew_all()
                    self._subscribe_missing()
                failing = False
                backoff.reset()
            except (MVCError, CommunicationError, PyroError, OSError) as exc:
                if not failing:
                    log_event(log, "model_unreachable", "model server unreachable; will re-subscribe",
                              level=logging.WARNING, error=str(exc))
                failing = True
                for client in self._clients.values():
                    client.close()
            if failing:  # jittered: hundreds of viewers must not come back in lock step after a restart
                wait = backoff.next()
            else:
                wait = min(0.5, lease / 10) if len(self._subs) < len(self.viewers) else lease / 3
            self._kick.wait(wait)
            self._kick.clear()

    def _renew_all(self) -> None:
        by_model: dict[str, list[Viewer]] = {}
        for viewer, _sid in list(self._subs.items()):
            by_model.setdefault(viewer.model, []).append(viewer)
        for model, viewers in by_model.items():
            unknown = set(self._client(model).renew([self._subs[v] for v in viewers]))
            for viewer in viewers:
                if self._subs[viewer] in unknown:
                    del self._subs[viewer]
                    log_event(log, "lease_lost", "subscription lost; re-subscribing", viewer_id=viewer.viewer_id,
                              revision=viewer.revision)

    def _readvertise(self) -> None:
        """Follow a change of our own address (a container reconnected to its network
        with a new IP): later subscriptions must carry a callback URI that reaches us."""
        port = self.daemon.locationStr.rsplit(":", 1)[1]
        location = f"{self.settings.advertised_host()}:{port}"
        if self.daemon.natLocationStr != location:
            log_event(log, "address_changed", f"now reachable at {location}", old=self.daemon.natLocationStr,
                      new=location)
            self.daemon.natLocationStr = location

    def _subscribe_missing(self) -> None:
        if any(viewer not in self._subs for viewer in self.viewers):
            self._readvertise()
        for viewer in self.viewers:
            if viewer in self._subs:
                continue
            uri = self.daemon.uriFor(viewer)
            since = viewer.revision if viewer.synced else None
            client = self._client(viewer.model)
            try:  # our daemon runs oneway notify calls in order
                reply = client.subscribe(str(uri), viewer.viewer_id, since, True)
            except TypeError:  # a model server from before ordered oneway calls
                reply = client.subscribe(str(uri), viewer.viewer_id, since)
            self._subs[viewer] = reply["subscription"]
            log_event(log, "subscribed", f"subscribed to {viewer.model}", viewer_id=viewer.viewer_id,
                      revision=viewer.revision, server_revision=reply["revision"], since=since)

    def _unsubscribe(self, model: str, sid: str, retry_until: float) -> Exception | None:
        """Unsubscribe; None, or why not. A timeout means the server is there but slow (a loaded
        host): try again on a fresh connection (unsubscribing twice is harmless) until
        ``retry_until``; a server that is gone is not waited for."""
        client = self._client(model)
        backoff = Backoff(0.01, 0.2)
        while True:
            try:
                client.unsubscribe(sid)
                return None
            except PyroTimeout as exc:
                client.close()
                if time.monotonic() >= retry_until:
                    return exc
                time.sleep(min(backoff.next(), max(0.0, retry_until - time.monotonic())))
            except (MVCError, CommunicationError, PyroError, OSError) as exc:
                return exc

    def _unsubscribe_all(self) -> None:
        self._kick.set()
        with self._sub_lock:
            self._unsubscribe_locked()

    def _unsubscribe_locked(self) -> None:
        # a retry after a timeout only early in the stop: one extra call timeout in all, never a hang
        retry_until = time.monotonic() + 2 * self.settings.call_timeout
        for viewer, sid in list(self._subs.items()):
            error = self._unsubscribe(viewer.model, sid, retry_until)
            if error is None:
                log_event(log, "unsubscribed", "unsubscribed", viewer_id=viewer.viewer_id, revision=viewer.revision)
            else:
                log_event(log, "unsubscribe_failed", "could not unsubscribe", level=logging.WARNING,
                          viewer_id=viewer.viewer_id, error=str(error))
        self._subs.clear()
        for client in self._clients.values():
            client.close()
