"""Fan-out of change events to subscribed viewers.

Every subscriber has its own sender: a bounded queue of events, an outbound
buffer and a count of calls in flight. One event-loop thread per model drives
all the senders over non-blocking sockets, so a slow or dead viewer only ever
holds up its own sender, and a thousand viewers cost one thread, not a
thousand:

* events go out in revision order over the viewer's one connection, several
  per call when the viewer is behind (up to ``batch_max``), with up to
  ``MAX_IN_FLIGHT`` calls and ``queue_limit`` events pipelined (the viewer's
  daemon answers them in order); what queues meanwhile goes out as one batch;
* a viewer that subscribed with ``ordered_oneway`` (remote-mvc's viewer hosts)
  gets a window of ``ONEWAY_WINDOW`` calls of which only one at a time asks
  for an answer, and that answer acknowledges every call before it: an
  answer, and its wake-up, per few calls instead of per call;
* each event is encoded once (JSON), and a batch's text once, spliced into
  every viewer's call (a viewer host's :class:`~remote_mvc._daemons.ViewerDaemon`
  takes such calls on a short path);
* past ``queue_limit`` queued events the queue is replaced by one fresh
  snapshot, and the viewer is told so;
* a call not answered within ``call_timeout`` (a stalled viewer), or a broken
  connection (a dead one), drops the viewer; so does a lease it failed to renew;
* each loop turn visits only the senders with something to do (all of them
  after a publish, otherwise those whose socket became ready), and checks for
  stalls a few times per ``call_timeout``.

The connection and Pyro5 handshake are made by a Pyro5 proxy in a small
connector pool; the loop thread then owns the socket and speaks Pyro5's wire
protocol on it (``notify`` calls, two-way or oneway, JSON serializer).
"""

from __future__ import annotations

import collections
import json
import logging
import secrets
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from Pyro5 import protocol
from Pyro5.api import Proxy
from Pyro5.errors import CommunicationError, PyroError
from Pyro5.errors import TimeoutError as PyroTimeout
from Pyro5.serializers import serializers

from .logs import log_event
from .metrics import Metrics

log = logging.getLogger("remote_mvc.fanout")

