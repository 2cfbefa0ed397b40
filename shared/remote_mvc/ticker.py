"""The ticker: a model that changes on a steady, drift-free clock.

Tick *k* is due at ``start + k * interval`` on a monotonic clock, so a late tick
does not push the later ones back (no drift), and ticks missed while the
process was stalled are skipped rather than fired in a burst. ``interval`` and
``paused`` are fields of the model itself: a controller changes them with an
ordinary ``modify`` and the clock follows from the next tick on.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import Settings
from .errors import MVCError
from .logs import log_event
from .metrics import Metrics
from .model import Field, Model, between
from .server import ModelServer, ModelService
from .store import is_etcd

if TYPE_CHECKING:
    from .election import Election

__all__ = ["TickerModel", "Ticker", "TickerService", "next_due"]

log = logging.getLogger("remote_mvc.ticker")


class TickerModel(Model):
    """A tick counter, a price that takes a random walk, and the time of the tick."""

    tick = Field(int, 0, between(0, None), doc="ticks so far")
    price = Field(float, 100.0, between(0.01, None), doc="a price-like random walk")
    time = Field(float, 0.0, doc="wall-clock time of the last tick (Unix seconds)")
    interval = Field(float, 1.0, between(0.01, 3600.0), doc="seconds between ticks")
    paused = Field(bool, False, doc="no ticks while true")


def next_due(anchor: float, interval: float, now: float) -> float:
    """The first tick time ``anchor + k*interval`` (k >= 1) strictly after ``now``."""
    k = max(1, int((now - anchor) // interval) + 1)
    return anchor + k * interval


class Ticker:
    """Drive a :class:`ModelServer` holding a :class:`TickerModel` from a clock thread."""

    def __init__(self, server: ModelServer, *, monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, seed: int | None = None,
                 metrics: Metrics | None = None) -> None:
        self.server = server
        self._loop_errors = (metrics or Metrics()).loop_errors.labels("ticker-clock")
        self.monotonic = monotonic
        self.wall = wall
        self.rng = random.Random(seed)
        self.active: Callable[[], bool] = lambda: True  # cluster mode: only the elected replica ticks
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ticker-clock", daemon=True)

    def start(self) -> Ticker:
        """Start the clock thread; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the clock thread."""
        self._stop.set()
        self._thread.join(timeout=5)

    def step(self) -> int | None:
        """Make one tick now (unless paused); return the new revision."""
        if not self.active():
            return None
        snap = self.server.snapshot()
        values = snap["values"]
        if values["paused"]:
            return None
        price = max(0.01, round(values["price"] * (1 + self.rng.gauss(0, 0.002)), 4))
        # based on the revision it read: a tick computed from a state that is not the latest (a replica
        # just elected, not caught up yet) is refused, never a tick number twice
        return self.server.modify_local(
            {"tick": values["tick"] + 1, "price": price, "time": self.wall()}, "ticker",
            expected_revision=snap["revision"])

    def _run(self) -> None:
        interval = self.server.snapshot()["values"]["interval"]
        anchor = self.monotonic()
        while True:
            due = next_due(anchor, interval, self.monotonic())
            if self._stop.wait(max(0.0, due - self.monotonic())):
                return
            try:
                self.step()
            except MVCError as exc:
                log_event(log, "tick_failed", f"tick failed: {exc}", level=logging.ERROR)
            except Exception:  # a bug: logged with its traceback, counted, and the clock goes on
                log.exception("ticker clock error")
                self._loop_errors.inc()
            current = self.server.snapshot()["values"]["interval"]
            if current != interval:  # re-anchor so the new interval counts from this tick
                interval, anchor = current, due


class TickerService(ModelService):
    """The ticker model served like any model, with its clock running while it serves."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, seed: int | None = None) -> None:
        super().__init__(settings, TickerModel, settings.ticker_name, metrics)
        self.ticker = Ticker(self.server, seed=seed, metrics=self.metrics)
        self.election: Election | None = None
        if is_etcd(settings.store):  # cluster mode: every replica serves the model, one ticks
            from .election import Election

            self.election = Election(self.store, self.store.key(settings.ticker_name, "leader"),  # type: ignore[attr-defined, arg-type]
                                     settings.replica_name(), self.metrics, on_change=self._elected)
            self.ticker.active = lambda: self.election is not None and self.election.leading
            self.server.pipeline.fence = self.election.fence  # type: ignore[attr-defined]
            self.on_stop(self.election.stop, early=True)
        self.on_stop(self.ticker.stop, early=True)

    def _elected(self, leading: bool) -> None:
        """The first leader of a new ticker model sets its interval from the settings."""
        snap = self.server.snapshot()
        if leading and snap["revision"] == 0 and snap["values"]["interval"] != self.settings.ticker_interval:
            try:
                self.server.modify_local({"interval": self.settings.ticker_interval}, "ticker", expected_revision=0)
            except MVCError as exc:
                log_event(log, "tick_failed", f"could not set the interval: {exc}", level=logging.WARNING)

    def start(self) -> TickerService:
        """Serve the ticker model and start its clock (in cluster mode, its election); returns self."""
        super().start()
        if self.election is not None:
            self.election.start()
        elif self.server.revision == 0 and self.server.query()["interval"] != self.settings.ticker_interval:
            self.server.modify_local({"interval": self.settings.ticker_interval}, "ticker")
        self.ticker.start()
        return self
