"""What to send one viewer next: its backlog, then the live stream from its place, or a snapshot.

Pure: no socket, no clock. A cursor reads the shared :class:`~.stream.Stream`
after the last revision it has handed out (and first, a backlog from history,
given when the viewer subscribed under the publisher's lock); once the viewer
is more than ``queue_limit`` events behind, or when a snapshot is due (a new
viewer), the next batch is one fresh snapshot instead.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from .stream import Stream

__all__ = ["Cursor"]


class Cursor:
    """One viewer's place in the stream; :meth:`next_batch` is the next call's payload."""

    def __init__(self, stream: Stream, snapshot: Callable[[], dict]) -> None:
        self._stream = stream
        self._snapshot = snapshot
        self._queue: collections.deque[dict] = collections.deque()  # its backlog (history) events
        self._position = stream.last_revision  # the last revision handed out (or to be, by its backlog)
        self._snapshot_due = ""  # why a snapshot is due ("subscribe", "behind"), or "" when none is
        self._stopped = False
        self._lock = threading.Lock()

    def offer_backlog(self, events: list[dict]) -> None:
        """Events from history that go before the live stream (with the publisher's lock held)."""
        with self._lock:
            if len(events) > self._stream.queue_limit:
                self._snapshot_due = "behind"
                return
            self._queue.extend(events)
            if events:
                self._position = max(self._position, events[-1]["revision"])

    def offer_snapshot(self, reason: str = "subscribe") -> None:
        """Send a snapshot next (``reason`` tells the viewer why), dropping any backlog."""
        with self._lock:
            self._queue.clear()
            self._snapshot_due = reason

    @property
    def queued(self) -> int:
        """Events waiting for this viewer: its backlog, and how far it is behind the live stream."""
        return len(self._queue) + max(0, self._stream.last_revision - self._position)

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called: nothing more is handed out."""
        return self._stopped

    def has_work(self) -> bool:
        """A cheap look: something may be due (``next_batch`` says for sure)."""
        return bool(self._queue or self._snapshot_due or self._position < self._stream.last_revision) \
            and not self._stopped

    def stop(self) -> None:
        """Hand nothing out from now on."""
        with self._lock:
            self._stopped = True

    def next_batch(self) -> dict | None:
        """The next call's payload: ``{"events": [...]}`` of up to ``batch_max`` events (its backlog
        first, then the live stream), or ``{"snapshot": ..., "reason": ...}``; None when nothing is due."""
        stream = self._stream
        batch_max = stream.batch_max
        with self._lock:
            if self._stopped:
                return None
            if not self._snapshot_due:
                queue = self._queue
                if queue:
                    n = min(len(queue), batch_max)
                    events = [queue.popleft() for _ in range(n)]
                    if not queue and n < batch_max:  # the live stream follows on in the same call
                        live = stream.events_after(self._position) or []
                        events += live[:batch_max - n]
                        if live:
                            self._position = events[-1]["revision"]
                    return {"events": events}
                if stream.last_revision - self._position <= stream.queue_limit:
                    fresh = stream.events_after(self._position)
                    if fresh is not None:
                        if not fresh:
                            return None
                        self._position = fresh[-1]["revision"]
                        return {"events": fresh}
                self._snapshot_due = "behind"
            reason, self._snapshot_due = self._snapshot_due, ""
        snap = self._snapshot()  # takes the publisher's lock: consistent with the event stream
        with self._lock:
            self._queue.clear()  # a backlog is older than any snapshot
            self._position = max(self._position, snap["revision"])
        return {"snapshot": snap, "reason": reason}
