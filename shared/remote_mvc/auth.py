"""Identities, roles and the connection handshake.

Roles are ranked: ``viewer`` (read and subscribe) < ``controller`` (also modify)
< ``admin`` (also drop viewers). A client proves an identity when its connection
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

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from Pyro5.api import current_context

from ._daemons import TrackedDaemon
from .errors import AuthenticationError, ConfigError, PermissionDenied

__all__ = [
    "ROLES", "Identity", "Credentials", "Authenticator", "AuthDaemon",
    "client_token", "require", "caller", "generate_credentials",
]

ROLES = ("viewer", "controller", "admin")
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
                raise ConfigError(f"identity {ident.name!r}: unknown role {ident.role!r} (roles: {ROLES})")

    def __len__(self) -> int:
        return len(self.by_name)

    def get(self, name: str) -> Identity | None:
        return self.by_name.get(name)

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
    """Create a credentials file with a controller, an admin and a viewer identity."""
    creds = Credentials(Identity(name, role, (secrets.token_hex(32),))
                        for name, role in (("controller", "controller"), ("admin", "admin"), ("viewer", "viewer")))
    creds.dump(path)
    return creds


def _mac(secret: str, identity: str, ts: float, nonce: str) -> str:
    msg = f"{identity}|{ts!r}|{nonce}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


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

    def authenticate(self, token: Any) -> tuple[str, str]:
        """Return (identity, role); raise AuthenticationError when the token is bad."""
        if token is None or token == "hello" or token == {}:
            return ANONYMOUS, "viewer"
        if not isinstance(token, dict) or not {"identity", "ts", "nonce", "mac"} <= token.keys():
            raise AuthenticationError("malformed credentials")
        name, ts, nonce, mac = token["identity"], token["ts"], token["nonce"], token["mac"]
        if not all(isinstance(v, str) for v in (name, nonce, mac)) or not isinstance(ts, (int, float)):
            raise AuthenticationError("malformed credentials")
        ident = self.credentials.get(name)
        if ident is None or not any(hmac.compare_digest(_mac(s, name, ts, nonce), mac) for s in ident.secrets):
            raise AuthenticationError("invalid credentials")
        now = self.clock()
        if abs(now - ts) > self.max_skew:
            raise AuthenticationError("stale credentials (check the clocks)")
        with self._lock:
            if nonce in self._seen:
                raise AuthenticationError("replayed credentials")
            self._seen[nonce] = ts
            if len(self._seen) > 10000:
                horizon = now - self.max_skew
                self._seen = {n: t for n, t in self._seen.items() if t >= horizon}
        return ident.name, ident.role


class AuthDaemon(TrackedDaemon):
    """A Pyro5 daemon that authenticates each connection in the handshake."""

    def __init__(self, authenticator: Authenticator, on_refused: Callable[[str, str], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.authenticator = authenticator
        self.on_refused = on_refused

    def validateHandshake(self, conn: Any, data: Any) -> Any:  # noqa: N802 - Pyro5's name
        try:
            identity, role = self.authenticator.authenticate(data)
        except AuthenticationError as exc:
            if self.on_refused:
                self.on_refused(_address(conn), str(exc))
            raise
        conn.mvc_identity, conn.mvc_role = identity, role
        super().validateHandshake(conn, data)
        return {"identity": identity, "role": role}


def _address(conn: Any) -> str:
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
    return getattr(conn, "mvc_identity", ANONYMOUS), getattr(conn, "mvc_role", "viewer"), _address(conn)


def require(role: str) -> tuple[str, str, str | None]:
    """Raise PermissionDenied unless the caller's role ranks at least ``role``."""
    identity, have, address = caller()
    if ROLES.index(have) < ROLES.index(role):
        raise PermissionDenied(f"{identity} ({have}) may not do this: {role} role required")
    return identity, have, address
