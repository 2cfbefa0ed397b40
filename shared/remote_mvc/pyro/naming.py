"""Finding the name server: always at the configured host and port, never by broadcast."""

from __future__ import annotations

import Pyro5.core

from ..config import Settings
from .proxy import AuthProxy

__all__ = ["locate_ns", "ns_uri"]


def ns_uri(settings: Settings) -> str:
    """The name server's URI at the configured host and port."""
    return f"PYRO:{Pyro5.core.NAMESERVER_NAME}@{settings.ns_host}:{settings.ns_port}"


def locate_ns(settings: Settings, timeout: float | None = None, identity: str = "",
              secret: str = "") -> AuthProxy:
    """A proxy to the name server at the configured host and port (never a broadcast).

    With an identity, the proxy authenticates (needed to register with a
    protected name server); lookups need none.
    """
    return AuthProxy(ns_uri(settings), identity, secret, timeout=timeout or settings.call_timeout)
