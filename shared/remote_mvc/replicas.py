"""Cluster mode's replica membership: who is alive, in etcd; the name server kept in step.

Each model-server replica registers ``<model>.replica.<replica>`` with the name server (with the
group's metadata, see :func:`~remote_mvc.client.resolve_all`) and keeps a key
``<prefix>/<model>/replicas/<replica>`` alive in etcd under a lease of ``ttl`` seconds. A replica
that is SIGKILLed cannot unregister; its lease runs out instead, and the other replicas remove its
name from the name server (after two rounds without its key, so a slow lease renewal is not
taken for a death). Clients then stop trying it: they find only live replicas.

A replica that had to take a new lease (its own had expired: etcd lost quorum, or this replica
was cut off from it) judges nobody for one ``ttl`` after: its siblings' keys very likely expired
in the same outage, and each renews at its own pace. Without that wait, the first replica back
would remove the names of live ones (they register again, but their clients see them vanish).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from Pyro5.errors import CommunicationError, NamingError, PyroError

from .auth import client_credentials
from .client import group_tag
from .config import Settings
from .errors import MVCError, ServiceUnavailable
from .etcd_store import EtcdStore, b64, prefix_end, unb64
from .logs import log_event
from .metrics import Metrics
from .pyro.naming import locate_ns

__all__ = ["Membership"]

log = logging.getLogger("remote_mvc.replicas")


class Membership:
    """This replica's liveness key in etcd, and the removal of dead siblings' names."""

    def __init__(self, store: EtcdStore, settings: Settings, model: str, replica: str, ttl: int = 5,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._clock = clock
        self._loop_errors = (metrics or Metrics()).loop_errors.labels("replica-membership")
        self.settings = settings
        self.model = model
        self.replica = replica
        self.ttl = ttl
        self.prefix = store.key(model, "replicas/")
        self._lease = 0
        self._missing: dict[str, int] = {}  # sibling -> rounds its key was missing
        self._judge_after = 0.0  # no sibling is judged dead before this (clock): see the module's docstring
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"replica-membership-{model}", daemon=True)

    def start(self) -> Membership:
        """Start keeping this replica's liveness key (a background thread); returns self."""
        self._thread.start()
        return self

    def alive(self) -> set[str]:
        """The replicas whose liveness key exists."""
        kvs, _, _ = self.store.range(self.prefix, prefix_end(self.prefix), keys_only=True)
        return {unb64(kv["key"]).decode()[len(self.prefix):] for kv in kvs}

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._keep_alive()
                self._sweep()
            except (ServiceUnavailable, CommunicationError, PyroError, OSError, MVCError) as exc:
                log.debug("membership round failed: %s", exc)
            except Exception:  # a bug: logged with its traceback, counted, and the loop goes on
                log.exception("membership error")
                self._loop_errors.inc()

    def _keep_alive(self) -> None:
        if self._lease:
            answer = self.store.call("lease/keepalive", {"ID": self._lease})
            if int(answer.get("result", {}).get("TTL", 0) or 0) <= 0:
                self._lease = 0
        if not self._lease:
            self._lease = int(self.store.call("lease/grant", {"TTL": self.ttl, "ID": 0})["ID"])
            self.store.call("kv/put", {"key": b64(self.prefix + self.replica), "value": b64(self.replica),
                                       "lease": self._lease})
            self._missing.clear()
            self._judge_after = self._clock() + self.ttl  # the siblings' leases may have gone with ours

    def _sweep(self) -> None:
        if self._clock() < self._judge_after:
            return  # we are just back (or new): give the siblings a lease's time to renew theirs
        alive = self.alive()
        if self.replica not in alive:
            return  # our own key is not there yet: judge nobody
        ns = locate_ns(self.settings, identity=client_credentials(self.settings)[0],
                       secret=client_credentials(self.settings)[1])
        try:
            names = ns.yplookup(meta_all=[group_tag(self.model)], return_metadata=False)
            stem = f"{self.model}.replica."
            for name in names:
                sibling = name[len(stem):] if name.startswith(stem) else None
                if sibling is None or sibling in alive:
                    self._missing.pop(sibling or "", None)
                    continue
                self._missing[sibling] = self._missing.get(sibling, 0) + 1
                if self._missing[sibling] >= 2:
                    try:
                        ns.remove(name)
                    except NamingError:
                        pass
                    self._missing.pop(sibling, None)
                    log_event(log, "replica_removed", f"removed the name of dead replica {sibling}",
                              model=self.model, replica=sibling, entry=name)
        finally:
            ns._pyroRelease()

    def stop(self) -> None:
        """Stop, revoking this replica's liveness key."""
        self._stop.set()
        self._thread.join(timeout=self.ttl)
        if self._lease:
            try:
                self.store.call("lease/revoke", {"ID": self._lease})
            except ServiceUnavailable:
                pass
