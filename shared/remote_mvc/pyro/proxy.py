"""Pyro5 proxies: the authenticating proxy every client uses, and the fan-out's viewer connections.

:class:`AuthProxy` sends a fresh credentials token (``auth.client_token``) in
every handshake and turns Pyro5's "connection rejected" into
``AuthenticationError`` (a refusal on the wire stays a CommunicationError).

The fan-out's connection and Pyro5's handshake are made by a plain Pyro5 proxy (JSON
serializer, the call timeout), blocking, in the fan-out's connector pool; the
fan-out's loop thread then owns the connection's socket (non-blocking) and
speaks the notify protocol on it (:mod:`.notify`).
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from typing import Any

import Pyro5.api
from Pyro5.api import Proxy
from Pyro5.errors import CommunicationError, PyroError
from Pyro5.errors import TimeoutError as PyroTimeout

from ..auth import client_token
from ..errors import AuthenticationError
from .wire import WIRE_REFUSAL

__all__ = ["AuthProxy", "ViewerConnection", "ConnectFailed", "connect_viewer"]


def _auth_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn Pyro5's 'connection rejected' into AuthenticationError."""
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except CommunicationError as exc:
            reason = str(exc).split(" rejected: ", 1)[1] if " rejected: " in str(exc) else None
            if reason is not None and not reason.startswith(WIRE_REFUSAL):
                raise AuthenticationError(reason) from None
            raise
    return wrapper


class AuthProxy(Pyro5.api.Proxy):
    """A Pyro5 proxy that sends a fresh credentials token in every handshake."""

    def __init__(self, uri: Any, identity: str = "", secret: str = "", timeout: float | None = None) -> None:
        object.__setattr__(self, "_mvc_credentials", (identity, secret))
        super().__init__(uri)
        if timeout:
            self._pyroTimeout = timeout

    @property
    def uri(self) -> Any:
        """The URI this proxy connects to (Pyro5's ``URI``: ``.object``, ``.host``, ``.port``)."""
        return self._pyroUri

    @property
    def socket(self) -> Any:
        """The connected socket (an ``ssl.SSLSocket`` over TLS); None while not connected."""
        connection = self._pyroConnection  # noqa: SLF001 - Pyro5 internal (this package owns them)
        return None if connection is None else connection.sock

    def metadata(self) -> dict[str, set[str]]:
        """What the remote object's daemon tells proxies at connect: its ``methods``, ``oneway``
        methods and ``attrs`` (connects first when not connected)."""
        if self._pyroConnection is None:  # noqa: SLF001
            self._pyroBind()
        return {"methods": set(self._pyroMethods), "oneway": set(self._pyroOneway),  # noqa: SLF001
                "attrs": set(self._pyroAttrs)}  # noqa: SLF001

    @property
    def _pyroHandshake(self) -> Any:  # noqa: N802 - Pyro5's name
        identity, secret = self._mvc_credentials
        return client_token(identity, secret, self._pyroUri.object) if identity and secret else "hello"

    @_pyroHandshake.setter
    def _pyroHandshake(self, value: Any) -> None:  # noqa: N802
        pass  # the token is made fresh at each connect

    _pyroInvoke = _auth_errors(Pyro5.api.Proxy._pyroInvoke)  # noqa: SLF001, N815 - Pyro5's names
    _pyroBind = _auth_errors(Pyro5.api.Proxy._pyroBind)  # noqa: N815
    _pyroGetMetadata = _auth_errors(Pyro5.api.Proxy._pyroGetMetadata)  # noqa: SLF001, N815


class ConnectFailed(Exception):
    """A viewer could not be connected to; ``reason`` is the drop reason ("timeout", "unreachable")."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ViewerConnection:
    """A connected viewer: the socket the loop speaks on, and the object id its calls name."""

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self.sock: socket.socket = proxy._pyroConnection.sock  # noqa: SLF001 - Pyro5 internal (this package owns them)
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
