"""The relay: one model's state and recent events as the gateway serves them to HTTP streams.

A :class:`Feed` lives in the gateway's event loop. The gateway's one Viewer of the model
hands it each change (and each snapshot the viewer had to take) through
``loop.call_soon_threadsafe``; the feed keeps the values, the revision, the epoch and a
bounded ring of recent events, each already encoded as a Server-Sent Events frame (encoded
once, written to every client). Each stream client has a :class:`StreamClient`: a bounded
buffer of frames. A client whose buffer is full has it cleared and is marked for a snapshot
(it is sent the current values instead of what it missed), so a slow client costs a bounded
amount of memory and never holds up the feed or the other clients.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from typing import Any

from ..metrics import Metrics

log = logging.getLogger("remote_mvc.gateway")

__all__ = ["Feed", "StreamClient", "sse_frame", "tend"]


def sse_frame(kind: str, revision: int, data: dict[str, Any]) -> bytes:
    """One SSE event: ``id`` is the revision, so ``Last-Event-ID`` resumes from it."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=True, default=repr)
    return f"id: {revision}\nevent: {kind}\ndata: {body}\n\n".encode()


class StreamClient:
    """One HTTP stream's queue: frames to write, or a snapshot owed (``resync`` says why)."""

    __slots__ = ("feed", "limit", "buffer", "wake", "resync", "sent", "closed", "beat", "last_write",
                 "writing_since", "stuck", "task")

    def __init__(self, feed: Feed, limit: int) -> None:
        self.feed = feed
        self.limit = limit
        self.buffer: collections.deque[tuple[int, bytes]] = collections.deque()
        self.wake = asyncio.Event()
        self.resync: str | None = None  # a snapshot is owed, for this reason
        self.sent = -1  # the revision the client has (last frame written); -1: nothing yet
        self.closed = False
        self.beat = False  # idle for a heartbeat interval: write a keep-alive
        self.last_write = 0.0  # loop time of the last completed write
        self.writing_since: float | None = None  # loop time a write in progress began
        self.stuck = False  # dropped for a write that took too long
        self.task: asyncio.Task[Any] | None = None  # the stream's task, while it runs

    def push(self, revision: int, frame: bytes) -> None:
        if self.resync is not None:
            return  # a snapshot replaces everything before it
        if len(self.buffer) >= self.limit:
            self.buffer.clear()
            self.owe_snapshot("slow")
            return
        self.buffer.append((revision, frame))
        self.wake.set()

    def owe_snapshot(self, reason: str) -> None:
        self.buffer.clear()
        self.resync = reason
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class Feed:
    """A model as the gateway relays it (every method runs in the event loop)."""

    def __init__(self, name: str, ring_size: int, client_buffer: int, metrics: Metrics) -> None:
        self.name = name
        self.revision = 0
        self.values: dict[str, Any] = {}
        self.time = 0.0
        self.synced = False
        self.server_epoch = ""  # the model server's epoch when its events carry one
        self.generation = 0  # times the revision went backwards under us (a model with new state)
        self.ring: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=ring_size)
        self.clients: set[StreamClient] = set()
        self.client_buffer = client_buffer
        self.schema: dict[str, Any] | None = None
        self._metrics = metrics
        self._gauge = metrics.gateway_clients.labels(name)
        self._sent = metrics.gateway_events_sent.labels(name)

    @property
    def epoch(self) -> str:
        """Which history the revisions belong to: a client holding another epoch's revision
        gets a snapshot, never a resume that would mix two histories."""
        return f"{self.server_epoch or '0'}.{self.generation}"

    # from the viewer (scheduled into the loop) ---------------------------------------
    def on_snapshot(self, revision: int, values: dict[str, Any], at: float) -> None:
        """The viewer had to take a snapshot (start, or a gap it could not fill from history)."""
        if self.synced and revision < self.revision:
            self.generation += 1  # the model server lost or reset its state: a new history
        self.revision, self.values, self.time, self.synced = revision, values, at, True
        self.ring.clear()  # what came before does not continue into what comes now
        for client in self.clients:
            if client.resync is None or client.resync == "waiting":
                client.owe_snapshot("resync" if client.resync is None else "initial")

    def on_event(self, event: dict[str, Any]) -> None:
        revision = event["revision"]
        epoch = str(event.get("epoch") or "")
        if epoch != self.server_epoch and self.synced and epoch:
            self.server_epoch = epoch
            self.on_snapshot(revision, event["values"], event["time"])
            return
        self.server_epoch = epoch or self.server_epoch
        if self.synced and revision <= self.revision:
            return
        self.revision, self.values, self.time, self.synced = revision, event["values"], event["time"], True
        data = {"model": self.name, "revision": revision, "epoch": self.epoch, "time": event["time"],
                "identity": event.get("identity"), "changes": event.get("changes", {}), "values": event["values"]}
        if event.get("via"):
            data["via"] = event["via"]
        frame = sse_frame("change", revision, data)
        self.ring.append((revision, frame))
        for client in self.clients:
            client.push(revision, frame)

    # for the HTTP side ---------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "revision": self.revision, "epoch": self.epoch, "synced": self.synced,
                "values": dict(self.values), "time": self.time}

    def snapshot_frame(self, reason: str) -> bytes:
        self._metrics.gateway_snapshots.labels(self.name, reason).inc()
        return sse_frame("snapshot", self.revision, {**self.describe(), "reason": reason})

    def attach(self) -> StreamClient:
        client = StreamClient(self, self.client_buffer)
        self.clients.add(client)
        self._gauge.set(len(self.clients))
        return client

    def detach(self, client: StreamClient) -> None:
        self.clients.discard(client)
        self._gauge.set(len(self.clients))

    def plan(self, client: StreamClient, since: int | None, epoch: str | None) -> str | None:
        """Start ``client`` at ``since``: queue what it missed from the ring and return None,
        or owe it a snapshot, or return "history" when the ring does not reach back far enough
        (the caller then asks the model server). Runs right after attach, in one loop step."""
        if not self.synced:
            client.resync = "waiting"  # the first snapshot the feed gets is this client's
            return None
        if since is None:
            client.owe_snapshot("initial")
        elif epoch is not None and epoch != self.epoch:
            client.owe_snapshot("epoch")
        elif since > self.revision:
            client.owe_snapshot("ahead")  # a revision we never had: another history
        else:
            client.sent = since
            if since == self.revision:
                return None
            if self.ring and self.ring[0][0] <= since + 1:
                # the resume may exceed the client's buffer limit once: it is bounded by the ring size
                client.buffer.extend(item for item in self.ring if item[0] > since)
                client.wake.set()
                self._metrics.gateway_resumes.labels(self.name, "ring").inc()
                return None
            return "history"
        return None

    def backfill(self, client: StreamClient, since: int, events: list[dict[str, Any]], upto: int) -> None:
        """Put the model server's history before what the client already has queued; a snapshot
        when it does not join up (compacted, or shorter than the way to ``upto``)."""
        revisions = [e["revision"] for e in events]
        if not events or revisions != list(range(since + 1, since + 1 + len(events))) or revisions[-1] < upto:
            client.owe_snapshot("behind")
            return
        if client.resync is not None:
            return
        frames = [(e["revision"], sse_frame("change", e["revision"], {
            "model": self.name, "revision": e["revision"], "epoch": self.epoch, "time": e["time"],
            "identity": e.get("identity"), "changes": e.get("changes", {}), "values": e["values"],
            **({"via": e["via"]} if e.get("via") else {})})) for e in events]
        # the backfill may exceed the client's buffer limit once: it is bounded by the ring size
        client.buffer = collections.deque(frames + [q for q in client.buffer if q[0] > revisions[-1]])
        client.wake.set()
        self._metrics.gateway_resumes.labels(self.name, "history").inc()

    def sent(self, count: int) -> None:
        self._sent.inc(count)

    def close(self) -> None:
        for client in list(self.clients):
            client.close()


