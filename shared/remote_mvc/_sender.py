"""One viewer's sender: its cursor, its window of calls, its Pyro5 messages.

The fan-out loop (:mod:`remote_mvc._fanout`) owns every :class:`Subscriber`'s
socket and calls its ``_fill``, ``_flush``, ``_read`` and ``_sync``; the sender
reads events from the fanout's shared log, after its cursor (and first, its
backlog from history, given when it subscribed under the publisher's lock).
Calls are Pyro5 invoke messages of ``notify`` with the JSON serializer, built
here without Pyro5's per-message machinery. Every call's batch carries the
subscription's secret ``capability`` (made at subscribe, given to the subscriber
alone in the subscribe reply): a viewer applies only batches that carry it, so
nobody else who can reach its daemon can feed it events. The capability is in
the call's envelope, made once per subscriber, so the batch's text is still
made once for every viewer.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import secrets
import selectors
import socket
import ssl
import struct
import threading
from typing import TYPE_CHECKING

from Pyro5 import protocol
from Pyro5.api import Proxy
from Pyro5.errors import PyroError
from Pyro5.serializers import serializers

from .logs import log_event

if TYPE_CHECKING:
    from ._fanout import Fanout

log = logging.getLogger("remote_mvc.fanout")

MAX_IN_FLIGHT = 2  # one call being handled, one ready behind it: more only fragments batches
# Viewers that take oneway notify calls in order (remote-mvc's ViewerDaemon) are not asked to answer
# every call: of a window of up to ONEWAY_WINDOW unanswered calls, one is two-way, sent once the
# window is nearly full or ACK_INTERVAL after the last one; its answer acknowledges every call before
# it (a connection's calls are handled in order). Calls not answered by ACK_INTERVAL are followed by a
# two-way call with no events, so a stall is still noticed within ACK_INTERVAL + call_timeout.
# Each interval is drawn between ACK_INTERVAL / 2 and ACK_INTERVAL, so that the viewers of a change
# do not all answer the same call: in step, every viewer would ask on the same change, and that
# change would carry N answers to send and read on top of its N deliveries (a latency spike).
ONEWAY_WINDOW = 8
ACK_INTERVAL = 0.1
MAX_ANSWER = 64 * 1024  # a viewer's answer to notify: a failure count, or an exception with its traceback
_jitter = random.Random()
_JSON_ID = serializers["json"].serializer_id
_HEADER = protocol._header_size
# Pyro5's message header, packed here rather than through SendingMessage for every viewer's call
# (the unit tests check the result against Pyro5's own parser)
_HEADER_STRUCT = struct.Struct(protocol._header_format)
_NO_CORRELATION = protocol._empty_correlation_id
_RETRY = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _failures(answer: bytes) -> int:
    """Handler failures a viewer reports in its answer: ViewerDaemon answers with how many of the
    oneway calls since its last answer raised (a plain Pyro5 daemon answers ``null``)."""
    if answer in (b"null", b"0"):
        return 0
    try:
        value = json.loads(answer)
    except ValueError:
        return 0
    return value if isinstance(value, int) and value > 0 else 0


class _Tally:
    """Counts the loop thread keeps between metric updates."""

    __slots__ = ("events", "calls")

    def __init__(self) -> None:
        self.events = 0
        self.calls = 0


class Subscriber:
    """One viewer's subscription: its queue, its sender state and its lease."""

    def __init__(self, fanout: Fanout, viewer_id: str, uri: str, lease_expiry: float,
                 oneway: bool = False, identity: str = "local", host: str | None = None) -> None:
        self.fanout = fanout
        self.oneway = oneway  # the viewer takes oneway notify calls, in order
        self.viewer_id = viewer_id
        self.uri = uri
        self.destination = uri.rpartition("@")[2]  # the viewer's daemon address (host:port)
        self.id = f"{viewer_id}/{secrets.token_hex(6)}"
        # who made it: the proven identity, and the address it called from (anonymous callers are
        # told apart by that alone); only they (or an admin) may renew, replace or end it
        self.identity = identity
        self.host = host
        self.capability = secrets.token_urlsafe(24)  # carried by every call: see the module's docstring
        self.lease_expiry = lease_expiry
        self.delivered_revision = 0  # the last revision the viewer acknowledged
        self._queue: collections.deque[dict] = collections.deque()  # its backlog (history) events
        self._cursor = fanout.last_revision  # the last revision it has been given (or will be by its backlog)
        self._snapshot_due = ""  # why a snapshot is due ("subscribe", "behind"), or "" when none is
        self._stopped = False
        self._lock = threading.Lock()
        # owned by the loop thread once connected
        self.proxy: Proxy | None = None
        self.sock: socket.socket | None = None
        self._envelope = (b"", b"")  # the JSON of a notify call to this viewer's object, around the argument
        self._seq = 0
        self._out = bytearray()
        self._in = bytearray()
        # calls not yet acknowledged: (sent at, revision, events, two-way)
        self._in_flight: collections.deque[tuple[float, int, int, bool]] = collections.deque()
        self._in_flight_events = 0
        self._window = ONEWAY_WINDOW if oneway else MAX_IN_FLIGHT
        self._asking = 0  # two-way calls among them (at most one when calls may be oneway)
        self._ask_by = 0.0  # when the next call asks for an answer, at the latest (see ACK_INTERVAL)
        self._last_progress = 0.0
        self._report_due = False  # a handler raised in a two-way call: ask once more (see _read)
        self._interest = selectors.EVENT_READ  # what the loop's selector watches this socket for

    def offer_backlog(self, events: list[dict]) -> None:
        """Events from history that go before the live stream (with the publisher's lock held)."""
        with self._lock:
            if len(events) > self.fanout.queue_limit:
                self._snapshot_due = "behind"
                return
            self._queue.extend(events)
            if events:
                self._cursor = max(self._cursor, events[-1]["revision"])

    def offer_snapshot(self, reason: str = "subscribe") -> None:
        with self._lock:
            self._queue.clear()
            self._snapshot_due = reason

    @property
    def queued(self) -> int:
        """Events waiting for this viewer: its backlog, and how far it is behind the live stream."""
        return len(self._queue) + max(0, self.fanout.last_revision - self._cursor)

    def has_work(self) -> bool:
        return bool(self._queue or self._snapshot_due or self._cursor < self.fanout.last_revision) \
            and not self._stopped

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self.fanout._stopped.append(self)
        self.fanout._wake()

    def _next_batch(self) -> dict | None:
        """The next call's payload: up to ``batch_max`` events (its backlog first, then the live
        stream from the fanout's shared log), or a snapshot: when due, or once the viewer is more
        than ``queue_limit`` events behind."""
        fanout = self.fanout
        with self._lock:
            if self._stopped:
                return None
            if not self._snapshot_due:
                queue = self._queue
                if queue:
                    n = min(len(queue), fanout.batch_max)
                    events = [queue.popleft() for _ in range(n)]
                    if not queue and n < fanout.batch_max:  # the live stream follows on in the same call
                        live = fanout.events_after(self._cursor) or []
                        events += live[:fanout.batch_max - n]
                        if live:
                            self._cursor = events[-1]["revision"]
                    return {"events": events}
                if fanout.last_revision - self._cursor <= fanout.queue_limit:
                    fresh = fanout.events_after(self._cursor)
                    if fresh is not None:
                        if not fresh:
                            return None
                        self._cursor = fresh[-1]["revision"]
                        return {"events": fresh}
                self._snapshot_due = "behind"
            reason, self._snapshot_due = self._snapshot_due, ""
        snap = fanout.snapshot()  # takes the publisher's lock: consistent with the event stream
        with self._lock:
            self._queue.clear()  # a backlog is older than any snapshot
            self._cursor = max(self._cursor, snap["revision"])
        return {"snapshot": snap, "reason": reason}

    # the loop thread's side ------------------------------------------------------
    def _encode(self, batch: dict, two_way: bool = True) -> tuple[bytes, int, int]:
        """One Pyro5 invoke message: ``notify(batch)`` on this viewer's object, JSON serializer."""
        fanout = self.fanout
        if "snapshot" in batch:
            body = json.dumps({**batch, "model": fanout.model}, separators=(",", ":")).encode()
            revision, count = batch["snapshot"]["revision"], 1
        else:
            events = batch["events"]
            body = fanout.encoded_batch(events)
            revision, count = (events[-1]["revision"] if events else self.delivered_revision), len(events)
        head, tail = self._envelope
        size = len(head) + len(body) - 1 + len(tail)  # the batch's "{" is the envelope's (capability first)
        self._seq = (self._seq + 1) & 0xFFFF
        flags = 0 if two_way else protocol.FLAGS_ONEWAY
        header = _HEADER_STRUCT.pack(b"PYRO", protocol.PROTOCOL_VERSION, protocol.MSG_INVOKE, _JSON_ID, flags,
                                     self._seq, size, 0, _NO_CORRELATION, 0, protocol._magic_number)
        return b"".join((header, head, memoryview(body)[1:], tail)), revision, count

    def set_object(self, object_id: str) -> None:
        """The Pyro5 object id of the viewer, which every call names; the calls' envelope opens the
        batch object with this subscription's capability, and the batch's own text follows on."""
        self._envelope = (f'{{"object":{json.dumps(object_id)},"method":"notify","params":[{{"capability":'
                          f'{json.dumps(self.capability)},'.encode(), b'],"kwargs":{}}')

    def _fill(self, now: float) -> None:
        """Queue calls while the window has room (calls and events both bounded)."""
        while len(self._in_flight) < self._window and self._in_flight_events < self.fanout.queue_limit \
                and self.has_work():  # (a cheap look first: _next_batch takes two locks to say "nothing")
            batch = self._next_batch()
            if batch is None:
                return
            two_way = self._two_way(now)
            data, revision, count = self._encode(batch, two_way)
            self._send(data, now, revision, count, two_way)
            if "snapshot" in batch:
                self.fanout._snapshots_sent.inc()
            else:
                self.fanout.tally.events += count

    def _two_way(self, now: float) -> bool:
        """Whether the next call asks for an answer."""
        if not self.oneway:
            return True
        if self._asking:
            return False
        return len(self._in_flight) + 2 >= self._window or now >= self._ask_by

    def _send(self, data: bytes, now: float, revision: int, count: int, two_way: bool) -> None:
        if not self._in_flight:
            self._last_progress = now
        if two_way:
            self._asking += 1
            self._ask_by = now + ACK_INTERVAL * _jitter.uniform(0.5, 1.0)
        self._out += data
        self._in_flight.append((now, revision, count, two_way))
        self._in_flight_events += count

    def _sync(self, now: float) -> bool:
        """Ask for an answer to calls sent oneway that nothing else will acknowledge, or for the
        count of oneway failures that an exception answer could not carry."""
        if self._asking or now < self._ask_by or not (self._in_flight or self._report_due):
            return False
        self._report_due = False
        data, _, _ = self._encode({"events": []}, two_way=True)
        self._send(data, now, self._in_flight[-1][1] if self._in_flight else self.delivered_revision, 0, True)
        return True

    def _flush(self) -> None:
        while self._out:
            try:
                sent = self.sock.send(self._out)  # type: ignore[union-attr]  # connected: the loop owns it
            except _RETRY:
                return
            del self._out[:sent]

    def _read(self, now: float) -> None:
        """Take the viewer's answers off the socket; each one completes the oldest call."""
        while True:
            try:
                chunk = self.sock.recv(65536)  # type: ignore[union-attr]  # connected: the loop owns it
            except _RETRY:
                break
            if not chunk:
                raise ConnectionResetError("the viewer closed the connection")
            self._in += chunk
            if not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
                break
        while len(self._in) >= _HEADER:
            tag, version, _, _, flags, _, data_size, annotations_size, _, _, magic = _HEADER_STRUCT.unpack_from(self._in)
            if tag != b"PYRO" or version != protocol.PROTOCOL_VERSION or magic != protocol._magic_number:
                raise PyroError("invalid message from the viewer")
            if annotations_size + data_size > MAX_ANSWER:  # an answer is a count or an error: never buffer more
                raise PyroError(f"answer of {annotations_size + data_size} bytes from the viewer (at most {MAX_ANSWER})")
            size = _HEADER + annotations_size + data_size
            if len(self._in) < size:
                break
            answer = bytes(self._in[_HEADER + annotations_size:size])
            del self._in[:size]
            if not self._asking:
                raise PyroError("answer to a call that was not made")
            while True:  # the answer acknowledges its call and every (oneway) call before it
                _, revision, count, two_way = self._in_flight.popleft()
                self._in_flight_events -= count
                self.fanout.tally.calls += 1
                if two_way:
                    break
            self.delivered_revision = revision
            self._asking -= 1
            self._last_progress = now
            failed = 1 if flags & protocol.FLAGS_EXCEPTION else _failures(answer)
            if flags & protocol.FLAGS_EXCEPTION and self.oneway:  # its own failure only: the oneway calls'
                self._report_due = True  # failures before it are still counted at the viewer: ask for them
            if failed:  # the viewer's handler raised: it is alive, keep it
                self.fanout._failed.inc(failed)
                log_event(log, "notify_error", "viewer handler raised", level=logging.WARNING,
                          viewer_id=self.viewer_id, revision=self.delivered_revision, failures=failed)

    def _stalled(self, now: float) -> bool:
        """The oldest call that asked for an answer has had none for ``call_timeout``, counted from
        the last answer or from its sending, whichever is later (it cannot be answered before)."""
        if not self._asking:
            return False
        sent = next(at for at, _, _, two_way in self._in_flight if two_way)
        return now - max(self._last_progress, sent) > self.fanout.call_timeout

    def _close(self) -> None:
        if self.proxy is not None:
            self.proxy._pyroRelease()  # closes the socket too
            self.proxy = None
        self.sock = None
