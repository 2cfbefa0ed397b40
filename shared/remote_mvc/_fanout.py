"""Fan-out of change events to subscribed viewers.

A publish appends the event to one shared log of recent events, whatever the
number of viewers (etcd's watch works the same way). Every subscriber has its
own sender: a cursor into that log (and a backlog from history when it
resubscribed), an outbound buffer and a count of calls in flight. One
event-loop thread per model drives all the senders over non-blocking sockets,
so a slow or dead viewer only ever holds up its own sender, and a thousand
viewers cost one thread, not a thousand:

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
* a viewer more than ``queue_limit`` events behind gets one fresh snapshot
  instead, and is told so;
* a turn sends to the viewers of one host one after another;
* a call not answered within ``call_timeout`` (a stalled viewer), or a broken
  connection (a dead one), drops the viewer; so does a lease it failed to renew;
* connecting to viewers is bounded per destination (``CONNECTS_PER_DESTINATION``
  at a time to one daemon address) and per subscriber (``CONNECTS_PER_OWNER``
  for one identity, or one address of anonymous callers), so subscriptions to a
  silent peer hold a few of the connector pool's threads, never all of them, and
  cannot delay a genuine viewer's first snapshot;
* the loop survives anything a sender throws at it: an unexpected error is
  logged with its traceback, counted (``remote_mvc_loop_errors_total``) and the
  loop goes on; :meth:`Fanout.healthy` says whether it is turning;
* each loop turn visits only the senders with something to do (all of them
  after a publish, otherwise those whose socket became ready), and checks for
  stalls a few times per ``call_timeout``.

Each subscriber's sender is a :class:`~remote_mvc._sender.Subscriber`; this
module holds the registry and the loop. The connection and Pyro5 handshake are
made by a Pyro5 proxy in a small connector pool; the loop thread then owns the
socket and speaks Pyro5's wire protocol on it (``notify`` calls, two-way or
oneway, JSON serializer).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import json
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from Pyro5.api import Proxy
from Pyro5.errors import CommunicationError, PyroError
from Pyro5.errors import TimeoutError as PyroTimeout

from ._sender import ACK_INTERVAL, MAX_IN_FLIGHT, ONEWAY_WINDOW, Subscriber, _Tally
from .logs import log_event, log_exception
from .metrics import Metrics

__all__ = ["ACK_INTERVAL", "MAX_IN_FLIGHT", "ONEWAY_WINDOW", "CONNECTS_PER_DESTINATION", "CONNECTS_PER_OWNER",
           "Fanout", "Subscriber"]

log = logging.getLogger("remote_mvc.fanout")

CONNECTOR_THREADS = 16
CONNECTS_PER_DESTINATION = 2  # connections being made to one viewer daemon (host:port) at a time
CONNECTS_PER_OWNER = 8  # ... for the subscriptions of one identity (anonymous: of one address)
STUCK_AFTER = 30.0  # seconds without a loop turn (it turns at least every 0.5 s) before it is unhealthy


def _by_destination(sub: Subscriber) -> tuple[str, str]:
    """Send order within a turn: the viewers of one host (one daemon address) one after another,
    so that a host hosting many viewers wakes once for all of them rather than once for each."""
    return sub.destination, sub.id


class Fanout:
    """The subscriber registry of one model: subscribe, publish, renew, expire; and its loop."""

    def __init__(self, model: str, snapshot: Callable[[], dict], metrics: Metrics, *,
                 lease_seconds: float = 10.0, call_timeout: float = 3.0, queue_limit: int = 1000,
                 batch_max: int = 500, clock: Callable[[], float] = time.monotonic, revision: int = 0) -> None:
        self.model = model
        self.model_json = json.dumps(model)
        self.snapshot = snapshot
        self.metrics = metrics
        self.lease_seconds = lease_seconds
        self.call_timeout = call_timeout
        self.queue_limit = queue_limit
        self.batch_max = batch_max
        self.clock = clock
        # the live stream: recent events in revision order, read by every sender from its own cursor
        self._log: collections.deque[dict] = collections.deque()
        self._log_lock = threading.Lock()
        self.last_revision = revision  # of the last event published
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
        self._in_order: list[Subscriber] = []  # the loop's live senders, sorted by _by_destination
        self._stopped: collections.deque[Subscriber] = collections.deque()
        self._published = False  # set by publish(): every sender may have work
        self._connector = ThreadPoolExecutor(max_workers=CONNECTOR_THREADS, thread_name_prefix=f"connect-{model}")
        self._connect_lock = threading.Lock()
        self._connect_waiting: collections.deque[Subscriber] = collections.deque()
        self._connecting: collections.Counter[tuple[str, str]] = collections.Counter()
        # subscriptions per owner: identity, and ("@", address) for anonymous callers (their caps)
        self._owned: collections.Counter[str] = collections.Counter()
        self._loop_errors = metrics.loop_errors.labels("fanout")
        self._turned = clock()  # when the loop last began a turn (see healthy)
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
        contiguous = last - first + 1 == len(events)  # then (first, last) names the batch
        cached = self._batch_cache
        if contiguous and cached[0] == first and cached[1] == last:
            return cached[2]
        body = f'{{"model":{self.model_json},"events":[{",".join(map(self.encoded, events))}]}}'.encode()
        if contiguous:
            self._batch_cache = (first, last, body)
        return body

    def _wake(self) -> None:
        try:
            self._waker_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed

    # registry ----------------------------------------------------------------------
    def add(self, viewer_id: str, uri: str, backlog: list[dict] | None, start: bool = True,
            oneway: bool = False, identity: str = "local", host: str | None = None) -> Subscriber:
        """Subscribe a viewer; ``backlog`` events go first, ``None`` means a snapshot first.

        Call with the publisher's lock held so that no event falls between the
        backlog and the live stream. A viewer id subscribing again replaces its
        old subscription (a reconnect), so the count stays right; whether the
        caller may replace it is the model server's to decide (see
        ``ModelServer.subscribe``). ``identity`` and ``host`` say who subscribes.
        """
        sub = Subscriber(self, viewer_id, uri, self.clock() + self.lease_seconds, oneway, identity, host)
        if backlog is None:
            sub.offer_snapshot()
        else:
            sub.offer_backlog(backlog)
        with self._lock:
            old = self._by_viewer.get(viewer_id)
            if old is not None:
                self._subs.pop(old.id, None)
                self._disown(old)
            self._subs[sub.id] = sub
            self._by_viewer[viewer_id] = sub
            for key in self._owners(sub):
                self._owned[key] += 1
            self._gauge.set(len(self._subs))
        if old is not None:
            old.stop()
        if start:
            if not self._loop_started:
                self._loop_started = True
                self._loop.start()
            self._schedule_connect(sub)
        log_event(log, "viewer_subscribed", "viewer subscribed", viewer_id=viewer_id, uri=uri,
                  subscription=sub.id, viewers=len(self._subs), model=self.model,
                  replaced=old is not None)
        return sub

    @staticmethod
    def _owners(sub: Subscriber) -> tuple[str, ...]:
        """The counts a subscription is in: its identity's, and an anonymous caller's address's."""
        if sub.identity == "anonymous" and sub.host is not None:
            return sub.identity, f"@{sub.host}"
        return (sub.identity,)

    def _disown(self, sub: Subscriber) -> None:
        """Take a subscription out of its owners' counts (lock held)."""
        for key in self._owners(sub):
            self._owned[key] -= 1
            if self._owned[key] <= 0:
                del self._owned[key]

    def owned(self, identity: str, host: str | None = None) -> tuple[int, int]:
        """How many subscriptions ``identity`` holds, and how many anonymous ones were made from ``host``."""
        with self._lock:
            return self._owned.get(identity, 0), self._owned.get(f"@{host}", 0) if host is not None else 0

    def get(self, subscription_id: str) -> Subscriber | None:
        return self._subs.get(subscription_id)

    def of_viewer(self, viewer_id: str) -> Subscriber | None:
        """The current subscription of a viewer id, if any."""
        return self._by_viewer.get(viewer_id)

    # connecting ----------------------------------------------------------------------
    @staticmethod
    def _connect_keys(sub: Subscriber) -> tuple[tuple[str, str], tuple[str, str]]:
        owner = sub.identity if sub.host is None or sub.identity != "anonymous" else f"anonymous@{sub.host}"
        return ("destination", sub.destination), ("owner", owner)

    def _schedule_connect(self, sub: Subscriber | None = None) -> None:
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
                if candidate._stopped:
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

    def _connect_one(self, sub: Subscriber) -> None:
        try:
            self._connect(sub)
        except Exception as exc:  # noqa: BLE001 - a connector thread must never lose its slot
            self._loop_error("connector", exc)
            self.drop(sub, "unreachable", f"{type(exc).__name__}: {exc}")
        finally:
            with self._connect_lock:
                for k in self._connect_keys(sub):
                    self._connecting[k] -= 1
                    if self._connecting[k] <= 0:
                        del self._connecting[k]
            self._schedule_connect()

    def _loop_error(self, loop: str, exc: BaseException) -> None:
        self._loop_errors.inc()
        log_exception(log, "loop_error", f"unexpected error in the fan-out's {loop}; it goes on", exc,
                      model=self.model, loop=f"fanout-{loop}")

    def healthy(self) -> bool:
        """The loop is running and turning (it turns at least every half second): False once its
        thread died or has been stuck in one turn for ``STUCK_AFTER`` seconds."""
        if not self._loop_started or self._closed:
            return True
        return self._loop.is_alive() and self.clock() - self._turned < STUCK_AFTER

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
        """Append an event to the live stream (caller holds the publisher's lock): O(1), whatever
        the number of viewers; each sender reads on from its own cursor."""
        with self._log_lock:
            self._log.append(event)
            if len(self._log) > self.queue_limit + self.batch_max:
                self._log.popleft()
            self.last_revision = event["revision"]
        self._published = True
        self._wake()

    def events_after(self, revision: int) -> list[dict] | None:
        """Up to ``batch_max`` events of the live stream after ``revision``; None when some of
        them are no longer kept (the reader is to take a snapshot)."""
        with self._log_lock:
            log = self._log
            if not log or log[-1]["revision"] <= revision:
                return []
            start = revision + 1 - log[0]["revision"]
            if start < 0:
                return None
            if start == len(log) - 1:  # the usual case: a viewer in step
                return [log[-1]]
            return list(itertools.islice(log, start, start + self.batch_max))

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
            self._disown(sub)
            count = len(self._subs)
            self._gauge.set(count)
        sub.stop()
        fields: dict[str, Any] = {"reason": reason} if reason else {}
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

    def describe(self, full: Callable[[Subscriber], bool] = lambda _sub: True) -> list[dict[str, Any]]:
        """One entry per subscription; its id and callback URI only where ``full(sub)`` says so."""
        now = self.clock()
        out = []
        for s in list(self._subs.values()):
            entry = {"viewer_id": s.viewer_id, "queued": s.queued, "delivered_revision": s.delivered_revision,
                     "lease_left": round(s.lease_expiry - now, 3)}
            if full(s):
                entry.update(subscription=s.id, uri=s.uri, identity=s.identity)
            out.append(entry)
        return out

    # the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        """Send what is queued, read answers, drop the stalled.

        Each turn visits only the senders that may have something to do: all of
        them after a publish, otherwise those whose socket became ready. Stalls
        are checked a few times per ``call_timeout``, not on every turn.
        """
        live: set[Subscriber] = set()
        pending: set[Subscriber] = set()
        state = [0.0]  # the next stall check
        while not self._closed:
            try:
                self._turn(live, pending, state)
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one sender's trouble
                self._loop_error("loop", exc)
                pending.update(live)  # look at every sender again next turn
                time.sleep(0.01)  # never a hot loop, should the error repeat
        for sub in live:
            sub._close()

    def _turn(self, live: set[Subscriber], pending: set[Subscriber], state: list[float]) -> None:
        """One turn of the loop (see _run)."""
        sel = self._selector
        check_every = max(0.01, min(ACK_INTERVAL / 2, self.call_timeout / 10))
        next_check = state[0]
        self._turned = self.clock()
        while self._connected:
            sub = self._connected.popleft()
            sub.proxy._pyroClaimOwnership()  # type: ignore[union-attr] # handed over by the connector: this thread alone uses it now
            if not sub._stopped:
                live.add(sub)
                bisect.insort(self._in_order, sub, key=_by_destination)
                pending.add(sub)
                sel.register(sub.sock, selectors.EVENT_READ, sub)  # type: ignore[arg-type]  # connected
            else:
                sub._close()
        while self._stopped:
            sub = self._stopped.popleft()
            if sub in live:
                self._forget(sub, live)
            pending.discard(sub)
        if self._published:
            self._published = False  # before looking at the queues: a later publish sets it again
            turn: list[Subscriber] | set[Subscriber] = list(self._in_order)  # every sender, kept in host order (a copy: _service may drop one)
        else:
            turn = sorted(pending, key=_by_destination) if len(pending) > 1 else pending
        now = time.monotonic()
        for sub in turn:
            self._service(sub, live, now)
        pending.clear()
        if now >= next_check:
            next_check = now + check_every
            for sub in [s for s in live if s._stalled(now)]:
                self._fail(sub, live, "timeout", "no answer within the call timeout")
            for sub in live:
                if sub._sync(now):
                    self._service(sub, live, now)
        state[0] = next_check
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
            except Exception as exc:  # noqa: BLE001 - a bug or a hostile answer: this sender goes
                self._loop_error("sender", exc)
                self._fail(sub, live, "error", f"{type(exc).__name__}: {exc}")
                continue
            pending.add(sub)  # room in its pipeline, or its buffer drained: next turn sends

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
                self._selector.modify(sub.sock, interest, sub)  # type: ignore[arg-type]  # connected
                sub._interest = interest
        except (OSError, PyroError, ValueError) as exc:
            self._fail(sub, live, "unreachable", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - e.g. its snapshot could not be made: it goes, and comes back
            self._loop_error("sender", exc)  # with a fresh subscription and snapshot; the others go on
            self._fail(sub, live, "error", f"{type(exc).__name__}: {exc}")

    def _count(self) -> None:
        tally = self.tally
        if tally.events:
            self._events_counter.inc(tally.events)
            tally.events = 0
        if tally.calls:
            self._calls_counter.inc(tally.calls)
            tally.calls = 0

    def _forget(self, sub: Subscriber, live: set[Subscriber]) -> None:
        if sub in live:
            live.discard(sub)
            self._in_order.remove(sub)
        try:
            self._selector.unregister(sub.sock)  # type: ignore[arg-type]  # None: refused below
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
        with self._connect_lock:
            self._closed = True
            self._connect_waiting.clear()
        self._connector.shutdown(wait=False, cancel_futures=True)
        self._wake()
        if self._loop_started:
            self._loop.join(timeout)
        self._selector.close()
        self._waker_r.close()
        self._waker_w.close()
