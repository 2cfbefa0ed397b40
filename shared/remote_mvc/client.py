"""Clients of a model server: authenticated proxies and a reconnecting client.

:func:`connect` gives a plain Pyro5 proxy whose handshake proves an identity
with a fresh HMAC token on every (re)connect. :class:`ModelClient` wraps it for
people and programs: it finds the server by name, keeps one proxy per thread,
re-resolves and reconnects after a server or name server restart, and retries
``modify`` safely (each attempt carries the same request id, which the server
deduplicates, so a retried change is never applied twice).
"""

from __future__ import annotations

import functools
import itertools
import random
import threading
import time
import uuid
from typing import Any

import Pyro5.api
from Pyro5.errors import CommunicationError, NamingError

from ._backoff import Backoff
from .auth import client_credentials
from .config import Settings
from .errors import ServiceUnavailable
from .pyro.naming import locate_ns
from .pyro.proxy import AuthProxy
from .pyro.setup import require_setup

__all__ = ["AuthProxy", "connect", "resolve", "resolve_all", "group_tag", "ModelClient", "client_credentials"]


def group_tag(name: str) -> str:
    """The name server metadata every replica of model ``name`` registers with (cluster mode: each
    replica registers as ``<name>.replica.<replica>``)."""
    return f"remote_mvc.group:{name}"


def resolve_all(name: str, settings: Settings) -> list[Pyro5.api.URI]:
    """Every URI serving ``name``: its replicas (cluster mode), or the one registered under the name."""
    try:
        ns = locate_ns(settings)
        try:
            replicas = ns.yplookup(meta_all=[group_tag(name)], return_metadata=False)
            if replicas:
                return [Pyro5.api.URI(str(uri)) for _, uri in sorted(replicas.items())]
            return [ns.lookup(name)]
        finally:
            ns._pyroRelease()
    except NamingError as exc:
        raise ServiceUnavailable(f"{name} is not registered with the name server: {exc}") from None
    except (CommunicationError, OSError) as exc:
        raise ServiceUnavailable(
            f"name server at {settings.ns_host}:{settings.ns_port} unreachable: {exc}") from None


# spreads the connections of one process over the replicas in turn, from a random start per process
_turn = itertools.count(random.randrange(1 << 16))


def resolve(name: str, settings: Settings, avoid: set[str] | frozenset[str] = frozenset()) -> Pyro5.api.URI:
    """Look a name up in the name server; ServiceUnavailable when it can't be. With several replicas,
    the next one in turn (spreading a process's clients over them), preferring those not in ``avoid``."""
    uris = resolve_all(name, settings)
    good = [u for u in uris if str(u) not in avoid] or uris
    return good[next(_turn) % len(good)]


def connect(name: str | None = None, settings: Settings | None = None, *, identity: str | None = None,
            secret: str | None = None, default_identity: str = "") -> AuthProxy:
    """An authenticated proxy to the object registered as ``name`` (default: the model)."""
    settings = settings or Settings.from_env()
    require_setup(settings, "connect()")
    if identity is None:
        identity, secret = client_credentials(settings, default_identity)
    return AuthProxy(resolve(name or settings.model_name, settings), identity or "", secret or "",
                     timeout=settings.call_timeout)


AVOID_SECONDS = 5.0  # how long a replica that failed a call is passed over when others are there

# methods that are safe to call again after a lost connection
_IDEMPOTENT = {"query", "snapshot", "history", "schema", "viewers", "whoami", "renew", "unsubscribe"}


class ModelClient:
    """A model server client that survives restarts: ``rm.query()``, ``rm.modify({...})``.

    One Pyro5 proxy per calling thread; on a lost connection the name is looked up
    again and the call retried for up to ``retry_seconds``.
    """

    def __init__(self, name: str | None = None, settings: Settings | None = None, *,
                 identity: str | None = None, secret: str | None = None, default_identity: str = "",
                 retry_seconds: float = 10.0) -> None:
        self.settings = settings or Settings.from_env()
        require_setup(self.settings, "ModelClient")
        self.name = name or self.settings.model_name
        if identity is None:
            identity, secret = client_credentials(self.settings, default_identity)
        self.identity = identity or ""
        self._secret = secret or ""
        self.retry_seconds = retry_seconds
        self._local = threading.local()
        self._failed: dict[str, float] = {}  # replica URI -> when it last failed us (avoided for a while)

    def __repr__(self) -> str:
        return f"<ModelClient {self.name} as {self.identity or 'anonymous'}>"

    def proxy(self) -> AuthProxy:
        """The calling thread's proxy, made (the name resolved) on first use; a lost connection
        replaces it. Tests read its ``socket`` (documented test seam, see remote_mvc.testing)."""
        proxy = getattr(self._local, "proxy", None)
        if proxy is None:
            now = time.monotonic()
            avoid = {uri for uri, when in list(self._failed.items()) if now - when < AVOID_SECONDS}
            uri = resolve(self.name, self.settings, avoid)
            proxy = AuthProxy(uri, self.identity, self._secret, timeout=self.settings.call_timeout)
            self._local.proxy = proxy
        return proxy

    def _reset(self, failed: bool = False) -> None:
        proxy = getattr(self._local, "proxy", None)
        if proxy is not None:
            if failed:  # try the other replicas first for a while
                now = time.monotonic()
                for uri, when in list(self._failed.items()):  # forget old failures: the dict stays small
                    if now - when >= AVOID_SECONDS:
                        self._failed.pop(uri, None)
                self._failed[str(proxy.uri)] = now
            proxy._pyroRelease()
        self._local.proxy = None

    def call(self, method: str, *args: Any, retry: bool = True, **kwargs: Any) -> Any:
        """Call ``method`` on the model server, re-resolving and reconnecting until the retry deadline."""
        deadline = time.monotonic() + (self.retry_seconds if retry else 0)
        backoff = Backoff(0.05, min(1.0, self.settings.retry_backoff_max))
        while True:
            try:
                return getattr(self.proxy(), method)(*args, **kwargs)
            except (CommunicationError, ServiceUnavailable):
                self._reset(failed=True)
                delay = backoff.next()
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)  # jittered backoff before reconnecting to a restarting server

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        return functools.partial(self.call, method, retry=method in _IDEMPOTENT)

    def modify(self, changes: dict[str, Any], expected_revision: int | None = None) -> int:
        """Change the model; safe to retry: the request id makes it apply at most once."""
        return self.call("modify", changes, expected_revision, request_id=uuid.uuid4().hex)

    def close(self) -> None:
        """Release every thread's proxy."""
        self._reset()
