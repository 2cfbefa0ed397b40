"""The Pyro5 daemons remote-mvc runs: a guarded wire, tracked connections, authenticated handshakes.

Every daemon here is a :class:`GuardedDaemonMixin` daemon:

* **The wire is checked before it is parsed** (:mod:`remote_mvc.pyro.wire`): the
  handshake is read and decoded here, not by Pyro5, and only after its header
  passed (connect message, serpent/JSON, no flags, at most ``limits.handshake``
  bytes); every later message's header is checked the same way before its
  payload is read (no keep-serialized blobs, compression, batches, or oneway
  calls; a size bound by what the peer proved). A refusal closes the connection
  and is reported through ``on_refused`` (audited by the service).
* **TLS handshakes run in the connection's worker, with a timeout**: Pyro5's
  listening socket would otherwise complete each TLS handshake inside its accept
  loop, where one silent TCP connection stops every other client from
  connecting.
* **Bounded connections**: a connection must finish its handshake within
  ``handshake_timeout``; then it may idle ``idle_timeout`` seconds (anonymous
  ones ``anonymous_idle_timeout``); one address holds at most
  ``max_connections_per_address`` connections (each holds a worker thread).
* **A small daemon object**: Pyro5's ``Pyro.Daemon`` object answers only
  ``get_metadata`` and ``ping`` (not ``registered``, ``info`` or streams).

:class:`AuthMixin` authenticates each connection in the handshake and pins the
identity and role on it (see :mod:`remote_mvc.auth`). A stopped service must not
keep answering old clients, so :meth:`GuardedDaemonMixin.close_connections`
shuts established connections down.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import select
import socket
import ssl
import threading
import uuid
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import Pyro5.api
import Pyro5.core
import Pyro5.errors
import Pyro5.nameserver
import Pyro5.server
from Pyro5 import config as pyro_config
from Pyro5 import protocol
from Pyro5 import serializers as pyro_serializers
from Pyro5.callcontext import current_context

from ..auth import ANONYMOUS, address_of, host_of
from ..errors import AuthenticationError
from ..logs import log_event
from . import notify
from .wire import (
    ALLOWED_SERIALIZERS,
    HEADER_SIZE,
    WIRE_REFUSAL,
    Limits,
    WireRefused,
    check,
    parse_header,
    read_exactly,
    read_header,
)

__all__ = [
    "Refusal", "GuardedDaemonMixin", "AuthMixin", "TrackedDaemon", "ViewerDaemon",
    "AuthDaemon", "AuthNameServerDaemon", "certificate_name", "make_viewer_daemon",
]

_log = logging.getLogger("remote_mvc.wire")
_JSON_ID = pyro_serializers.serializers["json"].serializer_id
_CONNECT = frozenset({protocol.MSG_CONNECT})
_CALLS = frozenset({protocol.MSG_INVOKE, protocol.MSG_PING})


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A connection or message refused by a daemon: what the audit log records of it."""

    address: str
    stage: str  # "tls", "handshake", "call", "connections"
    reason: str
    claimed: str | None = None  # the identity a refused handshake claimed, if any
    throttled: bool = False


class _SmallDaemonObject(Pyro5.server.DaemonObject):
    """Pyro5's per-daemon object, answering only what proxies need: metadata at bind, and ping."""

    def get_metadata(self, objectId: str) -> dict:  # noqa: N803 - Pyro5's signature
        if not isinstance(objectId, str):
            raise Pyro5.errors.DaemonError("unknown object")
        return super().get_metadata(objectId)

    def ping(self) -> None:
        pass


# Pyro5's DaemonObject is @expose'd as a class: shut every other member off
for _name in ("registered", "info", "get_next_stream_item", "close_stream"):
    setattr(_SmallDaemonObject, _name, None)


if TYPE_CHECKING:  # the mixins below are only ever mixed into Pyro5 daemons
    from Pyro5.server import Daemon as _DaemonBase
else:
    _DaemonBase = object