MAX_IN_FLIGHT = 2  # one call being handled, one ready behind it: more only fragments batches
# Viewers that take oneway notify calls in order (remote-mvc's ViewerDaemon) are not asked to answer
# every call: of a window of up to ONEWAY_WINDOW unanswered calls, one is two-way, sent once the
# window is nearly full or ACK_INTERVAL after the last one; its answer acknowledges every call before
# it (a connection's calls are handled in order). Calls not answered by ACK_INTERVAL are followed by a
# two-way call with no events, so a stall is still noticed within ACK_INTERVAL + call_timeout.
ONEWAY_WINDOW = 8
ACK_INTERVAL = 0.1
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
                 oneway: bool = False) -> None:
        self.fanout = fanout
        self.oneway = oneway  # the viewer takes oneway notify calls, in order
        self.viewer_id = viewer_id
        self.uri = uri
        self.id = f"{viewer_id}/{secrets.token_hex(6)}"
        self.lease_expiry = lease_expiry
        self.delivered_revision = 0  # the last revision the viewer acknowledged
        self._queue: collections.deque[dict] = collections.deque()
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
        self._awaiting = False  # a two-way call is out (at most one when calls may be oneway)
        self._asked_at = 0.0  # when the last two-way call was sent
        self._last_progress = 0.0
        self._interest = selectors.EVENT_READ  # what the loop's selector watches this socket for

    # called with the publisher's lock held, so offers arrive in revision order
    def offer(self, event: dict) -> None:
        with self._lock:
            if self._stopped or self._snapshot_due:
                return  # stopped, or the snapshot to come will include this change
            if len(self._queue) >= self.fanout.queue_limit:
                self._queue.clear()
                self._snapshot_due = "behind"
            else:
                self._queue.append(event)

    def offer_snapshot(self, reason: str = "subscribe") -> None:
        with self._lock:
            self._queue.clear()
            self._snapshot_due = reason

    @property
    def queued(self) -> int:
        return len(self._queue)

    def has_work(self) -> bool:
        return bool(self._queue or self._snapshot_due) and not self._stopped

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self.fanout._stopped.append(self)
        self.fanout._wake()

    def _next_batch(self) -> dict | None:
        """The next call's payload: up to ``batch_max`` queued events, or a snapshot."""
        with self._lock:
            if self._stopped or not (self._queue or self._snapshot_due):
                return None
            if not self._snapshot_due:
                queue = self._queue
                if len(queue) == 1:  # the usual case: a viewer in step
                    return {"events": [queue.popleft()]}
                n = min(len(queue), self.fanout.batch_max)
                return {"events": [queue.popleft() for _ in range(n)]}
            reason, self._snapshot_due = self._snapshot_due, ""
        snap = self.fanout.snapshot()  # takes the publisher's lock: consistent with the event stream
        with self._lock:
            while self._queue and self._queue[0]["revision"] <= snap["revision"]:
                self._queue.popleft()
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
        size = len(head) + len(body) + len(tail)
        self._seq = (self._seq + 1) & 0xFFFF
        flags = 0 if two_way else protocol.FLAGS_ONEWAY
        header = _HEADER_STRUCT.pack(b"PYRO", protocol.PROTOCOL_VERSION, protocol.MSG_INVOKE, _JSON_ID, flags,
                                     self._seq, size, 0, _NO_CORRELATION, 0, protocol._magic_number)
        return b"".join((header, head, body, tail)), revision, count

    def set_object(self, object_id: str) -> None:
        """The Pyro5 object id of the viewer, which every call names."""
        self._envelope = (f'{{"object":{json.dumps(object_id)},"method":"notify","params":['.encode(),
                          b'],"kwargs":{}}')

    def _fill(self, now: float) -> None:
        """Queue calls while the window has room (calls and events both bounded)."""
        while len(self._in_flight) < self._window and self._in_flight_events < self.fanout.queue_limit:
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
        if self._awaiting:
            return False
        return len(self._in_flight) + 2 >= self._window or now - self._asked_at >= ACK_INTERVAL

    def _send(self, data: bytes, now: float, revision: int, count: int, two_way: bool) -> None:
        if not self._in_flight:
            self._last_progress = now
        if two_way:
            self._awaiting, self._asked_at = True, now
        self._out += data
        self._in_flight.append((now, revision, count, two_way))
        self._in_flight_events += count

    def _sync(self, now: float) -> bool:
        """Ask for an answer to calls sent oneway that nothing else will acknowledge."""
        if self._awaiting or not self._in_flight or now - self._asked_at < ACK_INTERVAL:
            return False
        data, _, _ = self._encode({"events": []}, two_way=True)
        self._send(data, now, self._in_flight[-1][1], 0, True)
        return True

    def _flush(self) -> None:
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except _RETRY:
                return
            del self._out[:sent]

    def _read(self, now: float) -> None:
        """Take the viewer's answers off the socket; each one completes the oldest call."""
        while True:
            try:
                chunk = self.sock.recv(65536)
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
            size = _HEADER + annotations_size + data_size
            if len(self._in) < size:
                break
            answer = bytes(self._in[_HEADER + annotations_size:size])
            del self._in[:size]
            if not self._awaiting:
                raise PyroError("answer to a call that was not made")
            while True:  # the answer acknowledges its call and every (oneway) call before it
                _, revision, count, two_way = self._in_flight.popleft()
                self._in_flight_events -= count
                self.fanout.tally.calls += 1
                if two_way:
                    break
            self.delivered_revision = revision
            self._awaiting = not self.oneway and bool(self._in_flight)
            self._last_progress = now
            failed = 1 if flags & protocol.FLAGS_EXCEPTION else _failures(answer)
            if failed:  # the viewer's handler raised: it is alive, keep it
                self.fanout._failed.inc(failed)
                log_event(log, "notify_error", "viewer handler raised", level=logging.WARNING,
                          viewer_id=self.viewer_id, revision=self.delivered_revision, failures=failed)

    def _stalled(self, now: float) -> bool:
        if not self._awaiting:
            return False
        # with oneway calls the awaited call may be younger than the last answer: time it from its sending
        since = max(self._last_progress, self._asked_at) if self.oneway else self._last_progress
        return now - since > self.fanout.call_timeout

    def _close(self) -> None:
        if self.proxy is not None:
            self.proxy._pyroRelease()  # closes the socket too
            self.proxy = None
        self.sock = None


