"""Pyro5 daemons that know their client connections, so stopping closes them.

Pyro5's thread server stops accepting on shutdown but leaves established
connections to their worker threads; a stopped service must not keep answering
old clients, so :meth:`close_connections` shuts every one of them down.
"""

from __future__ import annotations

import socket
import weakref
from typing import Any

import Pyro5.api
import Pyro5.nameserver


class TrackedDaemonMixin:
    """Remember each connection from its handshake until it disconnects."""

    def _tracked(self) -> weakref.WeakSet:
        conns = self.__dict__.get("_mvc_conns")
        if conns is None:
            conns = self.__dict__["_mvc_conns"] = weakref.WeakSet()
        return conns

    def validateHandshake(self, conn: Any, data: Any) -> Any:  # noqa: N802 - Pyro5's name
        result = super().validateHandshake(conn, data)
        self._tracked().add(conn)
        return result

    def clientDisconnect(self, conn: Any) -> None:  # noqa: N802
        self._tracked().discard(conn)
        super().clientDisconnect(conn)

    def close_connections(self) -> None:
        for conn in list(self._tracked()):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                pass


class TrackedDaemon(TrackedDaemonMixin, Pyro5.api.Daemon):
    pass


class TrackedNameServerDaemon(TrackedDaemonMixin, Pyro5.nameserver.NameServerDaemon):
    pass
