"""The fan-out's one event-loop thread: the only code touching viewers' sockets.

Connections are made by a small connector pool (``connect``, by default a
Pyro5 proxy's connect and handshake, :func:`remote_mvc.pyro.proxy.connect_viewer`),
bounded per destination (``CONNECTS_PER_DESTINATION`` at a time to one daemon
address) and per owner (``CONNECTS_PER_OWNER`` for one identity, or one
address of anonymous callers), so subscriptions to a silent peer hold a few of
the pool's threads, never all of them. The loop thread then owns each socket:

* each turn visits only the links with something to do (all of them after a
  publish, otherwise those whose socket became ready), viewers of one host one
  after another (their host wakes once for all of them);
* for each, it fills the window (:mod:`.window`) from the cursor (:mod:`.cursor`),
  packs the calls (:mod:`remote_mvc.pyro.notify`) and writes what the socket takes;
* it reads answers, checks for stalls a few times per ``call_timeout`` and drops
  (through ``on_drop``) a viewer that stalled or whose connection broke;
* it survives anything a link throws at it: an unexpected error is logged with
  its traceback, counted (``remote_mvc_loop_errors_total``) and the loop goes on.
"""

from __future__ import annotations

import bisect
import collections
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from Pyro5.errors import PyroError

from ..logs import log_event, log_exception
from ..metrics import Metrics
from ..pyro import notify
from ..pyro.proxy import ConnectFailed, connect_viewer
from .registry import Subscription
from .stream import Stream
from .window import ACK_INTERVAL

__all__ = ["CONNECTOR_THREADS", "CONNECTS_PER_DESTINATION", "CONNECTS_PER_OWNER", "STUCK_AFTER",
           "Connection", "Loop"]

log = logging.getLogger("remote_mvc.fanout")

CONNECTOR_THREADS = 16
CONNECTS_PER_DESTINATION = 2  # connections being made to one viewer daemon (host:port) at a time
CONNECTS_PER_OWNER = 8  # ... for the subscriptions of one identity (anonymous: of one address)
STUCK_AFTER = 30.0  # seconds without a loop turn (it turns at least every 0.5 s) before it is unhealthy
_RETRY = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Connection(Protocol):
    """A connected viewer, as ``connect`` gives it (see :class:`remote_mvc.pyro.proxy.ViewerConnection`)."""

    sock: socket.socket  # non-blocking
    object_id: str

    def claim(self) -> None:
        """The calling thread owns the connection from now on."""

    def close(self) -> None:
        """Close the connection."""


Connector = Callable[[str, float], Connection]


class _Link:
    """A connected subscription, as the loop thread holds it: its socket and bytes in and out."""

    __slots__ = ("sub", "conn", "envelope", "seq", "out", "answers", "interest", "key")

    def __init__(self, sub: Subscription, conn: Connection) -> None:
        self.sub = sub
        self.conn = conn
        self.envelope = notify.envelope(conn.object_id, sub.capability)
        self.seq = 0
        self.out = bytearray()
        self.answers = notify.AnswerReader()
        self.interest = selectors.EVENT_READ  # what the selector watches its socket for
        self.key = (sub.destination, sub.id)  # send order within a turn: the viewers of one host together


class _Tally:
    """Counts the loop thread keeps between metric updates."""

    __slots__ = ("events", "calls")

    def __init__(self) -> None:
        self.events = 0
        self.calls = 0


def _by_key(link: _Link) -> tuple[str, str]:
    return link.key


