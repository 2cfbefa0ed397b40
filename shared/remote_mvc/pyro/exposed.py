"""What Pyro5 itself exposes of a class (its own view, so a declared surface can be checked against it)."""

from __future__ import annotations

from typing import Any

from Pyro5.server import _get_exposed_members

__all__ = ["exposed_members"]


def exposed_members(cls: type) -> dict[str, Any]:
    """Pyro5's exposed ``methods``, ``oneway`` methods and ``attrs`` of ``cls``."""
    return _get_exposed_members(cls)
