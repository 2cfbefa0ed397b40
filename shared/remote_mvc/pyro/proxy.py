"""The fan-out's connection to a viewer: made by a Pyro5 proxy, then its socket handed over.

The connection and Pyro5's handshake are made by a plain Pyro5 proxy (JSON
serializer, the call timeout), blocking, in the fan-out's connector pool; the
fan-out's loop thread then owns the connection's socket (non-blocking) and
speaks the notify protocol on it (:mod:`.notify`).
"""

from __future__ import annotations

import socket

from Pyro5.api import Proxy
from Pyro5.errors import CommunicationError, PyroError
from Pyro5.errors import TimeoutError as PyroTimeout

__all__ = ["ViewerConnection", "ConnectFailed", "connect_viewer"]


class ConnectFailed(Exception):
    """A viewer could not be connected to; ``reason`` is the drop reason ("timeout", "unreachable")."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ViewerConnection:
    """A connected viewer: the socket the loop speaks on, and the object id its calls name."""

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self.sock: socket.socket = proxy._pyroConnection.sock
        self.object_id: str = proxy._pyroUri.object

    def claim(self) -> None:
        """The calling thread (the loop) owns the connection from now on (Pyro5 checks proxy ownership)."""
        self._proxy._pyroClaimOwnership()

    def close(self) -> None:
        """Release the proxy, closing the socket."""
        self._proxy._pyroRelease()


def connect_viewer(uri: str, timeout: float) -> ViewerConnection:
    """Connect and shake hands (blocking); the socket comes back non-blocking. ConnectFailed if not."""
    proxy = Proxy(uri)
    proxy._pyroTimeout = timeout
    proxy._pyroSerializer = "json"
    try:
        proxy._pyroBind()
        conn = ViewerConnection(proxy)
        conn.sock.setblocking(False)
    except (CommunicationError, PyroError, OSError) as exc:
        proxy._pyroRelease()
        raise ConnectFailed("timeout" if isinstance(exc, PyroTimeout) else "unreachable",
                            f"{type(exc).__name__}: {exc}") from exc
    return conn
