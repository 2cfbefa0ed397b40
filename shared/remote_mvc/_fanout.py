"""Fan-out of change events to subscribed viewers.

Each subscriber has its own bounded queue and its own sender thread, which
alone owns the Pyro5 proxy to the viewer (proxies are not shared between
threads). A slow or dead viewer only ever blocks its own sender:

* events queue up and go out in revision order, several per call when the
  viewer is behind (up to ``batch_max``);
* past ``queue_limit`` queued events the queue is replaced by one fresh
  snapshot, and the viewer is told so;
* every call has a timeout; a failed or timed-out call drops the viewer;
* a lease the viewer must renew; an expired lease drops the viewer.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from Pyro5.api import Proxy
from Pyro5.errors import CommunicationError, ConnectionClosedError, PyroError
from Pyro5.errors import TimeoutError as PyroTimeout

from .logs import log_event
from .metrics import Metrics

log = logging.getLogger("remote_mvc.fanout")


class Subscriber:
    """One viewer's subscription: queue, sender thread and lease."""

    def __init__(self, fanout: Fanout, viewer_id: str, uri: str, lease_expiry: float) -> None:
        self.fanout = fanout
        self.viewer_id = viewer_id
        self.uri = uri
        self.id = f"{viewer_id}/{secrets.token_hex(6)}"
        self.lease_expiry = lease_expiry
        self.delivered_revision = 0
        self._queue: collections.deque[dict] = collections.deque()
        self._snapshot_due = ""  # why a snapshot is due ("subscribe", "behind"), or "" when none is
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"sender-{viewer_id}", daemon=True)

    # called with the publisher's lock held, so offers arrive in revision order
    def offer(self, event: dict) -> None:
        with self._cond:
            if self._stopped:
                return
            if self._snapshot_due:
                pass  # the snapshot to come will include this change
            elif len(self._queue) >= self.fanout.queue_limit:
                self._queue.clear()
                self._snapshot_due = "behind"
            else:
                self._queue.append(event)
            self._cond.notify()

    def offer_snapshot(self, reason: str = "subscribe") -> None:
        with self._cond:
            self._queue.clear()
            self._snapshot_due = reason
            self._cond.notify()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _next_batch(self) -> dict | None:
        with self._cond:
            while not (self._stopped or self._queue or self._snapshot_due):
                self._cond.wait()
            if self._stopped:
                return None
            if not self._snapshot_due:
                n = min(len(self._queue), self.fanout.batch_max)
                return {"events": [self._queue.popleft() for _ in range(n)]}
            reason, self._snapshot_due = self._snapshot_due, ""
        snap = self.fanout.snapshot()  # takes the publisher's lock: consistent with the event stream
        with self._cond:
            while self._queue and self._queue[0]["revision"] <= snap["revision"]:
                self._queue.popleft()
        return {"snapshot": snap, "reason": reason}

    def _run(self) -> None:
        fanout = self.fanout
        proxy = Proxy(self.uri)
        proxy._pyroTimeout = fanout.call_timeout
        proxy._pyroMaxRetries = 0
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                batch["model"] = fanout.model
                try:
                    try:
                        proxy.notify(batch)
                    except ConnectionClosedError:
                        # the viewer closed an idle connection: delivery is idempotent, so
                        # reconnect once and send the batch again (duplicates are skipped)
                        proxy._pyroRelease()
                        proxy.notify(batch)
                except (CommunicationError, PyroError, OSError) as exc:
                    fanout.metrics.notifications_failed.labels(fanout.model).inc()
                    reason = "timeout" if isinstance(exc, PyroTimeout) else "unreachable"
                    fanout.drop(self, reason, detail=f"{type(exc).__name__}: {exc}")
                    return
                except Exception as exc:  # the viewer's handler raised: it is alive, keep it
                    fanout.metrics.notifications_failed.labels(fanout.model).inc()
                    log_event(log, "notify_error", "viewer handler raised", level=logging.WARNING,
                              viewer_id=self.viewer_id, error=f"{type(exc).__name__}: {exc}")
                    continue
                m = fanout.metrics
                m.notifications_sent.labels(fanout.model).inc()
                if "snapshot" in batch:
                    m.snapshots_sent.labels(fanout.model).inc()
                    self.delivered_revision = batch["snapshot"]["revision"]
                else:
                    m.events_delivered.labels(fanout.model).inc(len(batch["events"]))
                    self.delivered_revision = batch["events"][-1]["revision"]
        finally:
            proxy._pyroRelease()