class GuardedDaemonMixin(_DaemonBase):
    """The wire checks, TLS-in-the-worker, connection bounds and tracking (see the module doc)."""

    handshake_timeout: float | None = 10.0
    idle_timeout: float | None = None
    anonymous_idle_timeout: float | None = None  # None: idle_timeout
    max_connections_per_address: int = 256
    limits: Limits = Limits()
    on_refused: Callable[[Refusal], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.objectsById[Pyro5.core.DAEMON_NAME] = _small = _SmallDaemonObject(self)
        _small._pyroId = Pyro5.core.DAEMON_NAME  # noqa: SLF001 - Pyro5 internal (this package owns them)
        listener = getattr(self.transportServer, "sock", None)
        if isinstance(listener, ssl.SSLSocket):
            listener.do_handshake_on_connect = False  # type: ignore[attr-defined] # accepted sockets shake hands in their worker
        self._per_address: collections.Counter[str] = collections.Counter()
        self._per_address_lock = threading.Lock()

    # refusals --------------------------------------------------------------------
    def refuse(self, refusal: Refusal) -> None:
        """Report a refusal (the service counts, logs and audits it)."""
        if self.on_refused is not None:
            self.on_refused(refusal)
        else:
            log_event(_log, "refused", f"refused: {refusal.reason}", level=logging.WARNING,
                      client=refusal.address, stage=refusal.stage, claimed=refusal.claimed)

    # connections -----------------------------------------------------------------
    def _admit(self, conn: Any) -> bool:
        host = host_of(address_of(conn))
        with self._per_address_lock:
            if self._per_address[host] >= self.max_connections_per_address:
                return False
            self._per_address[host] += 1
        conn.mvc_admitted = host
        return True

    def _release(self, conn: Any) -> None:
        host = getattr(conn, "mvc_admitted", None)
        if host is None:
            return
        conn.mvc_admitted = None
        with self._per_address_lock:
            self._per_address[host] -= 1
            if self._per_address[host] <= 0:
                del self._per_address[host]

    def connections_from(self, host: str) -> int:
        """Connections currently held by one address (tests, metrics)."""
        with self._per_address_lock:
            return self._per_address.get(host, 0)

    def _tracked(self) -> weakref.WeakSet:
        conns = self.__dict__.get("_mvc_conns")
        if conns is None:
            conns = self.__dict__["_mvc_conns"] = weakref.WeakSet()
        return conns

    def clientDisconnect(self, conn: Any) -> None:  # noqa: N802 - Pyro5's name
        """Pyro5's hook: the connection closed; it is no longer tracked."""
        self._tracked().discard(conn)
        self._release(conn)
        super().clientDisconnect(conn)

    def close_connections(self) -> None:
        """Shut every established connection down (a stopped service answers nobody)."""
        for conn in list(self._tracked()):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                pass

    # the handshake ---------------------------------------------------------------
    def _handshake(self, conn: Any, denied_reason: str | None = None) -> bool:
        """Pyro5's connect handshake, read and decoded here within the pre-authentication bounds."""
        conn.sock.settimeout(self.handshake_timeout)
        address = address_of(conn)
        if denied_reason:  # Pyro5: no free worker
            self.refuse(Refusal(address, "connections", denied_reason))
            return False
        if isinstance(conn.sock, ssl.SSLSocket):
            try:
                conn.sock.do_handshake()
            except (OSError, ValueError) as exc:  # ssl.SSLError, a timeout, a reset
                self.refuse(Refusal(address, "tls", f"TLS handshake failed: {exc}"))
                return False
        if not self._admit(conn):
            self.refuse(Refusal(address, "connections", f"more than {self.max_connections_per_address} "
                                                        "connections from one address"))
            return False
        ok = False
        try:
            ok = self._connect(conn, address)
        finally:
            if not ok:
                self._release(conn)
        if ok:
            self._tracked().add(conn)
            anonymous = getattr(conn, "mvc_identity", ANONYMOUS) == ANONYMOUS
            idle = self.anonymous_idle_timeout if anonymous and self.anonymous_idle_timeout else self.idle_timeout
            conn.sock.settimeout(idle)
        return ok

    def _connect(self, conn: Any, address: str) -> bool:
        seq, serializer_id = 0, _JSON_ID
        try:
            try:
                raw, header = read_header(conn)
            except Pyro5.errors.TimeoutError:
                raise WireRefused("handshake timeout: nothing received in time") from None
            except Pyro5.errors.ProtocolError:
                raise WireRefused("not a Pyro5 message") from None
            seq = header.seq
            check(header, types=_CONNECT, limit=self.limits.handshake, limits=self.limits)
            serializer_id = header.serializer_id
            msg = protocol.ReceivingMessage(raw)
            msg.add_payload(read_exactly(conn, header.size))
            serializer = pyro_serializers.serializers_by_id[serializer_id]
            data = serializer.loads(msg.data)
            if not isinstance(data, dict) or not isinstance(data.get("object"), str):
                raise WireRefused("malformed handshake")
            current_context.correlation_id = uuid.uuid4()
            conn.mvc_target = data["object"]
            response = {
                "handshake": self.validateHandshake(conn, data.get("handshake")),
                "meta": self.objectsById[Pyro5.core.DAEMON_NAME].get_metadata(data["object"]),
            }
            reply, msgtype = serializer.dumps(response), protocol.MSG_CONNECTOK
        except (Pyro5.errors.ConnectionClosedError, Pyro5.errors.TimeoutError, OSError):
            return False
        except WireRefused as exc:
            self.refuse(Refusal(address, "handshake", str(exc)))
            if serializer_id not in ALLOWED_SERIALIZERS:
                serializer_id = _JSON_ID
            reply = pyro_serializers.serializers_by_id[serializer_id].dumps(f"{WIRE_REFUSAL}{exc}")
            msgtype = protocol.MSG_CONNECTFAIL
        except Exception as exc:  # noqa: BLE001 - a refusal (credentials) or a malformed handshake
            reply = pyro_serializers.serializers_by_id[serializer_id].dumps(str(exc))
            msgtype = protocol.MSG_CONNECTFAIL
        try:
            conn.send(protocol.SendingMessage(msgtype, 0, seq, serializer_id, reply).data)
        except (Pyro5.errors.ConnectionClosedError, OSError):
            return False
        return msgtype == protocol.MSG_CONNECTOK

    # calls -------------------------------------------------------------------------
    def call_limit(self, conn: Any) -> int:
        """How large a call this connection may send."""
        anonymous = getattr(conn, "mvc_identity", ANONYMOUS) == ANONYMOUS
        return self.limits.anonymous if anonymous else self.limits.authenticated

    def handleRequest(self, conn: Any) -> None:  # noqa: N802 - Pyro5's name
        """Check the next message's header, then let Pyro5 handle it."""
        raw, header = read_header(conn)
        try:
            check(header, types=_CALLS, limit=self.call_limit(conn), limits=self.limits)
        except WireRefused as exc:
            if not self._refuse_call(conn, header, exc):
                raise
            return  # the caller was told, the connection is in step: it may go on
        super().handleRequest(_Replayed(conn, raw + read_exactly(conn, header.size)))

    def _refuse_call(self, conn: Any, header: Any, exc: WireRefused, drain: bool = True) -> bool:
        """Report a refused call and tell the caller why; True when the connection may go on.

        Its payload is never decoded. An authenticated caller's call that is only too large is
        read and dropped (at most Pyro5's own bound), answered, and the connection goes on; any
        other refusal closes the connection (the caller is told why when it waits for an answer).
        """
        identity = getattr(conn, "mvc_identity", ANONYMOUS)
        self.refuse(Refusal(address_of(conn), "call", str(exc), identity))
        if header.serializer_id not in ALLOWED_SERIALIZERS or header.flags & protocol.FLAGS_ONEWAY:
            return False
        keep = (drain and identity != ANONYMOUS and header.size <= _DRAIN_MAX and header.type in _CALLS
                and not header.flags & ~(protocol.FLAGS_CORR_ID))
        try:
            if keep:
                for done in range(0, header.size, _READ_SIZE):
                    read_exactly(conn, min(_READ_SIZE, header.size - done))
            self._sendExceptionResponse(conn, header.seq, header.serializer_id,
                                        Pyro5.errors.SecurityError(str(exc)), None)
        except (Pyro5.errors.CommunicationError, OSError):
            return False
        return keep


_DRAIN_MAX = 16 * 1024 * 1024  # Pyro5's own message bound (clients check it before sending)
_READ_SIZE = 65536  # larger reads cost more than they save: recv allocates the whole size first


class AuthMixin(GuardedDaemonMixin):
    """Authenticate each connection in Pyro5's handshake (once ``authenticator`` is set)."""

    authenticator: Any = None

    def validateHandshake(self, conn: Any, data: Any) -> Any:  # noqa: N802 - Pyro5's name
        """Pyro5's hook: authenticate the handshake's token and pin the identity on the connection."""
        if self.authenticator is None:
            return super().validateHandshake(conn, data)
        try:
            identity, role = self.authenticator.authenticate(data, certificate_name(conn),
                                                             target=getattr(conn, "mvc_target", None))
        except AuthenticationError as exc:
            address = address_of(conn)
            delay = self.authenticator.throttle.failed(address)
            self.refuse(Refusal(address, "handshake", str(exc), _claimed(data), delay > 0))
            if delay:
                _tarpit(conn, delay)
            raise
        conn.mvc_identity, conn.mvc_role = identity, role
        super().validateHandshake(conn, data)
        return {"identity": identity, "role": role}


def _claimed(token: Any) -> str | None:
    """The identity a handshake token claims (bounded, for the audit log)."""
    name = token.get("identity") if isinstance(token, dict) else None
    return name[:64] if isinstance(name, str) else None


def _tarpit(conn: Any, delay: float) -> None:
    """Delay a refusal by up to ``delay`` seconds, but not past the moment the peer leaves or speaks
    again: a peer that closed does not hold the worker."""
    try:
        select.select([conn.sock], [], [], delay)
    except (OSError, ValueError):
        pass


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


class TrackedDaemon(GuardedDaemonMixin, Pyro5.api.Daemon):
    """A plain daemon with the guarded wire, whose connections close when it stops."""


_vlog = logging.getLogger("remote_mvc.viewer")


class ViewerDaemon(TrackedDaemon):
    """The daemon of viewer hosts: the model server's ``notify`` calls take a short path.

    A viewer host spends most of its time answering ``notify`` calls, and the
    benchmark's profile showed a third of each one going to Pyro5's generic
    dispatch (a correlation UUID, ``getpeername``, the call context, the result
    serialized). A call that is exactly what the model server's sender makes (an
    invoke in JSON, no annotations, ``notify(<one JSON object>)`` to an object
    that declares :data:`~remote_mvc.pyro.notify.NOTIFY_MARKER`) is handed to the object directly. Anything
    else is replayed to Pyro5's own ``handleRequest``, within the anonymous size
    bound and never oneway.

    Such calls may be oneway: they run here, in order, on the connection's
    thread (Pyro5 would start a thread per oneway call, and so reorder them).
    A handler that raises in a oneway call is counted, and the next two-way
    call on the connection answers with that count (otherwise ``0``), which the
    server adds to its failure metric.

    A connection is *proven* once a notify on it was accepted by its viewer (the
    viewer checks the subscription's capability): until then its messages are
    bounded by ``limits.authenticated`` and it may idle ``idle_timeout``; after,
    messages may be as large as ``proven_limit`` and it may idle indefinitely
    (the model server's connection is quiet while the model is).
    """

    proven_limit = 16 * 1024 * 1024

    def call_limit(self, conn: Any) -> int:
        """A message's size bound on ``conn``: larger once a notify on it was accepted."""
        return self.proven_limit if getattr(conn, "mvc_proven", False) else self.limits.authenticated

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
        while len(buffer) >= HEADER_SIZE:
            header = parse_header(bytes(buffer[:HEADER_SIZE]))
            try:
                check(header, types=_CALLS, limit=self.call_limit(conn), limits=self.limits, oneway=True)
            except WireRefused as exc:
                self._refuse_call(conn, header, exc, drain=False)
                raise
            size = HEADER_SIZE + header.size
            if len(buffer) < size:
                return
            message = bytes(buffer[:size])
            del buffer[:size]
            self._handle(conn, header, message)

    def _handle(self, conn: Any, header: Any, message: bytes) -> None:
        """One whole message: a notify call of the model server's shape, or Pyro5's business."""
        oneway = notify.is_oneway(header)
        fast = notify.parse_call(header, message, self.objectsById)
        if fast is not None:
            self._notify(conn, fast[0], fast[1], header.seq, oneway)
            return
        if oneway or len(message) - HEADER_SIZE > self.limits.anonymous:
            exc = WireRefused("only notify calls may be oneway or large here")
            self._refuse_call(conn, header, exc)
            raise exc
        super(GuardedDaemonMixin, self).handleRequest(_Replayed(conn, message))

    def _notify(self, conn: Any, obj: Any, batch: dict, seq: int, oneway: bool) -> None:
        try:
            obj.notify(batch)
        except Exception as exc:  # noqa: BLE001 - reported to the caller, as Pyro5 does
            if oneway:
                notify.record_oneway_failure(conn)
                log_event(_vlog, "notify_error", f"viewer handler raised: {exc!r}", level=logging.WARNING,
                          viewer_id=getattr(obj, "viewer_id", None), revision=getattr(obj, "revision", None))
                return
            self._sendExceptionResponse(conn, seq, notify.JSON_ID, exc, Pyro5.errors.format_traceback(detailed=False))
            return
        if not getattr(conn, "mvc_proven", False):
            conn.mvc_proven = True
            conn.sock.settimeout(None)
        if not oneway:
            conn.send(notify.answer(conn, seq))


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


_servertype_lock = threading.Lock()


def make_viewer_daemon(servertype: str, **kwargs: Any) -> ViewerDaemon:
    """A :class:`ViewerDaemon` on Pyro5's ``servertype`` ("thread" or "multiplex").

    Pyro5 reads the server type from its process-wide configuration in the
    daemon's constructor only; it is set for that moment and put back.
    """
    with _servertype_lock:
        saved, pyro_config.SERVERTYPE = pyro_config.SERVERTYPE, servertype
        try:
            return ViewerDaemon(**kwargs)
        finally:
            pyro_config.SERVERTYPE = saved
