"""The live stream of one model: recent events in revision order, each encoded once.

A publish appends to one shared log, whatever the number of viewers (etcd's
watch works the same way); every viewer's cursor reads on from its own place
(:mod:`.cursor`). Each event's JSON is made once, and a batch's text once for
every viewer in step: the per-viewer work is only the call's envelope.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading

__all__ = ["Stream"]


class Stream:
    """The shared log of recent events (``queue_limit + batch_max`` of them) and their encodings."""

    def __init__(self, model: str, *, queue_limit: int, batch_max: int, revision: int = 0) -> None:
        self.model = model
        self.model_json = json.dumps(model)
        self.queue_limit = queue_limit
        self.batch_max = batch_max
        self.last_revision = revision  # of the last event published
        self._log: collections.deque[dict] = collections.deque()
        self._log_lock = threading.Lock()
        self._encoded: collections.OrderedDict[int, str] = collections.OrderedDict()
        self._encoded_lock = threading.Lock()
        self._batch_cache: tuple[int, int, bytes] = (0, 0, b"")  # (first, last revision, body) of the last batch

    @property
    def kept(self) -> int:
        """How many events the log holds now."""
        return len(self._log)

    def publish(self, event: dict) -> None:
        """Append an event (caller holds the publisher's lock): O(1), whatever the number of viewers."""
        with self._log_lock:
            self._log.append(event)
            if len(self._log) > self.queue_limit + self.batch_max:
                self._log.popleft()
            self.last_revision = event["revision"]

    def events_after(self, revision: int) -> list[dict] | None:
        """Up to ``batch_max`` events after ``revision``; None when some of them are no longer kept
        (the reader is to take a snapshot)."""
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

    def is_encoded(self, revision: int) -> bool:
        """Whether the event of ``revision`` has its JSON made (and kept) already."""
        return revision in self._encoded

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

    def encoded_snapshot(self, batch: dict) -> bytes:
        """The JSON argument of a ``notify`` call carrying a snapshot (``{"snapshot", "reason"}``)."""
        return json.dumps({**batch, "model": self.model}, separators=(",", ":")).encode()
