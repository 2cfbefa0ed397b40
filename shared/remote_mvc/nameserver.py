"""The name server service: Pyro5's own name server, durable and guarded.

Registrations are kept in SQLite (Pyro5's ``sql:`` storage) so they survive a
restart; services also re-register by themselves, so a name server that lost
its storage is repopulated within a few seconds.

In plain Pyro5 any client may register or remove any name, so a rogue process
could take over ``remote_mvc.model``. When the name server's credentials table
holds an identity allowed to register (role ``service`` or ``admin``), it is
*protected*: ``register``, ``remove`` and ``set_metadata`` need that permission,
proven in the handshake; lookups stay open to everyone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import Pyro5.api
import Pyro5.nameserver

from . import auth
from ._daemons import AuthNameServerDaemon
from .audit import AuditLog
from .config import Settings
from .errors import PersistenceError
from .logs import log_event
from .metrics import Metrics
from .service import Service

__all__ = ["NameServer", "GuardedNameServer"]

log = logging.getLogger("remote_mvc.nameserver")


@Pyro5.api.expose
class GuardedNameServer(Pyro5.nameserver.NameServer):
    """Pyro5's name server object where changing entries needs the register permission."""

    mvc_audit: AuditLog | None = None

    def _guard(self, action: str, name: Any) -> None:
        try:
            identity, _, address = auth.require(auth.REGISTER)
        except auth.PermissionDenied as exc:
            identity, role, address = auth.caller()
            log_event(log, "ns_refused", f"refused to {action} {name!r}", level=logging.WARNING,
                      identity=identity, role=role, client=address, action=action, entry=str(name))
            self._record(action, identity, address, "forbidden", name, str(exc))
            raise
        log_event(log, "ns_" + action, f"{action} {name!r}", identity=identity, client=address, entry=str(name))
        self._record(action, identity, address, "accepted", name)

    def _record(self, action: str, identity: str, address: str | None, result: str, name: Any,
                error: str | None = None) -> None:
        if self.mvc_audit is not None and identity != "local":
            try:
                self.mvc_audit.record("ns_" + action, identity, address, result, entry=str(name)[:500],
                                      **({"error": error} if error else {}))
            except PersistenceError as exc:
                if result == "accepted":
                    raise  # nothing unrecorded changes the naming
                log.debug("audit record lost: %s", exc)

    def register(self, name: str, uri: Any, safe: bool = False, metadata: Any = None) -> None:
        self._guard("register", name)
        return super().register(name, uri, safe, metadata)

    def remove(self, name: str | None = None, prefix: str | None = None, regex: str | None = None) -> int:
        self._guard("remove", name or prefix or regex)
        return super().remove(name, prefix, regex)

    def set_metadata(self, name: str, metadata: Any) -> None:
        self._guard("set_metadata", name)
        return super().set_metadata(name, metadata)


class NameServer(Service):
    """Pyro5's name server as a :class:`Service` (metrics, health, signals)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, storage: str | None = None) -> None:
        super().__init__(settings, metrics)
        if storage is None:
            path = Path(settings.state_dir) / "nameserver.sqlite3"
            path.parent.mkdir(parents=True, exist_ok=True)
            storage = f"sql:{path}"
        self.storage = storage
        self.ns_uri: Pyro5.api.URI | None = None
        self.audit = AuditLog(settings.audit_file(), self.metrics)
        self.refusal_audit = self.audit
        self.on_stop(self.audit.close)

    def make_daemon(self) -> Pyro5.api.Daemon:
        s = self.settings
        daemon = AuthNameServerDaemon(host=s.host, port=s.ns_port, storage=self.storage,
                                      nathost=s.advertised_host(), natport=0)
        if self.protected:
            daemon.nameserver.__class__ = GuardedNameServer  # same storage, guarded changes
            daemon.nameserver.mvc_audit = self.audit
        self.ns_uri = daemon.uriFor(daemon.nameserver)
        log_event(log, "ns_mode", "name server " + ("protected: registering needs credentials" if self.protected
                                                    else "OPEN: anyone may register names (no service identity)"),
                  level=logging.INFO if self.protected else logging.WARNING, protected=self.protected)
        return self.authenticate(daemon)

    @property
    def protected(self) -> bool:
        return self.credentials.allows(auth.REGISTER)

    def healthy(self) -> bool:
        return self.daemon is not None and not self._stopping.is_set()

    @property
    def port(self) -> int:
        """The port the name server listens on (useful when started on port 0)."""
        return int(self.daemon.locationStr.rsplit(":", 1)[1])
