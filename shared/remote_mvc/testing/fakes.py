"""In-memory fakes for unit tests of code that reacts to a model: no daemon, no socket, no thread.

A :class:`FakeModel` answers like a model server for one process (schema validation,
``expected_revision`` conflicts, gap-free revisions, change events of the server's shape, a
bounded history), and a :class:`FakeViewerHost` delivers its changes to real
:class:`~remote_mvc.Viewer` objects through their public ``notify`` path, in the calling
thread, with a subscription capability as the model server would. So an ``on_change``
handler is tested with the same viewer code that runs in production, including duplicates,
gaps (filled from the fake's history) and snapshots::

    from remote_mvc import ExampleModel, Viewer
    from remote_mvc.testing import FakeModel, FakeViewerHost

    def test_my_handler():
        seen = []
        model = FakeModel(ExampleModel)
        host = FakeViewerHost(model)
        host.add(Viewer("v", model.name, on_change=lambda v, e: seen.append(v.values["value"])))
        model.modify({"value": 5})
        assert seen == [0, 5]  # the subscribe snapshot, then the change

``host.pause()`` holds deliveries and ``host.resume()`` sends what was held as one batch;
``host.lose(n)`` drops the next ``n`` notifications, as a lost connection would, so the
viewer meets a gap at the next one and fills it from the model's history.
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConflictError, HistoryCompacted, ValidationError
from ..model import ExampleModel, Model

if TYPE_CHECKING:
    from ..viewer import Viewer

__all__ = ["FakeModel", "FakeViewerHost"]


class FakeModel:
    """A model server's answers, in memory: ``snapshot``, ``schema``, ``history``, ``modify``."""

    def __init__(self, schema: type[Model] = ExampleModel, name: str = "remote_mvc.model", *,
                 identity: str = "test", history_limit: int = 10000,
                 clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.schema_class = schema
        self.identity = identity  # who the changes are made by, in their events
        self.clock = clock
        self.revision = 0
        self.values: dict[str, Any] = schema.defaults()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=history_limit)
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    def listen(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(event)`` after each change (what a model server's fan-out publishes)."""
        self._listeners.append(listener)

    def snapshot(self) -> dict[str, Any]:
        """Revision and values, read together."""
        return {"model": self.name, "revision": self.revision, "values": dict(self.values), "time": self.clock()}

    def query(self) -> dict[str, Any]:
        """The current values."""
        return dict(self.values)

    def schema(self) -> dict[str, dict[str, Any]]:
        """The fields with their types and defaults."""
        return self.schema_class.describe()

    def history(self, since_revision: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Change events after ``since_revision``, oldest first; HistoryCompacted past the limit."""
        if since_revision >= self.revision:
            return []
        first = self.events[0]["revision"] if self.events else self.revision + 1
        if since_revision + 1 < first:
            raise HistoryCompacted(f"history starts at revision {first}; take a snapshot", first)
        return [e for e in self.events if e["revision"] > since_revision][:limit]

    def modify(self, changes: dict[str, Any], expected_revision: int | None = None,
               identity: str | None = None) -> int:
        """Validate and apply a change as the model server does; the new revision (ValidationError,
        ConflictError as the server raises them)."""
        normalized = self.schema_class.validate(self.values, changes)
        if expected_revision is not None and expected_revision != self.revision:
            raise ConflictError(f"expected revision {expected_revision}, model is at {self.revision}")
        event: dict[str, Any] = {
            "model": self.name, "revision": self.revision + 1, "time": self.clock(),
            "identity": identity or self.identity,
            "changes": {k: {"old": self.values.get(k), "new": v} for k, v in normalized.items()},
            "values": {**self.values, **normalized},
        }
        self.revision, self.values = event["revision"], event["values"]
        self.events.append(event)
        for listener in list(self._listeners):
            listener(event)
        return self.revision


class FakeViewerHost:
    """Keeps real viewers of a :class:`FakeModel` current, synchronously, as a viewer host would."""

    def __init__(self, model: FakeModel) -> None:
        self.model = model
        self.viewers: dict[str, Viewer] = {}
        self._capabilities: dict[str, str] = {}
        self._held: list[dict[str, Any]] | None = None
        self._lose = 0
        model.listen(self._publish)

    def add(self, viewer: Viewer) -> Viewer:
        """Subscribe ``viewer``: it gets a capability, its gap-filling sources and the snapshot."""
        if viewer.model != self.model.name:
            raise ValidationError(f"viewer {viewer.viewer_id} watches {viewer.model}, not {self.model.name}")
        capability = secrets.token_urlsafe(16)
        viewer.fetch = self.model.history
        viewer.fetch_snapshot = self.model.snapshot
        viewer.accept_capability(capability)
        self.viewers[viewer.viewer_id], self._capabilities[viewer.viewer_id] = viewer, capability
        viewer.notify({"capability": capability, "snapshot": self.model.snapshot(), "reason": "subscribe"})
        return viewer

    def remove(self, viewer: Viewer) -> None:
        """Unsubscribe ``viewer``: it gets nothing more."""
        self.viewers.pop(viewer.viewer_id, None)
        self._capabilities.pop(viewer.viewer_id, None)

    def pause(self) -> None:
        """Hold the changes from now on (a slow network); :meth:`resume` delivers them."""
        if self._held is None:
            self._held = []

    def resume(self) -> None:
        """Deliver the held changes to every viewer as one batch, and deliver at once again."""
        held, self._held = self._held or [], None
        if held:
            self._deliver(held)

    def lose(self, count: int = 1) -> None:
        """Drop the next ``count`` changes for every viewer (a lost connection): a gap at the next one."""
        self._lose += count

    def _publish(self, event: dict[str, Any]) -> None:
        if self._held is not None:
            self._held.append(event)
        elif self._lose:
            self._lose -= 1
        else:
            self._deliver([event])

    def _deliver(self, events: list[dict[str, Any]]) -> None:
        for viewer_id, viewer in list(self.viewers.items()):
            viewer.notify({"capability": self._capabilities[viewer_id], "events": [dict(e) for e in events]})
