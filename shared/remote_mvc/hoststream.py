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
  when it already holds a revision, catches up from history itself.

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

    def __init__(self, threads: int, backlog: int, metrics: Metrics) -> None:
        self.threads = threads
        self.backlog = backlog
        self._metrics = metrics
        self._lock = threading.Lock()
        self._ready: queue.SimpleQueue[_Member | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._logged: dict[str, float] = {}  # model -> when a conflation was last logged
        self._conflations: dict[str, int] = collections.Counter()
        self._loop_errors = metrics.loop_errors.labels("viewer-dispatch")

    def start(self) -> None:
        """Start the workers (once)."""
        if self._workers:
            return
        for i in range(self.threads):
            t = threading.Thread(target=self._work, name=f"viewer-dispatch-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        """Let the workers finish what they run and end."""
        for _ in self._workers:
            self._ready.put(None)
        for t in self._workers:
            t.join(timeout)
        self._workers.clear()

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
        while True:
            member = self._ready.get()
            if member is None:
                return
            try:
                self._run(member)
            except Exception as exc:  # noqa: BLE001 - a worker outlives anything one run hits
                self._loop_errors.inc()
                log_exception(log, "loop_error", "unexpected error in a viewer dispatch worker; it goes on", exc,
                              loop="viewer-dispatch")

    def _run(self, member: _Member) -> None:
        """One run of a member: everything pending for it, in order; then the back of the line."""
        with self._lock:
            batches = list(member.pending)
            member.pending.clear()
            member.events = 0
            conflate, member.conflate = member.conflate, False
            sync_to, member.sync_to = member.sync_to, None
            if member.removed or not (batches or conflate or sync_to is not None):
                member.scheduled = False
                return
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
