"""The Pyro5 daemons remote-mvc runs: tracked connections, authenticated handshakes.

Pyro5's thread server stops accepting on shutdown but leaves established
connections to their worker threads; a stopped service must not keep answering
old clients, so :meth:`TrackedDaemonMixin.close_connections` shuts them down.
:class:`AuthMixin` authenticates each connection in the handshake and pins the
identity and role on it (see :mod:`remote_mvc.auth`).
"""

from __future__ import annotations

import json
import logging
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any

import Pyro5.api
import Pyro5.errors
import Pyro5.nameserver
from Pyro5 import protocol
from Pyro5.serializers import serializers

from .auth import address_of
from .errors import AuthenticationError
from .logs import log_event


class TrackedDaemonMixin:
    """Remember each connection from its handshake until it disconnects.

    A connection must complete its handshake within ``handshake_timeout``
    seconds (one that opens and never speaks is closed); after it, a connection
    idle for ``idle_timeout`` seconds is closed (None: never).
    """

    handshake_timeout: float | None = 10.0
    idle_timeout: float | None = None

    def _handshake(self, conn: Any, denied_reason: str | None = None) -> bool:
        conn.sock.settimeout(self.handshake_timeout)
        ok = super()._handshake(conn, denied_reason)
        if ok:
            conn.sock.settimeout(self.idle_timeout)
        return ok

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


class AuthMixin(TrackedDaemonMixin):
    """Authenticate each connection in Pyro5's handshake (once ``authenticator`` is set)."""

    authenticator: Any = None
    on_refused: Callable[[str, str, bool], None] | None = None

    def validateHandshake(self, conn: Any, data: Any) -> Any:  # noqa: N802 - Pyro5's name
        if self.authenticator is None:
            return super().validateHandshake(conn, data)
        try:
            identity, role = self.authenticator.authenticate(data, certificate_name(conn))
        except AuthenticationError as exc:
            address = address_of(conn)
            delay = self.authenticator.throttle.failed(address)
            if self.on_refused is not None:
                self.on_refused(address, str(exc), delay > 0)
            if delay:
                time.sleep(delay)  # tarpit: only this connection's worker waits
            raise
        conn.mvc_identity, conn.mvc_role = identity, role
        super().validateHandshake(conn, data)
        return {"identity": identity, "role": role}


def certificate_name(conn: Any) -> str | None:
    """The common name of the peer's TLS certificate, or None without TLS."""
    try:
        cert = conn.getpeercert()
    except (AttributeError, ValueError, OSError):
        return None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class TrackedDaemon(TrackedDaemonMixin, Pyro5.api.Daemon):
    """A plain daemon whose connections close when it stops."""


_JSON_ID = serializers["json"].serializer_id
_HEADER_SIZE = protocol._header_size
_READ_SIZE = 65536  # larger reads cost more than they save: recv allocates the whole size first
_log = logging.getLogger("remote_mvc.viewer")


class ViewerDaemon(TrackedDaemon):
    """The daemon of viewer hosts: the model server's ``notify`` calls take a short path.

    A viewer host spends most of its time answering ``notify`` calls, and the
    benchmark's profile showed a third of each one going to Pyro5's generic
    dispatch (a correlation UUID, ``getpeername``, the call context, the result
    serialized). A call that is exactly what the model server's sender makes (an
    invoke in JSON, no annotations, ``notify(<one JSON object>)`` to an object
    that declares ``_mvc_notify``) is handed to the object directly. Anything
    else is replayed to Pyro5's own ``handleRequest`` unchanged.

    Such calls may be oneway: they run here, in order, on the connection's
    thread (Pyro5 would start a thread per oneway call, and so reorder them).
    A handler that raises in a oneway call is counted, and the next two-way
    call on the connection answers with that count (otherwise ``0``), which the
    server adds to its failure metric.
    """

    def handleRequest(self, conn: Any) -> None:  # noqa: N802 - Pyro5's name
        """Read what the connection has in one ``recv`` and handle every whole message in it
        (Pyro5 reads a message in three), keeping the rest for the next call."""
        buffer = getattr(conn, "mvc_in", None)
        if buffer is None:
            buffer = conn.mvc_in = bytearray()
        try:
            chunk = conn.sock.recv(_READ_SIZE)
        except TimeoutError:  # socket.timeout
            raise Pyro5.errors.TimeoutError("receiving: timeout") from None
        except OSError as exc:
            raise Pyro5.errors.ConnectionClosedError(f"receiving: connection lost: {exc}") from None
        if not chunk:
            raise Pyro5.errors.ConnectionClosedError("receiving: connection lost")
        buffer += chunk
        while len(buffer) >= _HEADER_SIZE:
            protocol.ReceivingMessage.validate(bytes(buffer[:6]))
            msg = protocol.ReceivingMessage(bytes(buffer[:_HEADER_SIZE]))
            size = _HEADER_SIZE + msg.annotations_size + msg.data_size
            if len(buffer) < size:
                return
            message = bytes(buffer[:size])
            del buffer[:size]
            self._handle(conn, msg, message)

    def _handle(self, conn: Any, msg: protocol.ReceivingMessage, message: bytes) -> None:
        """One whole message: a notify call of the model server's shape, or Pyro5's business."""
        oneway = msg.flags == protocol.FLAGS_ONEWAY
        if (msg.type == protocol.MSG_INVOKE and msg.serializer_id == _JSON_ID and (oneway or not msg.flags)
                and not msg.annotations_size):
            try:
                call = json.loads(message[_HEADER_SIZE:])
                obj = self.objectsById.get(call["object"])
                params = call["params"]
                fast = (call["method"] == "notify" and getattr(obj, "_mvc_notify", False) and not call["kwargs"]
                        and len(params) == 1 and isinstance(params[0], dict))
            except (ValueError, KeyError, TypeError, AttributeError):
                fast = False
            if fast:
                self._notify(conn, obj, params[0], msg.seq, oneway)
                return
        super().handleRequest(_Replayed(conn, message))

    def _notify(self, conn: Any, obj: Any, batch: dict, seq: int, oneway: bool) -> None:
        try:
            obj.notify(batch)
        except Exception as exc:  # noqa: BLE001 - reported to the caller, as Pyro5 does
            if oneway:
                conn.mvc_failed = getattr(conn, "mvc_failed", 0) + 1
                log_event(_log, "notify_error", f"viewer handler raised: {exc!r}", level=logging.WARNING,
                          viewer_id=getattr(obj, "viewer_id", None), revision=getattr(obj, "revision", None))
                return
            self._sendExceptionResponse(conn, seq, _JSON_ID, exc, Pyro5.errors.format_traceback(detailed=False))
            return
        if not oneway:
            failed, conn.mvc_failed = getattr(conn, "mvc_failed", 0), 0
            answer = b"0" if not failed else str(failed).encode()
            conn.send(protocol.SendingMessage(protocol.MSG_RESULT, 0, seq, _JSON_ID, answer).data)


class _Replayed:
    """A connection whose next reads return bytes already read from it, then read on."""

    def __init__(self, conn: Any, data: bytes) -> None:
        self._conn = conn
        self._data = data

    def recv(self, size: int) -> bytes:
        if not self._data:
            return self._conn.recv(size)
        chunk, self._data = self._data[:size], self._data[size:]
        return chunk if len(chunk) == size else chunk + self._conn.recv(size - len(chunk))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class AuthDaemon(AuthMixin, Pyro5.api.Daemon):
    """The daemon of model servers: authenticated connections."""


class AuthNameServerDaemon(AuthMixin, Pyro5.nameserver.NameServerDaemon):
    """Pyro5's name server daemon with authenticated connections."""