async def tend(feeds: list[Feed], heartbeat: float, send_timeout: float, metrics: Metrics | None = None) -> None:
    """One task for all streams, instead of two timers per write: every so often, mark streams
    idle for ``heartbeat`` for a keep-alive, and cancel streams whose write has been in
    progress for longer than ``send_timeout`` (a client that does not read)."""
    loop = asyncio.get_running_loop()
    interval = max(0.05, min(heartbeat, send_timeout) / 4)
    errors = (metrics or Metrics()).loop_errors.labels("gateway-tender")
    while True:
        await asyncio.sleep(interval)  # a periodic sweep, not a wait for a condition
        try:
            _sweep(feeds, loop.time(), heartbeat, send_timeout)
        except Exception:  # a bug: logged with its traceback, counted, and the next sweep runs
            log.exception("gateway stream tender error")
            errors.inc()


def _sweep(feeds: list[Feed], now: float, heartbeat: float, send_timeout: float) -> None:
    """One pass of :func:`tend` over every stream."""
    for feed in feeds:
        for client in list(feed.clients):
            if client.writing_since is not None:
                if now - client.writing_since > send_timeout and client.task is not None and not client.stuck:
                    client.stuck = True
                    client.closed = True
                    client.task.cancel()
            elif now - client.last_write >= heartbeat and not client.beat:
                client.beat = True
                client.wake.set()
