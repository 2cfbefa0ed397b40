"""Identities, roles and the connection handshake.

Each role is a set of permissions (:data:`ROLES`): ``viewer`` reads and
subscribes, ``controller`` also modifies, ``admin`` also drops viewers and
manages names, ``service`` reads and registers its own names with a protected
name server, ``gateway`` reads and may act on behalf of the people it serves
(``delegate``). A method is remote only when declared with :func:`remote`,
which names its permission and checks it before the method's body runs; a class
decorated with :func:`declared` gets the table of its remote methods as
``SURFACE`` (and fails at import if anything else of it is exposed). A client proves an identity when its connection
is made, in Pyro5's handshake: it sends ``{identity, ts, nonce, mac}`` where
``mac`` is an HMAC-SHA256 of identity, timestamp, a fresh nonce and the target
(the Pyro5 object id the connection is for, e.g. ``remote_mvc.model``) under one
of the identity's secrets. The server (:class:`AuthDaemon`) checks the MAC
against every secret the identity has (two allow rotation without downtime) and
the object the connection names, refuses stale timestamps and replayed nonces,
and pins identity and role on the connection, where :func:`require` finds them
through ``current_context``. A token seen by one service is useless at another:
it names its target. A
connection that presents no credentials gets the read-only ``viewer`` role;
one that presents wrong credentials is refused.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import json
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar, overload

from Pyro5.api import current_context, expose

from ._files import write_private
from .errors import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    HistoryCompacted,
    LimitExceeded,
    MVCError,
    PermissionDenied,
    PersistenceError,
    ServiceUnavailable,
    ValidationError,
)
from .pyro.exposed import exposed_members

__all__ = [
    "ROLES", "READ", "MODIFY", "DROP", "REGISTER", "Identity", "Credentials", "Authenticator", "Throttle",
    "client_credentials", "DELEGATE", "CAPABILITY", "Refusal", "remote", "declared", "surface",
    "mark_audited", "client_token", "require", "caller", "generate_credentials",
]

READ, MODIFY, DROP, REGISTER = "read", "modify", "drop", "register"
DELEGATE = "delegate"  # act on behalf of another identity (the web gateway's modify_for(identity, ...))
# Not a role's permission: the method checks a secret capability it was given (a viewer's notify
# carries its subscription's capability; see remote_mvc.viewer), so no role is checked.
CAPABILITY = "capability"
ROLES: dict[str, frozenset[str]] = {
    "viewer": frozenset({READ}),
    "controller": frozenset({READ, MODIFY}),
    "admin": frozenset({READ, MODIFY, DROP, REGISTER}),
    "service": frozenset({READ, REGISTER}),
    "gateway": frozenset({READ, DELEGATE}),
}
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Identity:
    """One identity of the credentials table: its name, role and secrets (two during a rotation)."""
    name: str
    role: str
    secrets: tuple[str, ...] = field(repr=False, default=())


class Credentials:
    """The table of identities a server accepts, or a client picks its secret from."""

    def __init__(self, identities: Iterable[Identity] = ()) -> None:
        self.by_name = {i.name: i for i in identities}
        for ident in self.by_name.values():
            if ident.role not in ROLES:
                raise ConfigError(f"identity {ident.name!r}: unknown role {ident.role!r} (roles: {', '.join(ROLES)})")

    def __len__(self) -> int:
        return len(self.by_name)

    def get(self, name: str) -> Identity | None:
        """The identity called ``name``, or None."""
        return self.by_name.get(name)

    def allows(self, permission: str) -> bool:
        """Whether any identity in the table holds ``permission``."""
        return any(permission in ROLES[i.role] for i in self.by_name.values())

    @classmethod
    def parse(cls, spec: str) -> Credentials:
        """Parse ``identity:role:secret[:secret2]`` entries separated by commas."""
        identities = []
        for entry in filter(None, (e.strip() for e in spec.split(","))):
            parts = entry.split(":")
            if len(parts) < 3 or not all(parts):
                raise ConfigError(f"bad credentials entry {parts[0]!r}: want identity:role:secret[:secret2]")
            identities.append(Identity(parts[0], parts[1], tuple(parts[2:])))
        return cls(identities)

    @classmethod
    def load(cls, path: str | Path) -> Credentials:
        """Read a credentials file written by :meth:`dump` (or :func:`generate_credentials`)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(Identity(name, v["role"], tuple(v["secrets"])) for name, v in data["identities"].items())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read credentials file {path}: {exc}") from exc

    @classmethod
    def from_settings(cls, settings: Any) -> Credentials:
        """Inline ``MVC_CREDENTIALS`` plus the credentials file, when there is one."""
        table = cls.parse(settings.credentials).by_name
        path = settings.credentials_path()
        if settings.credentials_file or path.exists():
            table = {**cls.load(path).by_name, **table}
        return cls(table.values())

    def dump(self, path: str | Path) -> None:
        """Write the table to ``path``, private (mode 0600) from its creation on."""
        data = {"identities": {i.name: {"role": i.role, "secrets": list(i.secrets)} for i in self.by_name.values()}}
        write_private(Path(path), (json.dumps(data, indent=2) + "\n").encode())


