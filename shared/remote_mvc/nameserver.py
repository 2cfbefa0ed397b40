"""The name server service: Pyro5's own name server, with durable storage.

Registrations are kept in SQLite (Pyro5's ``sql:`` storage) so they survive a
restart; services also re-register by themselves, so a name server that lost
its storage is repopulated within a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import Pyro5.api

from ._daemons import TrackedNameServerDaemon
from .config import Settings
from .metrics import Metrics
from .service import Service

__all__ = ["NameServer"]


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

    def make_daemon(self) -> Pyro5.api.Daemon:
        s = self.settings
        daemon = TrackedNameServerDaemon(host=s.host, port=s.ns_port, storage=self.storage,
                                                   nathost=s.advertised_host(), natport=0)
        self.ns_uri = daemon.uriFor(daemon.nameserver)
        return daemon

    def healthy(self) -> bool:
        return self.daemon is not None and not self._stopping.is_set()

    @property
    def port(self) -> int:
        """The port the name server listens on (useful when started on port 0)."""
        return int(self.daemon.locationStr.rsplit(":", 1)[1])
