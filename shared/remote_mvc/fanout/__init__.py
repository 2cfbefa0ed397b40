"""Fan-out of change events to subscribed viewers.

Data flows one way, each part with one owner:

* :mod:`.stream` – the shared log of recent events (one, whatever the number of
  viewers) and their encodings (each event's JSON once, a batch's text once);
* :mod:`.registry` – the subscriptions: by id and viewer, their leases, their
  owners' counts (the caps :mod:`remote_mvc.subscriptions` enforces);
* :mod:`.cursor` – pure: what one viewer gets next (its backlog, the live
  stream from its place, or a snapshot once it is more than ``queue_limit``
  events behind);
* :mod:`.window` – pure: which calls are in flight, which asks for an answer,
  what an answer acknowledges, when a stall is declared;
* :mod:`.loop` – the one event-loop thread per model, the only code touching
  sockets: it connects (bounded per destination and owner), fills each window
  from its cursor, writes the calls (packed by :mod:`remote_mvc.pyro.notify`),
  reads the answers, and drops the stalled and the broken.

:class:`Fanout` wires them: ``ModelServer`` publishes, adds, renews, removes
and expires through it. A slow or dead viewer only ever holds up its own
window, and a thousand viewers cost one thread, not a thousand. See
docs/performance.md for the design's measurements.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..logs import log_event
from ..metrics import Metrics
from .cursor import Cursor
from .loop import CONNECTS_PER_DESTINATION, CONNECTS_PER_OWNER, STUCK_AFTER, Connector, Loop
from .registry import Registry, Subscription
from .stream import Stream
from .window import ACK_INTERVAL, MAX_IN_FLIGHT, ONEWAY_WINDOW, Window

__all__ = ["ACK_INTERVAL", "MAX_IN_FLIGHT", "ONEWAY_WINDOW", "CONNECTS_PER_DESTINATION", "CONNECTS_PER_OWNER",
           "STUCK_AFTER", "Fanout", "Subscription"]

log = logging.getLogger("remote_mvc.fanout")


class Fanout:
    """The subscribers of one model: subscribe, publish, renew, expire; delivered by one loop.

    ``connect`` makes a viewer's connection (default: a Pyro5 proxy's connect
    and handshake); the testing kit passes its own to drive the real loop over
    socket pairs.
    """

    def __init__(self, model: str, snapshot: Callable[[], dict], metrics: Metrics, *,
                 lease_seconds: float = 10.0, call_timeout: float = 3.0, queue_limit: int = 1000,
                 batch_max: int = 500, clock: Callable[[], float] = time.monotonic, revision: int = 0,
                 connect: Connector | None = None) -> None:
        self.model = model
        self.snapshot = snapshot
        self.metrics = metrics
        self.lease_seconds = lease_seconds
        self.call_timeout = call_timeout
        self.queue_limit = queue_limit
        self.batch_max = batch_max
        self.clock = clock
        self.stream = Stream(model, queue_limit=queue_limit, batch_max=batch_max, revision=revision)
        self.registry = Registry(metrics.viewers_connected.labels(model).set)
        extra = {"connect": connect} if connect is not None else {}
        self._loop = Loop(self.stream, metrics, call_timeout=call_timeout, on_drop=self.drop, clock=clock, **extra)

    def __len__(self) -> int:
        return len(self.registry)

    @property
    def last_revision(self) -> int:
        """The revision of the last event published."""
        return self.stream.last_revision

    def add(self, viewer_id: str, uri: str, backlog: list[dict] | None, oneway: bool = False,
            identity: str = "local", host: str | None = None) -> Subscription:
        """Subscribe a viewer; ``backlog`` events go first, ``None`` means a snapshot first.

        Call with the publisher's lock held so that no event falls between the
        backlog and the live stream. A viewer id subscribing again replaces its
        old subscription (a reconnect), so the count stays right; whether the
        caller may replace it is the model server's to decide (see
        :mod:`remote_mvc.subscriptions`). ``identity`` and ``host`` say who subscribes.
        """
        cursor = Cursor(self.stream, self.snapshot)
        if backlog is None:
            cursor.offer_snapshot()
        else:
            cursor.offer_backlog(backlog)
        window = Window(oneway=oneway, event_limit=self.queue_limit)
        sub = Subscription(viewer_id, uri, self.clock() + self.lease_seconds, cursor, window, identity, host)
        old = self.registry.add(sub)
        if old is not None:
            old.cursor.stop()
            self._loop.forget(old)
        self._loop.add(sub)
        log_event(log, "viewer_subscribed", "viewer subscribed", viewer_id=viewer_id, uri=uri,
                  subscription=sub.id, viewers=len(self.registry), model=self.model,
                  replaced=old is not None)
        return sub

    def owned(self, identity: str, host: str | None = None) -> tuple[int, int]:
        """How many subscriptions ``identity`` holds, and how many anonymous ones were made from ``host``."""
        return self.registry.owned(identity, host)

    def get(self, subscription_id: str) -> Subscription | None:
        """A subscription by id."""
        return self.registry.get(subscription_id)

    def of_viewer(self, viewer_id: str) -> Subscription | None:
        """The current subscription of a viewer id, if any."""
        return self.registry.of_viewer(viewer_id)

    @property
    def connected(self) -> int:
        """Subscriptions whose viewer is connected (the loop holds its connection)."""
        return self._loop.connected

    def healthy(self) -> bool:
        """The loop is running and turning (see :meth:`.loop.Loop.healthy`)."""
        return self._loop.healthy()

    def publish(self, event: dict) -> None:
        """Append an event to the live stream (caller holds the publisher's lock): O(1), whatever
        the number of viewers; each cursor reads on from its own place."""
        self.stream.publish(event)
        self._loop.wake(published=True)

    def renew(self, subscription_ids: list[str]) -> list[str]:
        """Extend leases; return the ids this server does not know (to re-subscribe)."""
        return self.registry.renew(subscription_ids, self.clock() + self.lease_seconds)

    def remove(self, subscription_id: str, event: str = "viewer_unsubscribed", reason: str = "",
               before: Callable[[Subscription], None] | None = None) -> bool:
        """End a subscription (its connection is closed); False when unknown. ``before`` runs as it
        is unregistered (see :meth:`Registry.remove`)."""
        removed = self.registry.remove(subscription_id, before)
        if removed is None:
            return False
        sub, count = removed
        sub.cursor.stop()
        self._loop.forget(sub)
        fields: dict[str, Any] = {"reason": reason} if reason else {}
        log_event(log, event, event.replace("_", " "), viewer_id=sub.viewer_id, subscription=sub.id,
                  viewers=count, model=self.model, **fields)
        return True

    def drop(self, sub: Subscription, reason: str, detail: str = "") -> None:
        """End a subscription for ``reason`` (counted in ``remote_mvc_viewers_dropped_total`` before the
        viewer leaves ``remote_mvc_viewers_connected``: whoever sees it gone sees the drop counted)."""
        def count(_sub: Subscription) -> None:
            self.metrics.viewers_dropped.labels(self.model, reason).inc()

        if self.remove(sub.id, "viewer_dropped", reason, before=count):
            if detail:
                log.debug("drop detail for %s: %s", sub.viewer_id, detail)

    def drop_viewer(self, viewer_id: str, reason: str = "admin") -> bool:
        """Drop the subscription of ``viewer_id``; False when it has none."""
        sub = self.registry.of_viewer(viewer_id)
        if sub is None:
            return False
        self.drop(sub, reason)
        return True

    def expire(self) -> int:
        """Drop every viewer whose lease ran out; return how many."""
        expired = self.registry.expired(self.clock())
        for sub in expired:
            self.drop(sub, "lease_expired")
        return len(expired)

    def describe(self, full: Callable[[Subscription], bool] = lambda _sub: True) -> list[dict[str, Any]]:
        """One entry per subscription; its id and callback URI only where ``full(sub)`` says so."""
        return self.registry.describe(self.clock(), full)

    def close(self, timeout: float = 2.0) -> None:
        """End every subscription and the loop."""
        for sub in self.registry.clear():
            sub.cursor.stop()
            self._loop.forget(sub)
        self._loop.close(timeout)