def generate_credentials(path: str | Path) -> Credentials:
    """Create a credentials file: controller, admin, service, viewer and gateway identities."""
    creds = Credentials(Identity(name, name, (secrets.token_hex(32),))
                        for name in ("controller", "admin", "service", "viewer", "gateway"))
    creds.dump(path)
    return creds


def _mac(secret: str, identity: str, ts: float, nonce: str, target: str) -> str:
    msg = f"{identity}|{ts!r}|{nonce}|{target}".encode("utf-8", "surrogatepass")
    return hmac.new(secret.encode("utf-8", "surrogatepass"), msg, hashlib.sha256).hexdigest()


def client_token(identity: str, secret: str, target: str, clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """A fresh handshake token proving ``identity`` to the object ``target`` (a new nonce every call)."""
    ts = clock()
    nonce = secrets.token_hex(16)
    return {"identity": identity, "ts": ts, "nonce": nonce, "mac": _mac(secret, identity, ts, nonce, target)}


class Authenticator:
    """Verify handshake tokens: known identity, valid MAC for this target, fresh time, unseen nonce.

    Nonces are remembered for twice the allowed skew, counted on the monotonic
    clock (so a wall clock stepped backwards cannot keep them forever), in
    arrival order, so forgetting is O(1) per handshake. At most ``max_nonces``
    are kept; when one must be forgotten early, tokens no newer than it are
    refused from then on (a forgotten nonce must never become replayable).
    """

    def __init__(self, credentials: Credentials, clock: Callable[[], float] = time.time,
                 max_skew: float = 60.0, monotonic: Callable[[], float] = time.monotonic,
                 max_nonces: int = 100_000) -> None:
        self.credentials = credentials
        self.clock = clock
        self.monotonic = monotonic
        self.max_skew = max_skew
        self.max_nonces = max_nonces
        self._seen: dict[str, float] = {}  # nonce -> its token's time
        self._arrivals: collections.deque[tuple[float, str]] = collections.deque()  # (monotonic, nonce)
        self._floor = -math.inf  # tokens at or before this time are refused (a nonce was forgotten early)
        self._lock = threading.Lock()
        self.throttle = Throttle(clock=monotonic)

    def authenticate(self, token: Any, certificate: str | None = None,
                     target: str | None = None) -> tuple[str, str]:
        """Return (identity, role); raise AuthenticationError when the token is bad.

        ``certificate`` is the common name of the peer's TLS certificate (already
        verified against the CA). A certificate naming a known identity proves
        that identity by itself; a token must then name the same identity.
        ``target`` is the object id the connection is for; the token's MAC must
        cover it.
        """
        cert_ident = self.credentials.get(certificate) if certificate else None
        if token is None or token == "hello" or token == {}:
            if cert_ident is not None:
                return cert_ident.name, cert_ident.role
            return ANONYMOUS, "viewer"
        if not isinstance(token, dict) or not {"identity", "ts", "nonce", "mac"} <= token.keys():
            raise AuthenticationError("malformed credentials")
        name, ts, nonce, mac = token["identity"], token["ts"], token["nonce"], token["mac"]
        if not all(isinstance(v, str) and len(v) <= 256 for v in (name, nonce, mac)) \
                or not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts):
            raise AuthenticationError("malformed credentials")
        ident = self.credentials.get(name)
        given = mac.encode("utf-8", "surrogatepass")  # bytes: compare_digest refuses non-ASCII str
        if ident is None or not isinstance(target, str) or not any(
                hmac.compare_digest(_mac(s, name, ts, nonce, target).encode(), given) for s in ident.secrets):
            raise AuthenticationError("invalid credentials")
        now = self.clock()
        if abs(now - ts) > self.max_skew:
            raise AuthenticationError("stale credentials (check the clocks)")
        if cert_ident is not None and cert_ident.name != ident.name:
            raise AuthenticationError(f"certificate is for {cert_ident.name!r}, not {ident.name!r}")
        with self._lock:
            self._forget(self.monotonic())
            if nonce in self._seen or ts <= self._floor:
                raise AuthenticationError("replayed credentials")
            self._seen[nonce] = ts
            self._arrivals.append((self.monotonic(), nonce))
        return ident.name, ident.role

    def _forget(self, now: float) -> None:
        """Drop nonces older than twice the skew window, and the oldest beyond ``max_nonces`` (lock held)."""
        arrivals, horizon = self._arrivals, now - 2 * self.max_skew
        while arrivals and (arrivals[0][0] < horizon or len(arrivals) >= self.max_nonces):
            at, nonce = arrivals.popleft()
            ts = self._seen.pop(nonce, -math.inf)
            if at >= horizon:  # forgotten while still replayable: refuse its time and older from now on
                self._floor = max(self._floor, ts)

    @property
    def remembered(self) -> int:
        """How many nonces are remembered (tests, metrics)."""
        return len(self._seen)


