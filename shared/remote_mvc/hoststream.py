"""One stream per viewer host: the viewers of one model in one host share one subscription.

A :class:`~remote_mvc.viewer.ViewerHost` holds one :class:`Stream` per model
its viewers watch. The stream is the only object the model server knows of that
host for that model: one subscription, one connection, each change sent once.
It tells the server its member viewer ids (at subscribe, and with
``set_members`` when a viewer joins or leaves), so ``viewers()`` still lists
every viewer.

The stream keeps its own mirror of the model (a :class:`Viewer` nobody
registers): a notification is first admitted by the mirror (the subscription's
capability, the batch's shape, the stream's own exactness), then handed to each
member through the host's :class:`Dispatcher`:

* every member has its own backlog of pending notifications (at most
  ``viewer_backlog`` events) and keeps its own revision, exactness (duplicates
  skipped, gaps filled from history by itself) and handler;
* a small pool of ``viewer_dispatch_threads`` workers runs the members: a
  member is run by at most one worker at a time, and one run applies
  everything pending for it, in order (a handler slower than the change rate
  gets *batches*, counted in ``remote_mvc_viewer_merged_total``), then goes to
  the back of the line, so one slow handler holds up only its own viewer;
* a member whose backlog overflows is *conflated*: its pending notifications
  are dropped and it is given the mirror's latest state (no server call; as
  Lightstreamer's merge mode), counted in ``remote_mvc_viewer_conflated_total``
  and logged (at most once a second per stream);
* a viewer that joins a running stream starts from the mirror's state, or,
  when it already holds a revision, catches up from history itself;
* a handler that *stalls* (runs longer than ``viewer_stall_seconds``, e.g.
  blocked on I/O without a timeout) does not take the pool with it: while work
  waits and fewer than ``viewer_dispatch_threads`` workers are free of stalled
  handlers, a watchdog adds a spare worker (at most
  ``viewer_dispatch_threads_max`` in all; spares retire when idle), logs
  ``viewer_handler_stalled`` and counts ``remote_mvc_viewer_stalls_total``;
* when even the ceiling is not enough (every worker runs a stalled handler and
  work waits), the host is *exhausted*: logged at ERROR
  (``viewer_dispatch_exhausted``), the gauge
  ``remote_mvc_viewer_dispatch_exhausted`` is 1 and the host reports itself
  unhealthy until a handler returns, so its supervisor can restart it.

The model server's sender therefore never waits on a viewer's handler: the
stream answers as soon as the mirror applied the batch. The server drops a host
only when the host stops answering (reason ``timeout``) or its connection
breaks (``unreachable``), never for a slow handler.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import auth
from .logs import log_event, log_exception
from .metrics import Metrics

if TYPE_CHECKING:
    from .viewer import Viewer

__all__ = ["Dispatcher", "Stream"]

log = logging.getLogger("remote_mvc.hoststream")


class _Member:
    """A viewer in a stream, with its pending notifications (the dispatcher's lock guards it)."""

    __slots__ = ("viewer", "stream", "pending", "events", "scheduled", "conflate", "sync_to", "removed")

    def __init__(self, viewer: Viewer, stream: Stream) -> None:
        self.viewer = viewer
        self.stream = stream
        self.pending: collections.deque[dict[str, Any]] = collections.deque()
        self.events = 0  # events in pending
        self.scheduled = False  # in the ready queue or being run by a worker
        self.conflate = False  # its backlog overflowed: the next run gives it the latest state
        self.sync_to: int | None = None  # joined behind the stream: catch up to this revision first
        self.removed = False


class Dispatcher:
    """Runs the members' handlers on a small pool of threads, each member on one thread at a time."""

    def __init__(self, threads: int, backlog: int, metrics: Metrics, *, max_threads: int | None = None,
                 stall_seconds: float = 2.0, spare_idle_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threads = threads
        self.max_threads = max(threads, max_threads or threads)
        self.backlog = backlog
        self.stall_seconds = stall_seconds
        self.spare_idle_seconds = spare_idle_seconds
        self._clock = clock
        self._metrics = metrics
        self._lock = threading.Lock()
        self._ready: queue.SimpleQueue[_Member | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._running: dict[threading.Thread, tuple[float, _Member]] = {}  # worker -> (since, member) in a run
        self._spawned = 0
        self._watchdog: threading.Thread | None = None
        self._exhausted = False  # every worker (at the ceiling) stalled while work waits
        self._exhausted_gauge = metrics.viewer_dispatch_exhausted
        self._stopping = threading.Event()
        self._logged: dict[str, float] = {}  # model -> when a conflation was last logged
        self._conflations: dict[str, int] = collections.Counter()
        self._loop_errors = metrics.loop_errors.labels("viewer-dispatch")

    def start(self) -> None:
        """Start the workers and the stall watchdog (once)."""
        with self._lock:
            if self._workers:
                return
            self._stopping.clear()
            for _ in range(self.threads):
                self._spawn()
        if self._watchdog is None or not self._watchdog.is_alive():  # spares; a pool exhausted by stalls
            self._watchdog = threading.Thread(target=self._watch, name="viewer-dispatch-watchdog", daemon=True)
            self._watchdog.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Let the workers finish what they run and end; wait ``timeout`` in all, not per worker (a
        stalled handler's worker is left to end on its own: it is a daemon thread)."""
        self._stopping.set()
        with self._lock:
            workers = list(self._workers)
        for _ in workers:
            self._ready.put(None)
        deadline = time.monotonic() + timeout
        for t in workers:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._watchdog is not None:
            self._watchdog.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._workers.clear()

    def exhausted(self) -> bool:
        """True while every worker, at the ceiling, runs a stalled handler and other work waits: no
        viewer of this host gets anything until one of those handlers returns."""
        return self._exhausted

    def workers(self) -> int:
        """How many workers the pool has now (spares included)."""
        with self._lock:
            return len(self._workers)

    def _spawn(self) -> None:
        """Add a worker (the lock held)."""
        t = threading.Thread(target=self._work, name=f"viewer-dispatch-{self._spawned}", daemon=True)
        self._spawned += 1
        self._workers.append(t)
        t.start()

    def _watch(self) -> None:
        """Add a spare worker while work waits and stalled handlers hold too many of the workers."""
        period = max(0.01, self.stall_seconds / 2)
        while not self._stopping.wait(period):
            try:
                self._check_stalls()
            except Exception as exc:  # noqa: BLE001 - the watchdog outlives anything one check hits
                self._loop_errors.inc()
                log_exception(log, "loop_error", "unexpected error in the dispatch watchdog; it goes on", exc,
                              loop="viewer-dispatch-watchdog")

    def _check_stalls(self) -> None:
        now = self._clock()
        with self._lock:
            stalled = [(since, m) for since, m in self._running.values() if now - since >= self.stall_seconds]
            waiting = not self._ready.empty()
            at_ceiling = len(self._workers) >= self.max_threads
            exhausted = waiting and at_ceiling and len(stalled) >= len(self._workers)
            turned, self._exhausted = exhausted != self._exhausted, exhausted
            workers = len(self._workers)
            grow = waiting and workers - len(stalled) < self.threads and not at_ceiling
            if grow:
                self._spawn()
                workers += 1
        if turned:
            self._exhausted_changed(exhausted, workers, stalled)
        if not grow:
            return
        models = sorted({m.viewer.model for _, m in stalled})
        for model in models:
            self._metrics.viewer_stalls.labels(model).inc()
        log_event(log, "viewer_handler_stalled", "viewer handlers are stalled: a spare dispatch worker runs the "
                  "other viewers", level=logging.WARNING, models=models, workers=workers,
                  viewer_ids=sorted(m.viewer.viewer_id for _, m in stalled),
                  stalled_seconds=round(max(now - since for since, _ in stalled), 3))

    def _exhausted_changed(self, exhausted: bool, workers: int, stalled: list[tuple[float, _Member]]) -> None:
        self._exhausted_gauge.set(1 if exhausted else 0)
        if exhausted:
            log_event(log, "viewer_dispatch_exhausted", "every dispatch worker runs a stalled handler, at the "
                      "ceiling: no viewer of this host gets changes until one returns; the host reports itself "
                      "unhealthy", level=logging.ERROR, workers=workers,
                      viewer_ids=sorted(m.viewer.viewer_id for _, m in stalled))
        else:
            log_event(log, "viewer_dispatch_recovered", "the dispatch workers run again", workers=workers)

    def offer(self, member: _Member, batch: dict[str, Any], events: int) -> None:
        """Queue a notification for ``member`` (``events``: how many events it carries, a snapshot
        counts one); cheap, never blocks on the member's handler."""
        conflated = False
        with self._lock:
            if member.removed:
                return
            if not member.conflate:
                if member.events + events > self.backlog:
                    member.pending.clear()
                    member.events = 0
                    member.conflate = conflated = True
                else:
                    member.pending.append(batch)
                    member.events += events
            if member.scheduled:
                schedule = False
            else:
                member.scheduled = schedule = True
        if conflated:
            self._conflated(member)
        if schedule:
            self._ready.put(member)

    def sync(self, member: _Member, revision: int) -> None:
        """Have ``member`` catch up to ``revision`` itself (it joined behind the stream)."""
        with self._lock:
            if member.removed:
                return
            member.sync_to = revision
            schedule = not member.scheduled
            member.scheduled = True
        if schedule:
            self._ready.put(member)

    def remove(self, member: _Member) -> None:
        """Forget ``member``'s pending notifications; a run in progress finishes its handler call."""
        with self._lock:
            member.removed = True
            member.pending.clear()
            member.events = 0

    def _conflated(self, member: _Member) -> None:
        viewer = member.viewer
        self._metrics.viewer_conflated.labels(viewer.model).inc()
        model = viewer.model
        self._conflations[model] += 1
        now = time.monotonic()
        if now - self._logged.get(model, 0.0) >= 1.0:
            self._logged[model] = now
            log_event(log, "viewer_conflated", "a viewer's handler is slower than the change rate: it gets "
                      "the latest state instead of every change", level=logging.WARNING, model=model,
                      viewer_id=viewer.viewer_id, revision=viewer.revision, backlog=self.backlog,
                      conflations=self._conflations[model])

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                member = self._ready.get(timeout=self.spare_idle_seconds)
            except queue.Empty:
                with self._lock:  # idle: a spare (beyond the pool's size) retires
                    if len(self._workers) > self.threads and me in self._workers:
                        self._workers.remove(me)
                        return
                continue
            if member is None:
                return
            try:
                self._run(member, me)
            except Exception as exc:  # noqa: BLE001 - a worker outlives anything one run hits
                with self._lock:
                    self._running.pop(me, None)  # the run ended here, not at its own end
                self._loop_errors.inc()
                log_exception(log, "loop_error", "unexpected error in a viewer dispatch worker; it goes on", exc,
                              loop="viewer-dispatch")

    def _run(self, member: _Member, worker: threading.Thread) -> None:
        """One run of a member: everything pending for it, in order; then the back of the line.
        While it runs, ``_running`` holds when it began (what the watchdog calls stalled), kept in the
        two lock sections a run takes anyway."""
        with self._lock:
            batches = list(member.pending)
            member.pending.clear()
            member.events = 0
            conflate, member.conflate = member.conflate, False
            sync_to, member.sync_to = member.sync_to, None
            if member.removed or not (batches or conflate or sync_to is not None):
                member.scheduled = False
                return
            self._running[worker] = (self._clock(), member)
        viewer = member.viewer
        try:
            if sync_to is not None:
                viewer.catch_up_to(sync_to)
            if conflate:
                state = member.stream.mirror.state()
                if state is not None:
                    viewer.deliver([{"snapshot": state, "reason": "conflated"}])
            if batches:
                if len(batches) > 1:
                    self._metrics.viewer_merged.labels(viewer.model).inc()
                viewer.deliver(batches)
        except Exception as exc:  # noqa: BLE001 - a handler's error stays its viewer's
            self._metrics.handler_errors.labels(viewer.model).inc()
            log_event(log, "handler_error", f"viewer handler raised: {exc!r}", level=logging.WARNING,
                      viewer_id=viewer.viewer_id, model=viewer.model, revision=viewer.revision)
        with self._lock:
            del self._running[worker]
            again = not member.removed and bool(member.pending or member.conflate or member.sync_to is not None)
            member.scheduled = again
        if again:
            self._ready.put(member)


@auth.declared
class Stream:
    """A viewer host's one subscription to one model: admits each notification once (with its
    mirror), then hands it to every member viewer through the dispatcher."""

    _mvc_notify = True  # ViewerDaemon hands notify calls over directly

    def __init__(self, stream_id: str, mirror: Viewer, dispatcher: Dispatcher) -> None:
        self.viewer_id = stream_id  # the id the stream subscribes with (logs name it)
        self.model = mirror.model
        self.mirror = mirror
        self._dispatcher = dispatcher
        self._members: dict[Viewer, _Member] = {}
        self._lock = threading.Lock()  # one notification at a time (two connections around a re-subscribe)
        self.version = 0  # bumped by every join and leave: the host tells the server when it changed

    @property
    def revision(self) -> int:
        """The stream's revision (its mirror's)."""
        return self.mirror.revision

    def members(self) -> list[Viewer]:
        """The member viewers."""
        return list(self._members)

    def member_ids(self) -> list[str]:
        """The member viewers' ids (what the model server lists in ``viewers()``)."""
        return [v.viewer_id for v in list(self._members)]

    def __len__(self) -> int:
        return len(self._members)

    @auth.remote(auth.CAPABILITY)
    def notify(self, batch: dict[str, Any]) -> None:
        """Called by the model server: admitted by the mirror (capability, shape, exactness; refused
        with PermissionDenied or ValidationError as a viewer's); what the mirror applied (never more:
        a duplicate or an implausible revision goes no further) is queued for every member."""
        with self._lock:
            mirror = self.mirror
            mirror.applied = []
            try:
                mirror.notify(batch)
                applied = mirror.applied
            finally:
                mirror.applied = None
            if not applied:
                return  # nothing new (a duplicate), or nothing the mirror could accept
            members = list(self._members.values())
            offer = self._dispatcher.offer
            for accepted in applied:  # only what the mirror applied: its events in order, gaps filled
                events = len(accepted.get("events", ())) + ("snapshot" in accepted)
                for member in members:
                    offer(member, accepted, events)

    def join(self, viewer: Viewer) -> None:
        """Add a member: it starts from the mirror's state (no server call), or catches up from
        history itself when it already holds a revision."""
        with self._lock:
            member = _Member(viewer, self)
            self._members[viewer] = member
            self.version += 1
            state = self.mirror.state()
            if state is None:
                return  # the stream's first notification (a snapshot) reaches it too
            if not viewer.synced or viewer.epoch != state.get("epoch"):
                self._dispatcher.offer(member, {"snapshot": state, "reason": "join"}, 1)
            elif viewer.revision < state["revision"]:
                self._dispatcher.sync(member, state["revision"])

    def leave(self, viewer: Viewer) -> bool:
        """Remove a member (its pending notifications are forgotten); False when it is not one."""
        with self._lock:
            member = self._members.pop(viewer, None)
            if member is None:
                return False
            self.version += 1
        self._dispatcher.remove(member)
        return True
