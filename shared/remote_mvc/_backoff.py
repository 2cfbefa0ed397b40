"""Exponential backoff with full jitter, for every retry and reconnect loop.

A few lines of our own rather than tenacity or backoff: the loops that need it are
long-running keeper threads that wait on an ``Event`` (so ``stop()`` wakes them at
once) and decide per round what to do next; neither library's decorator or
iterator fits them without more wrapping code than this class. They only need
the next delay.

Full jitter (``delay = uniform(0, min(cap, base * 2**attempt))``, "Exponential
Backoff And Jitter", AWS Architecture Blog, 2015): clients that failed together
(hundreds of viewers when their model server restarts) spread their next tries
over the whole window instead of coming back in lock step.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]

_shared = random.Random()  # not the module-level generator: the library leaves process state alone


class Backoff:
    """Delays for consecutive failures: ``next()`` after each, ``reset()`` after a success."""

    def __init__(self, base: float = 0.05, cap: float = 5.0, rng: random.Random | None = None) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"need 0 < base <= cap, got base={base} cap={cap}")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or _shared

    def ceiling(self) -> float:
        """The upper end of the window the next delay is drawn from."""
        return min(self.cap, self.base * 2 ** min(self.attempt, 62))

    def next(self) -> float:
        """The delay before the next try: uniform over [0, ceiling]; the window doubles up to ``cap``."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