class Throttle:
    """Slow down repeated authentication failures from one address.

    After ``free`` failures within ``window`` seconds, each further refusal from
    that address is delayed (doubling, up to ``max_delay``). The delay holds only
    the offending connection's own worker, so other clients are not slowed.
    """

    def __init__(self, free: int = 5, window: float = 60.0, max_delay: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.window, self.max_delay, self.clock = free, window, max_delay, clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def failed(self, address: str) -> float:
        """Record a failure; return how long to delay the refusal (seconds)."""
        host = host_of(address)
        now = self.clock()
        with self._lock:
            recent = [t for t in self._failures.get(host, []) if now - t < self.window] + [now]
            self._failures[host] = recent[-100:]
            if len(self._failures) > 10000:
                self._failures = {h: ts for h, ts in self._failures.items() if now - ts[-1] < self.window}
        excess = len(recent) - self.free
        return 0.0 if excess <= 0 else min(self.max_delay, 0.05 * 2 ** min(excess, 10))


@overload
def host_of(address: str) -> str: ...


@overload
def host_of(address: None) -> None: ...


def host_of(address: str | None) -> str | None:
    """The host part of a ``host:port`` client address (None for in-process callers): what limits,
    throttles and ownership count by, since a peer picks its port freely."""
    return None if address is None else address.rsplit(":", 1)[0].strip("[]")


def address_of(conn: Any) -> str:
    try:
        host, port = conn.sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError, ValueError):
        return "?"


def caller() -> tuple[str, str, str | None]:
    """(identity, role, client address) of the remote call being served.

    In-process calls (no Pyro5 connection) are trusted as ``local``/``admin``.
    """
    conn = getattr(current_context, "client", None)
    if conn is None:
        return "local", "admin", None
    return getattr(conn, "mvc_identity", ANONYMOUS), getattr(conn, "mvc_role", "viewer"), address_of(conn)


def _denied(identity: str, role: str, permission: str) -> PermissionDenied:
    holders = ", ".join(r for r, perms in ROLES.items() if permission in perms)
    return PermissionDenied(f"{identity} ({role}) may not {permission}: needs one of the roles {holders}")


def require(permission: str) -> tuple[str, str, str | None]:
    """Raise PermissionDenied unless the caller's role holds ``permission``."""
    identity, role, address = caller()
    if permission not in ROLES.get(role, ()):
        raise _denied(identity, role, permission)
    return identity, role, address


# The declared remote surface ---------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    """A remote call refused: who (as claimed and proven), from where, which method, why."""

    method: str
    identity: str
    role: str
    address: str | None
    result: str  # forbidden, invalid, conflict, limit, refused
    error: str
    args: tuple = ()  # the call's arguments, untrusted (summarize before recording)
    kwargs: dict = field(default_factory=dict)