class Fanout:
    """The subscriber registry of one model: subscribe, publish, renew, expire; and its loop."""

    def __init__(self, model: str, snapshot: Callable[[], dict], metrics: Metrics, *,
                 lease_seconds: float = 10.0, call_timeout: float = 3.0, queue_limit: int = 1000,
                 batch_max: int = 500, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.model_json = json.dumps(model)
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
        self._snapshots_sent = metrics.snapshots_sent.labels(model)
        self._failed = metrics.notifications_failed.labels(model)
        self._events_counter = metrics.events_delivered.labels(model)
        self._calls_counter = metrics.notifications_sent.labels(model)
        self.tally = _Tally()  # per-delivery counts, added to the metrics once per loop turn
        self._encoded: collections.OrderedDict[int, str] = collections.OrderedDict()
        self._encoded_lock = threading.Lock()
        self._batch_cache: tuple[int, int, bytes] = (0, 0, b"")  # (first, last revision, body) of the last batch
        self._connected: collections.deque[Subscriber] = collections.deque()
        self._stopped: collections.deque[Subscriber] = collections.deque()
        self._published = False  # set by publish(): every sender may have work
        self._connector = ThreadPoolExecutor(max_workers=16, thread_name_prefix=f"connect-{model}")
        self._selector = selectors.DefaultSelector()
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._waker_w.setblocking(False)
        self._selector.register(self._waker_r, selectors.EVENT_READ, None)
        self._closed = False
        self._loop = threading.Thread(target=self._run, name=f"fanout-{model}", daemon=True)
        self._loop_started = False

    def __len__(self) -> int:
        return len(self._subs)

    def encoded(self, event: dict) -> str:
        """An event's JSON, made once and shared by every viewer's call."""
        revision = event["revision"]
        text = self._encoded.get(revision)
        if text is None:
            text = json.dumps(event, separators=(",", ":"))
            with self._encoded_lock:
                self._encoded[revision] = text
                while len(self._encoded) > self.queue_limit + self.batch_max:
                    self._encoded.popitem(last=False)
        return text

    def encoded_batch(self, events: list[dict]) -> bytes:
        """The JSON argument of a ``notify`` call carrying ``events``.

        Viewers in step all get the same batch (usually one event), so the last
        one is kept and reused: the per-viewer work is the call's envelope.
        """
        if not events:  # a call that only asks for an answer
            return f'{{"model":{self.model_json},"events":[]}}'.encode()
        first, last = events[0]["revision"], events[-1]["revision"]
        cached = self._batch_cache
        if cached[0] == first and cached[1] == last and last - first + 1 == len(events):
            return cached[2]
        body = f'{{"model":{self.model_json},"events":[{",".join(map(self.encoded, events))}]}}'.encode()
        if last - first + 1 == len(events):  # contiguous: (first, last) names the batch
            self._batch_cache = (first, last, body)
        return body

    def _wake(self) -> None:
        try:
            self._waker_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed

    # registry ----------------------------------------------------------------------
    def add(self, viewer_id: str, uri: str, backlog: list[dict] | None, start: bool = True,
            oneway: bool = False) -> Subscriber:
        """Subscribe a viewer; ``backlog`` events go first, ``None`` means a snapshot first.

        Call with the publisher's lock held so that no event falls between the
        backlog and the live stream. A viewer id subscribing again replaces its
        old subscription (a reconnect), so the count stays right.
        """
        sub = Subscriber(self, viewer_id, uri, self.clock() + self.lease_seconds, oneway)
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
            if not self._loop_started:
                self._loop_started = True
                self._loop.start()
            self._connector.submit(self._connect, sub)
        log_event(log, "viewer_subscribed", "viewer subscribed", viewer_id=viewer_id, uri=uri,
                  subscription=sub.id, viewers=len(self._subs), model=self.model,
                  replaced=old is not None)
        return sub

    def _connect(self, sub: Subscriber) -> None:
        """Connect and shake hands (blocking, in the connector pool), then hand over to the loop."""
        proxy = Proxy(sub.uri)
        proxy._pyroTimeout = self.call_timeout
        proxy._pyroSerializer = "json"
        try:
            proxy._pyroBind()
            sock = proxy._pyroConnection.sock
            sock.setblocking(False)
        except (CommunicationError, PyroError, OSError) as exc:
            proxy._pyroRelease()
            self._failed.inc()
            self.drop(sub, "timeout" if isinstance(exc, PyroTimeout) else "unreachable",
                      f"{type(exc).__name__}: {exc}")
            return
        sub.proxy, sub.sock = proxy, sock
        sub.set_object(proxy._pyroUri.object)
        self._connected.append(sub)
        self._wake()

    def publish(self, event: dict) -> None:
        """Queue an event for every subscriber (caller holds the publisher's lock)."""
        for sub in list(self._subs.values()):
            sub.offer(event)
        self._published = True
        self._wake()

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

    # the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        """Send what is queued, read answers, drop the stalled.

        Each turn visits only the senders that may have something to do: all of
        them after a publish, otherwise those whose socket became ready. Stalls
        are checked a few times per ``call_timeout``, not on every turn.
        """
        live: set[Subscriber] = set()
        pending: set[Subscriber] = set()
        sel = self._selector
        check_every = max(0.01, min(ACK_INTERVAL / 2, self.call_timeout / 10))
        next_check = 0.0
        while not self._closed:
            while self._connected:
                sub = self._connected.popleft()
                sub.proxy._pyroClaimOwnership()  # handed over by the connector: this thread alone uses it now
                if not sub._stopped:
                    live.add(sub)
                    pending.add(sub)
                    sel.register(sub.sock, selectors.EVENT_READ, sub)
                else:
                    sub._close()
            while self._stopped:
                sub = self._stopped.popleft()
                if sub in live:
                    self._forget(sub, live)
                pending.discard(sub)
            if self._published:
                self._published = False  # before looking at the queues: a later publish sets it again
                pending.update(live)
            now = time.monotonic()
            for sub in pending:
                self._service(sub, live, now)
            pending.clear()
            if now >= next_check:
                next_check = now + check_every
                for sub in [s for s in live if s._stalled(now)]:
                    self._fail(sub, live, "timeout", "no answer within the call timeout")
                for sub in live:
                    if sub.oneway and sub._in_flight and sub._sync(now):
                        self._service(sub, live, now)
            self._count()
            timeout = max(0.0, next_check - now) if live else 0.5
            for key, mask in sel.select(timeout=timeout):
                sub = key.data
                if sub is None:
                    try:
                        while self._waker_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                if sub not in live:
                    continue
                try:
                    if mask & selectors.EVENT_READ:
                        sub._read(time.monotonic())
                    if mask & selectors.EVENT_WRITE:
                        sub._flush()
                except (OSError, PyroError, ValueError) as exc:
                    self._fail(sub, live, "unreachable", f"{type(exc).__name__}: {exc}")
                    continue
                pending.add(sub)  # room in its pipeline, or its buffer drained: next turn sends
        for sub in live:
            sub._close()

    def _service(self, sub: Subscriber, live: set[Subscriber], now: float) -> None:
        """Fill one sender's pipeline, send what it can, and watch its socket for what it needs."""
        if sub not in live:
            return
        if sub._stopped:
            self._forget(sub, live)
            return
        try:
            if sub.has_work():
                sub._fill(now)
            if sub._out:
                sub._flush()
            interest = selectors.EVENT_READ | (selectors.EVENT_WRITE if sub._out else 0)
            if interest != sub._interest:
                self._selector.modify(sub.sock, interest, sub)
                sub._interest = interest
        except (OSError, PyroError, ValueError) as exc:
            self._fail(sub, live, "unreachable", f"{type(exc).__name__}: {exc}")

    def _count(self) -> None:
        tally = self.tally
        if tally.events:
            self._events_counter.inc(tally.events)
            tally.events = 0
        if tally.calls:
            self._calls_counter.inc(tally.calls)
            tally.calls = 0

    def _forget(self, sub: Subscriber, live: set[Subscriber]) -> None:
        live.discard(sub)
        try:
            self._selector.unregister(sub.sock)
        except (KeyError, ValueError, OSError):
            pass
        sub._close()

    def _fail(self, sub: Subscriber, live: set[Subscriber], reason: str, detail: str) -> None:
        self._failed.inc()
        self._forget(sub, live)
        self.drop(sub, reason, detail)

    def close(self, timeout: float = 2.0) -> None:
        with self._lock:
            subs = list(self._subs.values())
            self._subs.clear()
            self._by_viewer.clear()
            self._gauge.set(0)
        for sub in subs:
            sub.stop()
        self._connector.shutdown(wait=False, cancel_futures=True)
        self._closed = True
        self._wake()
        if self._loop_started:
            self._loop.join(timeout)
        self._selector.close()
        self._waker_r.close()
        self._waker_w.close()
