"""Who is subscribed: subscriptions by id and by viewer, their leases, and per-owner counts."""

from __future__ import annotations

import collections
import secrets
import threading
from collections.abc import Callable
from typing import Any

from .cursor import Cursor
from .window import Window

__all__ = ["Subscription", "Registry"]


class Subscription:
    """One viewer's subscription: who made it, its lease, its secret, its cursor and window.

    Every call's batch carries the subscription's secret ``capability`` (made here,
    given to the subscriber alone in the subscribe reply): a viewer applies only
    batches that carry it, so nobody else who can reach its daemon can feed it events.
    """

    def __init__(self, viewer_id: str, uri: str, lease_expiry: float, cursor: Cursor, window: Window,
                 identity: str = "local", host: str | None = None) -> None:
        self.viewer_id = viewer_id
        self.uri = uri
        self.destination = uri.rpartition("@")[2]  # the viewer's daemon address (host:port)
        self.id = f"{viewer_id}/{secrets.token_hex(6)}"
        # who made it: the proven identity, and the address it called from (anonymous callers are
        # told apart by that alone); only they (or an admin) may renew, replace or end it
        self.identity = identity
        self.host = host
        self.capability = secrets.token_urlsafe(24)
        self.lease_expiry = lease_expiry
        self.cursor = cursor
        self.window = window

    @property
    def oneway(self) -> bool:
        """The viewer takes oneway notify calls, in order."""
        return self.window.oneway

    @property
    def delivered_revision(self) -> int:
        """The last revision the viewer acknowledged."""
        return self.window.delivered_revision

    @property
    def queued(self) -> int:
        """Events waiting for this viewer."""
        return self.cursor.queued

    @property
    def stopped(self) -> bool:
        """Whether it was removed (nothing more goes out)."""
        return self.cursor.stopped

    def owners(self) -> tuple[str, ...]:
        """The counts it is in: its identity's, and an anonymous caller's address's (``@address``)."""
        if self.identity == "anonymous" and self.host is not None:
            return self.identity, f"@{self.host}"
        return (self.identity,)


class Registry:
    """Subscriptions of one model; ``on_count`` is told the number after every change."""

    def __init__(self, on_count: Callable[[int], None] = lambda _n: None) -> None:
        self._subs: dict[str, Subscription] = {}
        self._by_viewer: dict[str, Subscription] = {}
        self._owned: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._on_count = on_count
        on_count(0)

    def __len__(self) -> int:
        return len(self._subs)

    def add(self, sub: Subscription) -> Subscription | None:
        """Register ``sub``; return the subscription of the same viewer id it replaces, if any."""
        with self._lock:
            old = self._by_viewer.get(sub.viewer_id)
            if old is not None:
                self._subs.pop(old.id, None)
                self._disown(old)
            self._subs[sub.id] = sub
            self._by_viewer[sub.viewer_id] = sub
            for key in sub.owners():
                self._owned[key] += 1
            self._on_count(len(self._subs))
        return old

    def _disown(self, sub: Subscription) -> None:
        for key in sub.owners():
            self._owned[key] -= 1
            if self._owned[key] <= 0:
                del self._owned[key]

    def remove(self, subscription_id: str,
               before: Callable[[Subscription], None] | None = None) -> tuple[Subscription, int] | None:
        """Unregister a subscription: it and the number left, or None when unknown. ``before`` runs
        first, only when it is there (a drop is counted before the viewer leaves the count)."""
        with self._lock:
            sub = self._subs.get(subscription_id)
            if sub is None:
                return None
            if before is not None:
                before(sub)
            del self._subs[subscription_id]
            if self._by_viewer.get(sub.viewer_id) is sub:
                del self._by_viewer[sub.viewer_id]
            self._disown(sub)
            count = len(self._subs)
            self._on_count(count)
        return sub, count

    def clear(self) -> list[Subscription]:
        """Unregister every subscription; return them."""
        with self._lock:
            subs = list(self._subs.values())
            self._subs.clear()
            self._by_viewer.clear()
            self._owned.clear()
            self._on_count(0)
        return subs

    def owned(self, identity: str, host: str | None = None) -> tuple[int, int]:
        """How many subscriptions ``identity`` holds, and how many anonymous ones were made from ``host``."""
        with self._lock:
            return self._owned.get(identity, 0), self._owned.get(f"@{host}", 0) if host is not None else 0

    def get(self, subscription_id: str) -> Subscription | None:
        """A subscription by id."""
        return self._subs.get(subscription_id)

    def of_viewer(self, viewer_id: str) -> Subscription | None:
        """The current subscription of a viewer id, if any."""
        return self._by_viewer.get(viewer_id)

    def renew(self, subscription_ids: list[str], expiry: float) -> list[str]:
        """Extend leases to ``expiry``; return the ids not known (to re-subscribe)."""
        unknown = []
        with self._lock:
            for sid in subscription_ids:
                sub = self._subs.get(sid)
                if sub is None:
                    unknown.append(sid)
                else:
                    sub.lease_expiry = expiry
        return unknown

    def expired(self, now: float) -> list[Subscription]:
        """The subscriptions whose lease ran out by ``now``."""
        return [s for s in list(self._subs.values()) if s.lease_expiry < now]

    def describe(self, now: float, full: Callable[[Subscription], bool]) -> list[dict[str, Any]]:
        """One entry per subscription; its id and callback URI only where ``full(sub)`` says so."""
        out = []
        for s in list(self._subs.values()):
            entry = {"viewer_id": s.viewer_id, "queued": s.queued, "delivered_revision": s.delivered_revision,
                     "lease_left": round(s.lease_expiry - now, 3)}
            if full(s):
                entry.update(subscription=s.id, uri=s.uri, identity=s.identity)
            out.append(entry)
        return out
