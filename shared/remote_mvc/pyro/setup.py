"""The process-wide Pyro5 configuration remote-mvc needs, applied once, explicitly.

Pyro5 keeps its configuration (serializer, server type, thread pool, retries,
message size, TLS and its cached TLS contexts) and its serializer table in
module globals: whatever sets them changes every Pyro5 user in the process.
remote-mvc therefore never sets them behind its user's back (creating a
:class:`~remote_mvc.client.ModelClient`, calling ``connect()`` or making a
``Service`` leaves ``Pyro5.config`` alone): a program calls :func:`setup` once
at start (the services' ``main``, the CLI, the pytest plugin and the benchmark
processes do), and clients and services check that it did (:func:`require_setup`)
rather than run with Pyro5's defaults (a ``marshal`` decoder open to peers,
unbounded inflation, TLS off) by surprise.

:func:`setup` is idempotent: calling it again with the same settings changes
nothing; with other TLS settings it switches TLS (tests do that).
"""

from __future__ import annotations

import ssl
import threading

from Pyro5 import config as pyro_config
from Pyro5 import socketutil
from Pyro5.api import register_dict_to_class
from Pyro5.serializers import SerializerBase

from .. import errors
from ..config import Settings
from ..errors import SetupRequired
from .hardening import harden_pyro

__all__ = ["MAX_MESSAGE_SIZE", "setup", "is_setup", "require_setup", "configure_tls", "register_error_types"]

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
# Pyro5's socketutil caches one TLS context of each kind (name-mangled module globals)
_TLS_CACHES = ("__ssl_client_context", "__ssl_server_context")

_lock = threading.Lock()
_applied: tuple | None = None  # the TLS settings the last setup() applied; None: setup() never ran


def _tls_of(settings: Settings) -> tuple:
    return settings.tls, settings.tls_cert, settings.tls_key, settings.tls_ca


def register_error_types() -> None:
    """Let Pyro5 rebuild remote-mvc's exceptions (``remote_mvc.errors``) with their own class, so
    that they keep their type over the wire (idempotent: a name maps to its class)."""
    for name in errors.__all__:
        cls = getattr(errors, name)

        def convert(_classname: str, data: dict, cls: type = cls) -> Exception:
            return SerializerBase.make_exception(cls, data)

        register_dict_to_class(f"{cls.__module__}.{cls.__name__}", convert)


def setup(settings: Settings | None = None) -> None:
    """Configure Pyro5 for remote-mvc in this process (idempotent).

    Sets the threaded server and its pool size, the serpent serializer, no
    detailed tracebacks, a 16 MiB message bound, TCP_NODELAY, no automatic
    retries; refuses ``marshal`` on input and bounds zlib inflation (see
    :mod:`.hardening`); registers remote-mvc's error classes with Pyro5's
    serializer (:func:`register_error_types`); and turns two-way TLS on or off
    (:func:`configure_tls`).
    ``settings`` defaults to ``Settings.from_env()``.
    """
    global _applied
    settings = settings if settings is not None else Settings.from_env()
    with _lock:
        cfg = pyro_config
        cfg.SERVERTYPE = "thread"
        cfg.THREADPOOL_SIZE = settings.threadpool_size
        cfg.THREADPOOL_SIZE_MIN = min(4, settings.threadpool_size)
        cfg.SERIALIZER = "serpent"
        cfg.DETAILED_TRACEBACK = False
        cfg.MAX_MESSAGE_SIZE = MAX_MESSAGE_SIZE
        cfg.SOCK_NODELAY = True
        cfg.MAX_RETRIES = 0
        harden_pyro()
        register_error_types()
        configure_tls(settings)
        _applied = _tls_of(settings)


def is_setup() -> bool:
    """Whether :func:`setup` ran in this process."""
    return _applied is not None


def require_setup(settings: Settings, what: str) -> None:
    """Raise SetupRequired unless :func:`setup` ran, with the TLS settings of ``settings``.

    Called where a client or service starts using Pyro5, so that a forgotten
    ``setup()`` is a clear error at once, never a silently unhardened or
    plaintext process.
    """
    applied = _applied
    if applied is None:
        raise SetupRequired(f"{what}: call remote_mvc.setup(settings) once at the start of the process "
                            "(it configures Pyro5 for remote-mvc)")
    if applied != _tls_of(settings):
        raise SetupRequired(f"{what}: its TLS settings differ from those remote_mvc.setup() applied "
                            "(TLS is process-wide in Pyro5: call setup() with these settings)")


def configure_tls(settings: Settings) -> None:
    """Turn Pyro5's two-way TLS on (or off) for this process (part of :func:`setup`).

    Every connection, in either direction, needs a certificate signed by the
    private CA. Host names are not checked (viewer replicas have addresses no
    certificate can name in advance): the CA signature authenticates the peer,
    and the certificate's common name is its identity (see ``auth``).
    """
    cfg = pyro_config
    wanted = _tls_of(settings)
    current = (cfg.SSL, cfg.SSL_SERVERCERT, cfg.SSL_SERVERKEY, cfg.SSL_CACERTS)
    if wanted == current:
        return
    cfg.SSL = settings.tls
    cfg.SSL_REQUIRECLIENTCERT = settings.tls
    cfg.SSL_SERVERCERT = cfg.SSL_CLIENTCERT = settings.tls_cert
    cfg.SSL_SERVERKEY = cfg.SSL_CLIENTKEY = settings.tls_key
    cfg.SSL_CACERTS = settings.tls_ca
    for cache in _TLS_CACHES:
        setattr(socketutil, cache, None)
    if settings.tls:
        client = socketutil.get_ssl_context(clientcert=settings.tls_cert, clientkey=settings.tls_key,
                                            cacerts=settings.tls_ca)
        client.check_hostname = False
        client.minimum_version = ssl.TLSVersion.TLSv1_2