class Loop:
    """Connects subscriptions and drives their calls over non-blocking sockets, on one thread."""

    def __init__(self, stream: Stream, metrics: Metrics, *, call_timeout: float,
                 on_drop: Callable[[Subscription, str, str], None], clock: Callable[[], float] = time.monotonic,
                 connect: Connector = connect_viewer) -> None:
        model = stream.model
        self.model = model
        self._stream = stream
        self.call_timeout = call_timeout
        self._on_drop = on_drop
        self._clock = clock
        self._connect_viewer = connect
        self._snapshots_sent = metrics.snapshots_sent.labels(model)
        self._failed = metrics.notifications_failed.labels(model)
        self._events_counter = metrics.events_delivered.labels(model)
        self._calls_counter = metrics.notifications_sent.labels(model)
        self._loop_errors = metrics.loop_errors.labels("fanout")
        self._tally = _Tally()  # per-delivery counts, added to the metrics once per loop turn
        self._connected: collections.deque[_Link] = collections.deque()
        self._stopped: collections.deque[Subscription] = collections.deque()
        self._published = False  # set by wake(published=True): every link may have work
        self._connector = ThreadPoolExecutor(max_workers=CONNECTOR_THREADS, thread_name_prefix=f"connect-{model}")
        self._connect_lock = threading.Lock()
        self._connect_waiting: collections.deque[Subscription] = collections.deque()
        self._connecting: collections.Counter[tuple[str, str]] = collections.Counter()
        self._turned = clock()  # when the loop last began a turn (see healthy)
        self._selector = selectors.DefaultSelector()
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._waker_w.setblocking(False)
        self._selector.register(self._waker_r, selectors.EVENT_READ, None)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"fanout-{model}", daemon=True)
        self._started = False
        self._start_lock = threading.Lock()
        # the loop thread's own state
        self._live: dict[Subscription, _Link] = {}
        self._in_order: list[_Link] = []  # the live links, sorted by _by_key
        self._pending: set[_Link] = set()
        self._next_check = 0.0

    # any thread ---------------------------------------------------------------------
    def wake(self, published: bool = False) -> None:
        """Have the loop turn now; ``published``: an event was appended, every link may have work."""
        if published:
            self._published = True
        try:
            self._waker_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed

    def add(self, sub: Subscription) -> None:
        """Connect ``sub`` (in the connector pool, within the caps) and serve it from then on."""
        with self._start_lock:
            if not self._started and not self._closed:
                self._started = True
                self._thread.start()
        self._schedule_connect(sub)

    def forget(self, sub: Subscription) -> None:
        """Stop serving ``sub`` (its cursor is stopped already): its connection is closed."""
        self._stopped.append(sub)
        self.wake()

    @property
    def connected(self) -> int:
        """Subscriptions whose connection the loop holds now."""
        return len(self._live)

    def healthy(self) -> bool:
        """The loop is running and turning (it turns at least every half second): False once its
        thread died or has been stuck in one turn for ``STUCK_AFTER`` seconds."""
        if not self._started or self._closed:
            return True
        return self._thread.is_alive() and self._clock() - self._turned < STUCK_AFTER

    def close(self, timeout: float = 2.0) -> None:
        """Stop connecting, end the loop (closing every connection) and release its sockets."""
        with self._connect_lock:
            self._closed = True
            self._connect_waiting.clear()
        self._connector.shutdown(wait=False, cancel_futures=True)
        self.wake()
        with self._start_lock:
            started = self._started
        if started:
            self._thread.join(timeout)
        self._selector.close()
        self._waker_r.close()
        self._waker_w.close()

    # connecting (connector pool) -------------------------------------------------------
    @staticmethod
    def _connect_keys(sub: Subscription) -> tuple[tuple[str, str], tuple[str, str]]:
        owner = sub.identity if sub.host is None or sub.identity != "anonymous" else f"anonymous@{sub.host}"
        return ("destination", sub.destination), ("owner", owner)

    def _schedule_connect(self, sub: Subscription | None = None) -> None:
        """Hand subscriptions to the connector pool, in order, as far as their destination's and
        their owner's limits allow; the others wait here (holding no thread) for a turn."""
        limits = {"destination": CONNECTS_PER_DESTINATION, "owner": CONNECTS_PER_OWNER}
        ready = []
        with self._connect_lock:
            if sub is not None:
                self._connect_waiting.append(sub)
            if self._closed:
                return
            waiting = self._connect_waiting
            for _ in range(len(waiting)):
                candidate = waiting.popleft()
                if candidate.stopped:
                    continue
                keys = self._connect_keys(candidate)
                if all(self._connecting[k] < limits[k[0]] for k in keys):
                    for k in keys:
                        self._connecting[k] += 1
                    ready.append(candidate)
                else:
                    waiting.append(candidate)
        for candidate in ready:
            try:
                self._connector.submit(self._connect_one, candidate)
            except RuntimeError:  # the pool was shut down meanwhile: closing
                return

    def _connect_one(self, sub: Subscription) -> None:
        try:
            self._connect(sub)
        except Exception as exc:  # noqa: BLE001 - a connector thread must never lose its slot
            self._loop_error("connector", exc)
            self._on_drop(sub, "unreachable", f"{type(exc).__name__}: {exc}")
        finally:
            with self._connect_lock:
                for k in self._connect_keys(sub):
                    self._connecting[k] -= 1
                    if self._connecting[k] <= 0:
                        del self._connecting[k]
            self._schedule_connect()

    def _connect(self, sub: Subscription) -> None:
        """Connect and shake hands (blocking, in the connector pool), then hand over to the loop."""
        try:
            conn = self._connect_viewer(sub.uri, self.call_timeout)
        except ConnectFailed as exc:
            self._failed.inc()
            self._on_drop(sub, exc.reason, str(exc))
            return
        self._connected.append(_Link(sub, conn))
        self.wake()

    def _loop_error(self, loop: str, exc: BaseException) -> None:
        self._loop_errors.inc()
        log_exception(log, "loop_error", f"unexpected error in the fan-out's {loop}; it goes on", exc,
                      model=self.model, loop=f"fanout-{loop}")

    # the loop thread ---------------------------------------------------------------------
    def _run(self) -> None:
        """Send what is queued, read answers, drop the stalled (see the module's docstring)."""
        while not self._closed:
            try:
                self._turn()
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one link's trouble
                self._loop_error("loop", exc)
                self._pending.update(self._live.values())  # look at every link again next turn
                time.sleep(0.01)  # never a hot loop, should the error repeat
        for link in self._live.values():
            link.conn.close()

    def _turn(self) -> None:
        """One turn of the loop."""
        sel = self._selector
        live, pending = self._live, self._pending
        check_every = max(0.01, min(ACK_INTERVAL / 2, self.call_timeout / 10))
        next_check = self._next_check
        self._turned = self._clock()
        while self._connected:
            link = self._connected.popleft()
            link.conn.claim()  # handed over by the connector: this thread alone uses it now
            if not link.sub.stopped:
                live[link.sub] = link
                bisect.insort(self._in_order, link, key=_by_key)
                pending.add(link)
                sel.register(link.conn.sock, selectors.EVENT_READ, link)
            else:
                link.conn.close()
        while self._stopped:
            sub = self._stopped.popleft()
            gone = live.get(sub)
            if gone is not None:
                self._forget(gone)
                pending.discard(gone)
        if self._published:
            self._published = False  # before looking at the cursors: a later publish sets it again
            turn: list[_Link] | set[_Link] = list(self._in_order)  # every link, in host order (a copy: one may go)
        else:
            turn = sorted(pending, key=_by_key) if len(pending) > 1 else pending
        now = time.monotonic()
        for link in turn:
            self._service(link, now)
        pending.clear()
        if now >= next_check:
            next_check = now + check_every
            for link in [k for k in live.values() if k.sub.window.stalled(now, self.call_timeout)]:
                self._fail(link, "timeout", "no answer within the call timeout")
            for link in list(live.values()):
                if self._sync(link, now):
                    self._service(link, now)
        self._next_check = next_check
        self._count()
        timeout = max(0.0, next_check - now) if live else 0.5
        for key, mask in sel.select(timeout=timeout):
            link = key.data
            if link is None:
                try:
                    while self._waker_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            if live.get(link.sub) is not link:
                continue
            try:
                if mask & selectors.EVENT_READ:
                    self._read(link, time.monotonic())
                if mask & selectors.EVENT_WRITE:
                    self._flush(link)
            except (OSError, PyroError, ValueError) as exc:
                self._fail(link, "unreachable", f"{type(exc).__name__}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - a bug or a hostile answer: this link goes
                self._loop_error("sender", exc)
                self._fail(link, "error", f"{type(exc).__name__}: {exc}")
                continue
            pending.add(link)  # room in its window, or its buffer drained: next turn sends

    def _service(self, link: _Link, now: float) -> None:
        """Fill one link's window, send what it can, and watch its socket for what it needs."""
        sub = link.sub
        if self._live.get(sub) is not link:
            return
        if sub.stopped:
            self._forget(link)
            return
        try:
            if sub.cursor.has_work():
                self._fill(link, now)
            if link.out:
                self._flush(link)
            interest = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.out else 0)
            if interest != link.interest:
                self._selector.modify(link.conn.sock, interest, link)
                link.interest = interest
        except (OSError, PyroError, ValueError) as exc:
            self._fail(link, "unreachable", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - e.g. its snapshot could not be made: it goes, and comes back
            self._loop_error("sender", exc)  # with a fresh subscription and snapshot; the others go on
            self._fail(link, "error", f"{type(exc).__name__}: {exc}")

    def _encode(self, link: _Link, batch: dict, two_way: bool) -> tuple[bytes, int, int]:
        """One notify call carrying ``batch``: its bytes, the revision it reaches and its event count."""
        stream = self._stream
        if "snapshot" in batch:
            body = stream.encoded_snapshot(batch)
            revision, count = batch["snapshot"]["revision"], 1
        else:
            events = batch["events"]
            body = stream.encoded_batch(events)
            revision = events[-1]["revision"] if events else link.sub.window.delivered_revision
            count = len(events)
        link.seq = (link.seq + 1) & 0xFFFF
        return notify.pack_call(link.seq, link.envelope, body, two_way), revision, count

    def _fill(self, link: _Link, now: float) -> None:
        """Queue calls while the window has room."""
        window, cursor = link.sub.window, link.sub.cursor
        while window.has_room() and cursor.has_work():  # (a cheap look first: next_batch takes two locks)
            batch = cursor.next_batch()
            if batch is None:
                return
            two_way = window.next_is_two_way(now)
            data, revision, count = self._encode(link, batch, two_way)
            window.sent(now, revision, count, two_way)
            link.out += data
            if "snapshot" in batch:
                self._snapshots_sent.inc()
            else:
                self._tally.events += count

    def _sync(self, link: _Link, now: float) -> bool:
        """Send the empty two-way call the window asks for, if it does."""
        revision = link.sub.window.sync_due(now)
        if revision is None:
            return False
        data, _, _ = self._encode(link, {"events": []}, two_way=True)
        link.sub.window.sent(now, revision, 0, True)
        link.out += data
        return True

    @staticmethod
    def _flush(link: _Link) -> None:
        out, sock = link.out, link.conn.sock
        while out:
            try:
                sent = sock.send(out)
            except _RETRY:
                return
            del out[:sent]

    def _read(self, link: _Link, now: float) -> None:
        """Take the viewer's answers off the socket; each one acknowledges calls in its window."""
        sock = link.conn.sock
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except _RETRY:
                break
            if not chunk:
                raise ConnectionResetError("the viewer closed the connection")
            chunks.append(chunk)
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                break
        if not chunks:
            return
        window = link.sub.window
        for answer in link.answers.feed(b"".join(chunks)):
            self._tally.calls += window.acknowledge(now, answer.exception)
            if answer.failures:  # the viewer's handler raised: it is alive, keep it
                self._failed.inc(answer.failures)
                log_event(log, "notify_error", "viewer handler raised", level=logging.WARNING,
                          viewer_id=link.sub.viewer_id, revision=window.delivered_revision,
                          failures=answer.failures)

    def _count(self) -> None:
        tally = self._tally
        if tally.events:
            self._events_counter.inc(tally.events)
            tally.events = 0
        if tally.calls:
            self._calls_counter.inc(tally.calls)
            tally.calls = 0

    def _forget(self, link: _Link) -> None:
        if self._live.get(link.sub) is link:
            del self._live[link.sub]
            self._in_order.remove(link)
        try:
            self._selector.unregister(link.conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        link.conn.close()

    def _fail(self, link: _Link, reason: str, detail: str) -> None:
        self._failed.inc()
        self._forget(link)
        self._on_drop(link.sub, reason, detail)
