"""The name server service: Pyro5's own name server, durable and guarded.

Registrations are kept in SQLite (Pyro5's ``sql:`` storage) so they survive a
restart; services also re-register by themselves, so a name server that lost
its storage is repopulated within a few seconds.

In plain Pyro5 any client may register or remove any name, so a rogue process
could take over ``remote_mvc.model``. When the name server's credentials table
holds an identity allowed to register (role ``service`` or ``admin``), it is
*protected* (:class:`GuardedNameServer`): ``register``, ``remove`` and
``set_metadata`` need that permission, proven in the handshake; lookups stay
open to everyone. Either way its remote surface is declared (``SURFACE``), and
listing by regular expression needs the register permission (a ReDoS otherwise).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import Pyro5.api
import Pyro5.nameserver

from . import auth
from ._files import create_private
from .audit import AuditLog
from .config import Settings
from .errors import PersistenceError
from .logs import log_event, log_exception
from .metrics import Metrics
from .pyro.daemons import AuthNameServerDaemon
from .service import Service

__all__ = ["NameServer", "GuardedNameServer", "OpenNameServer"]

log = logging.getLogger("remote_mvc.nameserver")


class _DeclaredNameServer(Pyro5.nameserver.NameServer):
    """Pyro5's name server object with a declared surface (see :func:`auth.remote`).

    Pyro5 exposes its name server class as a whole; here every method it serves is
    declared again with its permission, so the table is complete (a test pins it)
    and changes are audited. Regex listing needs the register permission whatever
    the mode: Python's regular expressions backtrack, and a crafted pattern holds
    the name server's lock for as long as its author likes (a ReDoS). Listing by
    prefix and lookups stay open.
    """

    mvc_audit: AuditLog | None = None

    @auth.remote(auth.READ)
    def lookup(self, name: str, return_metadata: bool = False) -> Any:
        return super().lookup(name, return_metadata)

    @auth.remote(auth.READ)
    def list(self, prefix: str | None = None, regex: str | None = None, return_metadata: bool = False) -> Any:
        if regex is not None:
            auth.require(auth.REGISTER)  # see the class docstring: no regex from untrusted callers
        return super().list(prefix, regex, return_metadata)

    @auth.remote(auth.READ)
    def yplookup(self, meta_all: Any = None, meta_any: Any = None, return_metadata: bool = True) -> Any:
        return super().yplookup(meta_all, meta_any, return_metadata)

    @auth.remote(auth.READ)
    def count(self) -> int:
        return super().count()

    @auth.remote(auth.READ)
    def ping(self) -> None:
        return super().ping()

    # changes: declared with their permission by the two modes below
    def _register(self, name: str, uri: Any, safe: bool = False, metadata: Any = None) -> None:
        self._accepted("register", name)
        return super().register(name, uri, safe, metadata)

    def _remove(self, name: str | None = None, prefix: str | None = None, regex: str | None = None) -> int:
        if regex is not None:
            auth.require(auth.REGISTER)
        self._accepted("remove", name or prefix or regex)
        return super().remove(name, prefix, regex)

    def _set_metadata(self, name: str, metadata: Any) -> None:
        self._accepted("set_metadata", name)
        return super().set_metadata(name, metadata)

    def _accepted(self, action: str, name: Any) -> None:
        identity, _, address = auth.caller()
        log_event(log, "ns_" + action, f"{action} {str(name)[:200]!r}", identity=identity, client=address,
                  entry=str(name)[:500])
        self._record(action, identity, address, "accepted", name)

    def on_refusal(self, refusal: auth.Refusal) -> None:
        """A refused call (see :func:`auth.remote`): logged and audited (per address throttled)."""
        r = refusal
        entry = r.args[0] if r.args else next(iter(r.kwargs.values()), None)
        log_event(log, "ns_refused", f"refused to {r.method} {str(entry)[:200]!r}", level=logging.WARNING,
                  identity=r.identity, role=r.role, client=r.address, action=r.method, entry=str(entry)[:500],
                  result=r.result)
        self._record(r.method, r.identity, r.address, r.result, entry, r.error)

    def _record(self, action: str, identity: str, address: str | None, result: str, name: Any,
                error: str | None = None) -> None:
        if self.mvc_audit is not None and identity != "local":
            fields = {"entry": str(name)[:500], **({"error": error[:1000]} if error else {})}
            try:
                if result == "accepted":
                    self.mvc_audit.record("ns_" + action, identity, address, result, **fields)
                else:
                    self.mvc_audit.refusal("ns_" + action, identity, address, result, **fields)
            except PersistenceError as exc:
                if result == "accepted":
                    raise  # nothing unrecorded changes the naming
                log.debug("audit record lost: %s", exc)


@auth.declared
class GuardedNameServer(_DeclaredNameServer):
    """The protected name server: changing entries needs the register permission."""

    @auth.remote(auth.REGISTER)
    def register(self, name: str, uri: Any, safe: bool = False, metadata: Any = None) -> None:
        """Register ``name`` (needs the register permission)."""
        return self._register(name, uri, safe, metadata)

    @auth.remote(auth.REGISTER)
    def remove(self, name: str | None = None, prefix: str | None = None, regex: str | None = None) -> int:
        """Remove entries by name, prefix or regex (needs the register permission)."""
        return self._remove(name, prefix, regex)

    @auth.remote(auth.REGISTER)
    def set_metadata(self, name: str, metadata: Any) -> None:
        """Set ``name``'s metadata (needs the register permission)."""
        return self._set_metadata(name, metadata)


