"""One viewer's window of calls in flight: when to send, when to ask, what an answer acknowledges.

Pure: no socket; time comes in as ``now``. A viewer gets up to ``MAX_IN_FLIGHT``
calls pipelined, each answered (one being handled, one ready behind it: more
only fragments batches). A viewer that takes oneway ``notify`` calls in order
(remote-mvc's ViewerDaemon) is not asked to answer every call: of a window of up
to ``ONEWAY_WINDOW`` unanswered calls, one is two-way, sent once the window is
nearly full or ``ACK_INTERVAL`` after the last one; its answer acknowledges every
call before it (a connection's calls are handled in order). Calls not answered
by ``ACK_INTERVAL`` are followed by a two-way call with no events (:meth:`Window.sync_due`),
so a stall is still noticed within ``ACK_INTERVAL + call_timeout``.

Each interval is drawn between ``ACK_INTERVAL / 2`` and ``ACK_INTERVAL``, so
that the viewers of a change do not all answer the same call: in step, every
viewer would ask on the same change, and that change would carry N answers to
send and read on top of its N deliveries (a latency spike).
"""

from __future__ import annotations

import collections
import random

__all__ = ["MAX_IN_FLIGHT", "ONEWAY_WINDOW", "ACK_INTERVAL", "UnexpectedAnswer", "Window"]

MAX_IN_FLIGHT = 2
ONEWAY_WINDOW = 8
ACK_INTERVAL = 0.1
_jitter = random.Random()


class UnexpectedAnswer(ValueError):
    """An answer came for no call that asked for one (a broken or hostile peer)."""


class Window:
    """The calls sent to one viewer and not yet acknowledged: (sent at, revision, events, two-way)."""

    def __init__(self, *, oneway: bool, event_limit: int, size: int | None = None,
                 ack_interval: float = ACK_INTERVAL, jitter: random.Random = _jitter) -> None:
        self.oneway = oneway  # the viewer takes oneway calls, in order
        self.size = size if size is not None else (ONEWAY_WINDOW if oneway else MAX_IN_FLIGHT)
        self.event_limit = event_limit  # events in flight at most (the fan-out's queue_limit)
        self.ack_interval = ack_interval
        self.delivered_revision = 0  # the last revision the viewer acknowledged
        self._jitter = jitter
        self._in_flight: collections.deque[tuple[float, int, int, bool]] = collections.deque()
        self._events = 0
        self._asking = 0  # two-way calls among them (at most one when calls may be oneway)
        self._ask_by = 0.0  # when the next call asks for an answer, at the latest
        self._last_progress = 0.0
        self._report_due = False  # a handler raised in a two-way call: ask once more (see acknowledge)

    @property
    def in_flight(self) -> int:
        """Calls not yet acknowledged."""
        return len(self._in_flight)

    @property
    def events_in_flight(self) -> int:
        """Events in the calls not yet acknowledged."""
        return self._events

    @property
    def asking(self) -> bool:
        """Whether a call that asked for an answer is unanswered."""
        return bool(self._asking)

    def has_room(self) -> bool:
        """Another call may go out (calls and events both bounded)."""
        return len(self._in_flight) < self.size and self._events < self.event_limit

    def next_is_two_way(self, now: float) -> bool:
        """Whether the next call asks for an answer."""
        if not self.oneway:
            return True
        if self._asking:
            return False
        return len(self._in_flight) + 2 >= self.size or now >= self._ask_by

    def sent(self, now: float, revision: int, count: int, two_way: bool) -> None:
        """A call carrying ``count`` events up to ``revision`` went out."""
        if not self._in_flight:
            self._last_progress = now
        if two_way:
            self._asking += 1
            self._ask_by = now + self.ack_interval * self._jitter.uniform(0.5, 1.0)
        self._in_flight.append((now, revision, count, two_way))
        self._events += count

    def sync_due(self, now: float) -> int | None:
        """The revision an empty two-way call is to carry when one is due now (calls sent oneway that
        nothing else will acknowledge, or failures an exception answer could not report), else None.
        The caller sends it and reports it with :meth:`sent` (``count`` 0, two-way)."""
        if self._asking or now < self._ask_by or not (self._in_flight or self._report_due):
            return None
        self._report_due = False
        return self._in_flight[-1][1] if self._in_flight else self.delivered_revision

    def acknowledge(self, now: float, raised: bool) -> int:
        """An answer came: it acknowledges its call and every (oneway) call before it; return how
        many. ``raised``: the call's own handler failed (then the oneway calls' failures before it
        are still counted at the viewer: the next :meth:`sync_due` asks for them)."""
        if not self._asking:
            raise UnexpectedAnswer("answer to a call that was not made")
        calls = 0
        while True:
            _, revision, count, two_way = self._in_flight.popleft()
            self._events -= count
            calls += 1
            if two_way:
                break
        self.delivered_revision = revision
        self._asking -= 1
        self._last_progress = now
        if raised and self.oneway:
            self._report_due = True
        return calls

    def stalled(self, now: float, timeout: float) -> bool:
        """The oldest call that asked for an answer has had none for ``timeout``, counted from the last
        answer or from its sending, whichever is later (it cannot be answered before)."""
        if not self._asking:
            return False
        sent = next(at for at, _, _, two_way in self._in_flight if two_way)
        return now - max(self._last_progress, sent) > timeout
