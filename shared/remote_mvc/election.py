"""Leader election through an etcd lease (etcd's election recipe), for singletons such as the ticker.

Every candidate holds a lease of ``ttl`` seconds, kept alive every ``ttl / 4``, and tries to create
the election key under it (a transaction: create_revision = 0). The one that creates it leads until
its lease ends: it resigns (revokes the lease) when it stops, so another takes over at once; when
it dies, etcd deletes the key with the lease, within ``ttl``. A leader that cannot renew its lease
steps down by itself half a ``ttl`` after its last renewal, before etcd could give the key to
anyone else. What a leader writes is fenced as well: :meth:`Election.fence` is a compare on the key
holding this candidate's id, added to the leader's transactions, so a deposed leader that does not
know it yet cannot write (see :class:`~remote_mvc.cluster.EtcdPipeline`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .errors import ServiceUnavailable
from .etcd_store import EtcdStore, b64
from .logs import log_event
from .metrics import Metrics

__all__ = ["Election"]

log = logging.getLogger("remote_mvc.election")


class Election:
    """One candidate in the election named ``key``."""

    def __init__(self, store: EtcdStore, key: str, candidate: str, metrics: Metrics, *, ttl: int = 3,
                 on_change: Callable[[bool], None] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.key = key
        self.candidate = f"{candidate}-{uuid.uuid4().hex[:8]}"  # unique even for a restarted replica
        self.ttl = ttl
        self.on_change = on_change or (lambda leading: None)
        self.monotonic = monotonic
        self._gauge = metrics.elected.labels(key)
        self._loop_errors = metrics.loop_errors.labels("election")
        self._gauge.set(0)
        self._lease = 0
        self._renewed = 0.0  # when the lease was last renewed (monotonic)
        self._leading = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"election-{key}", daemon=True)

    @property
    def leading(self) -> bool:
        """True while this candidate leads and its lease is surely still alive."""
        if self._leading and self.monotonic() - self._renewed > self.ttl / 2:
            self._set(False, "lease not renewed in time")
        return self._leading

    def fence(self) -> dict[str, Any]:
        """An etcd compare that holds only while this candidate owns the key."""
        return {"key": b64(self.key), "result": "EQUAL", "target": "VALUE", "value": b64(self.candidate)}

    def _set(self, leading: bool, reason: str) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        self._gauge.set(1 if leading else 0)
        log_event(log, "elected" if leading else "deposed", f"{'leading' if leading else 'not leading'}: {reason}",
                  level=logging.INFO if leading else logging.WARNING, election=self.key, candidate=self.candidate)
        self.on_change(leading)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except ServiceUnavailable as exc:
                self._lease = 0 if self.monotonic() - self._renewed > self.ttl else self._lease
                if self._leading:
                    self.leading  # noqa: B018 - steps down once the lease may have run out
                log.debug("election step failed: %s", exc)
            except Exception:  # a bug: logged with its traceback, counted, and the candidate goes on
                log.exception("election error")
                self._loop_errors.inc()
            self._stop.wait(self.ttl / 4)

    def _step(self) -> None:
        deadline = self.monotonic() + self.ttl / 4
        if self._lease:
            answer = self.store.call("lease/keepalive", {"ID": self._lease}, deadline)
            if int(answer.get("result", {}).get("TTL", 0) or 0) <= 0:
                self._lease = 0  # expired: the key went with it
                self._set(False, "lease expired")
            else:
                self._renewed = self.monotonic()
        if not self._lease:
            answer = self.store.call("lease/grant", {"TTL": self.ttl, "ID": 0}, deadline)
            self._lease = int(answer["ID"])
            self._renewed = self.monotonic()
        if not self._leading:
            answer = self.store.txn(
                [{"key": b64(self.key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
                [{"request_put": {"key": b64(self.key), "value": b64(self.candidate), "lease": self._lease}}],
                [{"request_range": {"key": b64(self.key)}}], deadline)
            if answer.get("succeeded"):
                self._set(True, "created the election key")
        else:
            value, _, _ = self.store.get(self.key, deadline)
            if value is None or value.decode() != self.candidate:
                self._set(False, "the election key is not ours any more")

    def start(self) -> Election:
        """Start campaigning (a background thread); returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop campaigning; a leader resigns so that another candidate takes over at once."""
        self._stop.set()
        self._thread.join(timeout=self.ttl)
        lease, self._lease = self._lease, 0
        self._set(False, "stopped")
        if lease:
            try:
                self.store.call("lease/revoke", {"ID": lease}, self.monotonic() + 1.0)
            except ServiceUnavailable:
                pass  # it runs out by itself within ttl
