"""Identities, roles and the connection handshake.

Each role is a set of permissions, checked per remote method (:data:`ROLES`):
``viewer`` reads and subscribes, ``controller`` also modifies, ``admin`` also
drops viewers and manages names, ``service`` reads and registers its own names
with a protected name server. A client proves an identity when its connection
is made, in Pyro5's handshake: it sends ``{identity, ts, nonce, mac}`` where
``mac`` is an HMAC-SHA256 of identity, timestamp and a fresh nonce under one of
the identity's secrets. The server (:class:`AuthDaemon`) checks the MAC against
every secret the identity has (two allow rotation without downtime), refuses
stale timestamps and replayed nonces, and pins identity and role on the
connection, where :func:`require` finds them through ``current_context``. A
connection that presents no credentials gets the read-only ``viewer`` role;
one that presents wrong credentials is refused.
"""

from __future__ import annotations

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
from typing import Any

import Pyro5.api
from Pyro5.api import current_context
from Pyro5.errors import CommunicationError

from .errors import AuthenticationError, ConfigError, PermissionDenied

__all__ = [
    "ROLES", "READ", "MODIFY", "DROP", "REGISTER", "DELEGATE", "Identity", "Credentials", "Authenticator", "Throttle",
    "AuthProxy", "client_credentials",
    "client_token", "require", "caller", "generate_credentials",
]

READ, MODIFY, DROP, REGISTER = "read", "modify", "drop", "register"
DELEGATE = "delegate"
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
        data = {"identities": {i.name: {"role": i.role, "secrets": list(i.secrets)} for i in self.by_name.values()}}
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        p.chmod(0o600)


def generate_credentials(path: str | Path) -> Credentials:
    """Create a credentials file: controller, admin, service, viewer and gateway identities."""
    creds = Credentials(Identity(name, name, (secrets.token_hex(32),))
                        for name in ("controller", "admin", "service", "viewer", "gateway"))
    creds.dump(path)
    return creds


def _mac(secret: str, identity: str, ts: float, nonce: str) -> str:
    msg = f"{identity}|{ts!r}|{nonce}".encode("utf-8", "surrogatepass")
    return hmac.new(secret.encode("utf-8", "surrogatepass"), msg, hashlib.sha256).hexdigest()


def client_token(identity: str, secret: str, clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """A fresh handshake token proving ``identity`` (a new nonce every call)."""
    ts = clock()
    nonce = secrets.token_hex(16)
    return {"identity": identity, "ts": ts, "nonce": nonce, "mac": _mac(secret, identity, ts, nonce)}


class Authenticator:
    """Verify handshake tokens: known identity, valid MAC, fresh time, unseen nonce."""

    def __init__(self, credentials: Credentials, clock: Callable[[], float] = time.time,
                 max_skew: float = 60.0) -> None:
        self.credentials = credentials
        self.clock = clock
        self.max_skew = max_skew
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self.throttle = Throttle(clock=time.monotonic)

    def authenticate(self, token: Any, certificate: str | None = None) -> tuple[str, str]:
        """Return (identity, role); raise AuthenticationError when the token is bad.

        ``certificate`` is the common name of the peer's TLS certificate (already
        verified against the CA). A certificate naming a known identity proves
        that identity by itself; a token must then name the same identity.
        """
        cert_ident = self.credentials.get(certificate) if certificate else None
        if token is None or token == "hello" or token == {}:
            if cert_ident is not None:
                return cert_ident.name, cert_ident.role
            return ANONYMOUS, "viewer"
        if not isinstance(token, dict) or not {"identity", "ts", "nonce", "mac"} <= token.keys():
            raise AuthenticationError("malformed credentials")
        name, ts, nonce, mac = token["identity"], token["ts"], token["nonce"], token["mac"]
        if not all(isinstance(v, str) for v in (name, nonce, mac)) or not isinstance(ts, (int, float)) \
                or isinstance(ts, bool) or not math.isfinite(ts):
            raise AuthenticationError("malformed credentials")
        ident = self.credentials.get(name)
        given = mac.encode("utf-8", "surrogatepass")  # bytes: compare_digest refuses non-ASCII str
        if ident is None or not any(hmac.compare_digest(_mac(s, name, ts, nonce).encode(), given)
                                    for s in ident.secrets):
            raise AuthenticationError("invalid credentials")
        now = self.clock()
        if abs(now - ts) > self.max_skew:
            raise AuthenticationError("stale credentials (check the clocks)")
        if cert_ident is not None and cert_ident.name != ident.name:
            raise AuthenticationError(f"certificate is for {cert_ident.name!r}, not {ident.name!r}")
        with self._lock:
            if nonce in self._seen:
                raise AuthenticationError("replayed credentials")
            self._seen[nonce] = ts
            if len(self._seen) > 10000:
                horizon = now - self.max_skew
                self._seen = {n: t for n, t in self._seen.items() if t >= horizon}
        return ident.name, ident.role


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
        host = address.rsplit(":", 1)[0]
        now = self.clock()
        with self._lock:
            recent = [t for t in self._failures.get(host, []) if now - t < self.window] + [now]
            self._failures[host] = recent[-100:]
            if len(self._failures) > 10000:
                self._failures = {h: ts for h, ts in self._failures.items() if now - ts[-1] < self.window}
        excess = len(recent) - self.free
        return 0.0 if excess <= 0 else min(self.max_delay, 0.05 * 2 ** min(excess, 10))


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


def require(permission: str) -> tuple[str, str, str | None]:
    """Raise PermissionDenied unless the caller's role holds ``permission``."""
    identity, role, address = caller()
    if permission not in ROLES.get(role, ()):
        holders = ", ".join(r for r, perms in ROLES.items() if permission in perms)
        raise PermissionDenied(f"{identity} ({role}) may not {permission}: needs one of the roles {holders}")
    return identity, role, address


def _auth_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn Pyro5's 'connection rejected' into AuthenticationError."""
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except CommunicationError as exc:
            if " rejected: " in str(exc):
                raise AuthenticationError(str(exc).split(" rejected: ", 1)[1]) from None
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
    def _pyroHandshake(self) -> Any:  # noqa: N802 - Pyro5's name
        identity, secret = self._mvc_credentials
        return client_token(identity, secret) if identity and secret else "hello"

    @_pyroHandshake.setter
    def _pyroHandshake(self, value: Any) -> None:  # noqa: N802
        pass  # the token is made fresh at each connect

    _pyroInvoke = _auth_errors(Pyro5.api.Proxy._pyroInvoke)
    _pyroBind = _auth_errors(Pyro5.api.Proxy._pyroBind)
    _pyroGetMetadata = _auth_errors(Pyro5.api.Proxy._pyroGetMetadata)


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