_audited = threading.local()


def mark_audited(exc: BaseException) -> None:
    """Tell :func:`remote` that the method recorded this refusal itself (with more detail)."""
    _audited.exc = exc


# answers and server-side failures (recorded where they happen), not refusals of the caller
_NOT_REFUSALS = (HistoryCompacted, PersistenceError, ServiceUnavailable)


def _result_of(exc: MVCError) -> str:
    if isinstance(exc, PermissionDenied):
        return "forbidden"
    if isinstance(exc, ValidationError):
        return "invalid"
    if isinstance(exc, ConflictError):
        return "conflict"
    if isinstance(exc, LimitExceeded):
        return "limit"
    return "refused"


def _report(obj: Any, refusal: Refusal) -> None:
    hook = getattr(obj, "on_refusal", None)
    if hook is not None:
        hook(refusal)


F = TypeVar("F", bound=Callable[..., Any])


def remote(permission: str) -> Callable[[F], F]:
    """Declare a method remote, with the permission its caller's role needs.

    The method is exposed to Pyro5 (and nothing else of its class is, see
    :func:`declared`); the permission is checked before its body runs, so no
    method can forget its check. Every refusal, the permission's or an
    :class:`~remote_mvc.errors.MVCError` the body raises (other than
    ``HistoryCompacted``, an answer, and ``PersistenceError``/``ServiceUnavailable``,
    the server's own failures, recorded where they happen), goes to the
    object's ``on_refusal(Refusal)`` hook, unless the body recorded it itself
    (:func:`mark_audited`). ``CAPABILITY`` checks no role: the body checks the
    capability it was handed.
    """
    if permission != CAPABILITY and not any(permission in perms for perms in ROLES.values()):
        raise ConfigError(f"unknown permission {permission!r}")

    def decorate(method: F) -> F:
        name = method.__name__

        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if permission != CAPABILITY:
                identity, role, address = caller()
                if permission not in ROLES.get(role, ()):
                    exc = _denied(identity, role, permission)
                    _report(self, Refusal(name, identity, role, address, "forbidden", str(exc), args, kwargs))
                    raise exc
            try:
                return method(self, *args, **kwargs)
            except MVCError as exc:
                if not isinstance(exc, _NOT_REFUSALS) and getattr(_audited, "exc", None) is not exc:
                    identity, role, address = caller()
                    _report(self, Refusal(name, identity, role, address, _result_of(exc), str(exc), args, kwargs))
                _audited.exc = None
                raise

        wrapper.mvc_permission = permission  # type: ignore[attr-defined]
        return expose(wrapper)
    return decorate


def surface(cls: type) -> dict[str, str]:
    """The remote methods of ``cls`` with their permissions (from :func:`remote`)."""
    table = {}
    for name in dir(cls):
        permission = getattr(getattr(cls, name, None), "mvc_permission", None)
        if permission is not None and not name.startswith("_"):
            table[name] = permission
    return table


C = TypeVar("C", bound=type)


def declared(cls: C) -> C:
    """Give ``cls`` its ``SURFACE`` table and check that it is all Pyro5 exposes of it: a
    class-level ``@expose`` (its own or a base class's) would make lifecycle methods and
    properties remote too; that fails here, at import, instead of on the network."""
    table = surface(cls)
    cls.SURFACE = MappingProxyType(table)  # type: ignore[attr-defined]
    exposed = exposed_members(cls)
    if set(exposed["methods"]) != set(table) or exposed["attrs"]:
        extra = sorted((set(exposed["methods"]) - set(table)) | set(exposed["attrs"]))
        raise TypeError(f"{cls.__name__} exposes {extra} without declaring them with remote()")
    return cls


def client_credentials(settings: Any, default_identity: str = "") -> tuple[str, str]:
    """(identity, secret) for a client: MVC_IDENTITY/MVC_SECRET or the credentials table."""
    identity = settings.identity or default_identity
    if not identity:
        return "", ""
    if settings.secret:
        return identity, settings.secret
    ident = Credentials.from_settings(settings).get(identity)
    if ident is None:
        if settings.identity:
            raise AuthenticationError(f"no secret for identity {identity!r} (set MVC_SECRET or the credentials)")
        return "", ""
    return identity, ident.secrets[0]