@auth.declared
class OpenNameServer(_DeclaredNameServer):
    """The name server in open mode (no identity may register): anyone may change entries, as in
    plain Pyro5 (a warning is logged at start); regex listing and removal still need ``register``."""

    @auth.remote(auth.READ)
    def register(self, name: str, uri: Any, safe: bool = False, metadata: Any = None) -> None:
        """Register ``name`` (open to every identity)."""
        return self._register(name, uri, safe, metadata)

    @auth.remote(auth.READ)
    def remove(self, name: str | None = None, prefix: str | None = None, regex: str | None = None) -> int:
        """Remove entries by name or prefix (open); by regex it needs the register permission."""
        return self._remove(name, prefix, regex)

    @auth.remote(auth.READ)
    def set_metadata(self, name: str, metadata: Any) -> None:
        """Set ``name``'s metadata (open to every identity)."""
        return self._set_metadata(name, metadata)


class NameServer(Service):
    """Pyro5's name server as a :class:`Service` (metrics, health, signals)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, storage: str | None = None) -> None:
        super().__init__(settings, metrics)
        if storage is None:
            path = create_private(Path(settings.state_dir) / "nameserver.sqlite3")
            storage = f"sql:{path}"
        self.storage = storage
        self.ns_uri: Pyro5.api.URI | None = None
        self.audit = AuditLog(settings.audit_file(), self.metrics,
                              refusals_per_second=settings.audit_refusals_per_second,
                              refusal_burst=settings.audit_refusal_burst)
        self.refusal_audit = self.audit
        self.on_stop(self.audit.close)

    def start(self) -> NameServer:
        """Start serving (and log a warning when unprotected); returns self."""
        super().start()
        self._spawn(self._flush_audit_summaries, "audit-summaries")
        return self

    def _flush_audit_summaries(self) -> None:
        """Write the audit log's due refusal summaries every second (see AuditLog.refusal), so an
        aggregated burst is on record soon after it stops; survives any error."""
        while not self._stopping.wait(1.0):
            try:
                self.audit.flush_summaries()
            except PersistenceError:
                pass  # counted in the audit failure metric; tried again next second
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one round
                self.metrics.loop_errors.labels("audit-summaries").inc()
                log_exception(log, "loop_error", "unexpected error writing audit summaries; it goes on", exc,
                              loop="audit-summaries")

    def make_daemon(self) -> Pyro5.api.Daemon:
        """The name server's daemon: guarded, authenticating."""
        s = self.settings
        daemon = AuthNameServerDaemon(host=s.host, port=s.ns_port, storage=self.storage,
                                      nathost=s.advertised_host(), natport=0)
        # same object and storage, declared surface (guarded changes when protected)
        daemon.nameserver.__class__ = GuardedNameServer if self.protected else OpenNameServer
        daemon.nameserver.mvc_audit = self.audit
        self.ns_uri = daemon.uriFor(daemon.nameserver)
        log_event(log, "ns_mode", "name server " + ("protected: registering needs credentials" if self.protected
                                                    else "OPEN: anyone may register names (no service identity)"),
                  level=logging.INFO if self.protected else logging.WARNING, protected=self.protected)
        return self.authenticate(daemon)

    @property
    def protected(self) -> bool:
        """True when changing entries needs the register permission."""
        return self.credentials.allows(auth.REGISTER)

    def healthy(self) -> bool:
        """True while the daemon serves."""
        return self.daemon is not None and not self._stopping.is_set()

    @property
    def port(self) -> int:
        """The port the name server listens on (useful when started on port 0)."""
        assert self.daemon is not None, "the name server is started"
        return int(self.daemon.locationStr.rsplit(":", 1)[1])