class Fanout:
    """The subscriber registry of one model: subscribe, publish, renew, expire."""

    def __init__(self, model: str, snapshot: Callable[[], dict], metrics: Metrics, *,
                 lease_seconds: float = 10.0, call_timeout: float = 3.0, queue_limit: int = 1000,
                 batch_max: int = 500, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.snapshot = snapshot
        self.metrics = metrics
        self.lease_seconds = lease_seconds
        self.call_timeout = call_timeout
        self.queue_limit = queue_limit
        self.batch_max = batch_max
        self.clock = clock
        self._subs: dict[str, Subscriber] = {}
        self._by_viewer: dict[str, Subscriber] = {}
        self._lock = threading.Lock()
        self._gauge = metrics.viewers_connected.labels(model)
        self._gauge.set(0)

    def __len__(self) -> int:
        return len(self._subs)

    def add(self, viewer_id: str, uri: str, backlog: list[dict] | None, start: bool = True) -> Subscriber:
        """Subscribe a viewer; ``backlog`` events go first, ``None`` means a snapshot first.

        Call with the publisher's lock held so that no event falls between the
        backlog and the live stream. A viewer id subscribing again replaces its
        old subscription (a reconnect), so the count stays right.
        """
        sub = Subscriber(self, viewer_id, uri, self.clock() + self.lease_seconds)
        if backlog is None:
            sub.offer_snapshot()
        else:
            for event in backlog:
                sub.offer(event)
        with self._lock:
            old = self._by_viewer.get(viewer_id)
            if old is not None:
                self._subs.pop(old.id, None)
            self._subs[sub.id] = sub
            self._by_viewer[viewer_id] = sub
            self._gauge.set(len(self._subs))
        if old is not None:
            old.stop()
        if start:
            sub.start()
        log_event(log, "viewer_subscribed", "viewer subscribed", viewer_id=viewer_id, uri=uri,
                  subscription=sub.id, viewers=len(self._subs), model=self.model,
                  replaced=old is not None)
        return sub

    def publish(self, event: dict) -> None:
        """Queue an event for every subscriber (caller holds the publisher's lock)."""
        for sub in list(self._subs.values()):
            sub.offer(event)

    def renew(self, subscription_ids: list[str]) -> list[str]:
        """Extend leases; return the ids this server does not know (to re-subscribe)."""
        expiry = self.clock() + self.lease_seconds
        unknown = []
        with self._lock:
            for sid in subscription_ids:
                sub = self._subs.get(sid)
                if sub is None:
                    unknown.append(sid)
                else:
                    sub.lease_expiry = expiry
        return unknown

    def remove(self, subscription_id: str, event: str = "viewer_unsubscribed", reason: str = "") -> bool:
        with self._lock:
            sub = self._subs.pop(subscription_id, None)
            if sub is None:
                return False
            if self._by_viewer.get(sub.viewer_id) is sub:
                del self._by_viewer[sub.viewer_id]
            count = len(self._subs)
            self._gauge.set(count)
        sub.stop()
        fields = {"reason": reason} if reason else {}
        log_event(log, event, event.replace("_", " "), viewer_id=sub.viewer_id, subscription=sub.id,
                  viewers=count, model=self.model, **fields)
        return True

    def drop(self, sub: Subscriber, reason: str, detail: str = "") -> None:
        if self.remove(sub.id, "viewer_dropped", reason):
            self.metrics.viewers_dropped.labels(self.model, reason).inc()
            if detail:
                log.debug("drop detail for %s: %s", sub.viewer_id, detail)

    def drop_viewer(self, viewer_id: str, reason: str = "admin") -> bool:
        sub = self._by_viewer.get(viewer_id)
        if sub is None:
            return False
        self.drop(sub, reason)
        return True

    def expire(self) -> int:
        """Drop every viewer whose lease ran out; return how many."""
        now = self.clock()
        expired = [s for s in list(self._subs.values()) if s.lease_expiry < now]
        for sub in expired:
            self.drop(sub, "lease_expired")
        return len(expired)

    def describe(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [{"viewer_id": s.viewer_id, "subscription": s.id, "uri": s.uri, "queued": s.queued,
                 "delivered_revision": s.delivered_revision, "lease_left": round(s.lease_expiry - now, 3)}
                for s in list(self._subs.values())]

    def close(self, timeout: float = 2.0) -> None:
        with self._lock:
            subs = list(self._subs.values())
            self._subs.clear()
            self._by_viewer.clear()
            self._gauge.set(0)
        for sub in subs:
            sub.stop()
        deadline = time.monotonic() + timeout
        for sub in subs:
            sub.join(max(0.0, deadline - time.monotonic()))

