"""Service lifecycle: a Pyro5 daemon, name registration, metrics, signals.

A :class:`Service` serves objects on one Pyro5 daemon, keeps their names
registered with the name server (re-registering after a name server restart),
serves ``/metrics`` and ``/healthz``, and stops gracefully on SIGTERM/SIGINT:
``start()`` returns at once, ``stop()`` never hangs, ``run()`` does both around
a wait for a signal.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import Pyro5.api
from Pyro5.errors import CommunicationError, NamingError, PyroError

from ._backoff import Backoff
from .audit import AuditLog
from .auth import Authenticator, Credentials, client_credentials
from .config import Settings
from .errors import MVCError
from .logs import log_event, log_exception
from .metrics import Metrics, MetricsServer
from .pyro.daemons import AuthDaemon, GuardedDaemonMixin, Refusal
from .pyro.naming import locate_ns
from .pyro.setup import require_setup
from .pyro.wire import Limits

__all__ = ["Service"]

log = logging.getLogger("remote_mvc.service")

class Service:
    """One process's Pyro5 daemon with registered names, metrics and signal handling."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None,
                 credentials: Credentials | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.credentials = credentials if credentials is not None else Credentials.from_settings(settings)
        self.on_refused: Callable[[Refusal], None] | None = None  # called for each refused connection or message
        self.refusal_audit: AuditLog | None = None  # where refusals are recorded (a service's audit log)
        self.daemon: Pyro5.api.Daemon | None = None
        self._names: dict[str, Pyro5.api.URI] = {}
        self._registered: set[str] = set()
        self._objects: list[tuple[Any, str | None, str | None]] = []
        self._metadata: dict[str, set[str]] = {}  # name server metadata of a name (cluster groups)
        self._closing = threading.Event()  # stop() began
        self._stop_deadline: float | None = None  # time.monotonic() by which stop() returns
        self._stopping = threading.Event()  # the daemon is going down
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self.metrics_server: MetricsServer | None = None
        self._closers: list[Callable[[], None]] = []
        self._early_closers: list[Callable[[], None]] = []

    # wiring ------------------------------------------------------------------
    def serve(self, obj: Any, name: str | None = None, object_id: str | None = None,
              metadata: set[str] | None = None) -> None:
        """Serve ``obj``; with ``name`` it is registered with the name server too (with ``metadata``:
        Pyro5 name server metadata, e.g. the replica group of a model, see ``resolve_all``)."""
        self._objects.append((obj, name, object_id))
        if name and metadata:
            self._metadata[name] = set(metadata)

    def on_stop(self, closer: Callable[[], None], early: bool = False) -> None:
        """Run ``closer`` when the service stops: after the daemon is down, or
        with ``early`` before it (say goodbye while we can still be reached)."""
        (self._early_closers if early else self._closers).append(closer)

    def make_daemon(self) -> Pyro5.api.Daemon:
        """The daemon this service serves its objects on."""
        s = self.settings
        return self.authenticate(AuthDaemon(host=s.host, port=s.port, nathost=s.advertised_host(), natport=0))

    def authenticate(self, daemon: Any) -> Any:
        """Make ``daemon`` check credentials in the handshake (an :class:`AuthMixin` daemon),
        with the wire bounds of :meth:`guard`."""
        daemon.authenticator = Authenticator(self.credentials, max_skew=self.settings.max_clock_skew)
        return self.guard(daemon)

    def guard(self, daemon: GuardedDaemonMixin) -> Any:
        """Apply the settings' wire bounds to ``daemon``: message sizes, handshake and idle timeouts,
        connections per address; its refusals are counted, logged and passed to ``on_refused``."""
        s = self.settings
        daemon.handshake_timeout = s.handshake_timeout
        daemon.idle_timeout = s.idle_timeout
        daemon.anonymous_idle_timeout = s.anonymous_idle_timeout
        daemon.max_connections_per_address = s.max_connections_per_address
        daemon.limits = Limits(anonymous=s.max_anonymous_request_bytes, authenticated=s.max_request_bytes)
        daemon.on_refused = self._refused
        return daemon

    def _refused(self, refusal: Refusal) -> None:
        """Count and log every refused connection or message; ``on_refused`` audits it."""
        if refusal.stage == "handshake":
            self.metrics.auth_failures.labels(refusal.reason.split(" ")[0]).inc()
        self.metrics.wire_refused.labels(refusal.stage).inc()
        if refusal.throttled:
            self.metrics.auth_throttled.inc()
        log_event(log, "connection_refused", f"refused ({refusal.stage}): {refusal.reason}", level=logging.WARNING,
                  client=refusal.address, stage=refusal.stage, claimed=refusal.claimed, throttled=refusal.throttled)
        if self.refusal_audit is not None:
            try:
                self.refusal_audit.refusal("connect", refusal.claimed or "unknown", refusal.address, "refused",
                                           stage=refusal.stage, error=refusal.reason[:500])
            except MVCError:
                pass  # counted by the audit log's failure metric; the refusal stands either way
        if self.on_refused is not None:
            self.on_refused(refusal)

    # lifecycle ---------------------------------------------------------------
    def start(self) -> Service:
        """Serve the registered objects, keep their names registered, serve metrics; returns at once.

        SetupRequired when ``remote_mvc.setup()`` did not configure Pyro5 for these settings."""
        require_setup(self.settings, f"{type(self).__name__}.start()")
        self.daemon = self.make_daemon()
        for obj, name, object_id in self._objects:
            uri = self.daemon.register(obj, objectId=object_id or name)
            if name:
                self._names[name] = uri
        self._spawn(self.daemon.requestLoop, "pyro-daemon", lambda: not self._stopping.is_set())
        if self._names:
            self._spawn(self._keep_registered, "ns-registrar")
        if self.settings.metrics_port >= 0:
            self.metrics_server = MetricsServer(self.metrics, self.settings.host, self.settings.metrics_port,
                                                healthy=self.healthy).start()
        log_event(log, "service_started", "service started", uris={n: str(u) for n, u in self._names.items()},
                  location=self.daemon.locationStr,
                  metrics_port=self.metrics_server.port if self.metrics_server else None)
        return self

    def _spawn(self, target: Callable[..., Any], name: str, *args: Any) -> threading.Thread:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def stop_time_left(self) -> float:
        """Seconds left of the stop's budget (``MVC_STOP_TIMEOUT``, counted from :meth:`stop`); what a
        closer may still spend. Infinite before a stop began."""
        if self._stop_deadline is None:
            return float("inf")
        return max(0.0, self._stop_deadline - time.monotonic())

    def healthy(self) -> bool:
        """True while the daemon serves and every name is registered."""
        return (self.daemon is not None and not self._stopping.is_set()
                and self._registered >= set(self._names))

    def uri(self, name: str) -> Pyro5.api.URI:
        """The URI ``name`` is served at."""
        return self._names[name]

    def wait_registered(self, timeout: float) -> bool:
        """Block until every name is registered (for tests and start-up checks)."""
        deadline = time.monotonic() + timeout
        while not self._registered >= set(self._names):
            if time.monotonic() > deadline or self._stopping.is_set():
                return False
            self._stopping.wait(0.02)
        return True

    def may_register(self) -> bool:
        """Whether the registrar may put this service's names (back) in the name server now. A service
        that cannot serve for a while says False (a model replica cut off from etcd): names that point
        here stay, but one removed meanwhile (siblings judged this replica dead) is not put back, so it
        does not flap in and out of the name server while clients are sent to it for nothing."""
        return True

    def _keep_registered(self) -> None:
        """Make sure each name points at us; after a name server restart, register again."""
        ns = None
        held: set[str] = set()  # names not put back while may_register() says no (logged once)
        interval = self.settings.register_interval
        backoff = Backoff(0.05, min(self.settings.retry_backoff_max, interval))
        identity, secret = client_credentials(self.settings)
        while not self._stopping.is_set():
            try:
                if ns is None:
                    ns = locate_ns(self.settings, identity=identity, secret=secret)
                for name, uri in self._names.items():
                    try:
                        current = ns.lookup(name)
                    except NamingError:
                        current = None
                    if current is None or str(current) != str(uri):
                        if not self.may_register():
                            self._registered.discard(name)
                            if name not in held:
                                held.add(name)
                                log_event(log, "registration_held", f"{name} is not in the name server; not "
                                          "registering it until this service can serve again",
                                          level=logging.WARNING, registered=name, current=str(current or ""))
                            continue
                        held.discard(name)
                        ns.register(name, uri, safe=False, metadata=self._metadata.get(name))
                        self.metrics.registrations.labels(name).inc()
                        log_event(log, "registered", f"registered {name} with the name server", registered=name,
                                  uri=str(uri), replaced=str(current) if current else None)
                    self._registered.add(name)
                wait = interval
                backoff.reset()
            except (CommunicationError, PyroError, OSError, MVCError) as exc:
                if isinstance(exc, MVCError):
                    log_event(log, "register_refused", f"the name server refused us: {exc}", level=logging.ERROR,
                              error=f"{type(exc).__name__}: {exc}")
                elif self._registered:
                    log_event(log, "ns_unreachable", "name server unreachable; will register again",
                              level=logging.WARNING, error=str(exc))
                self._registered.clear()
                if ns is not None:
                    ns._pyroRelease()
                ns = None
                wait = backoff.next()  # jittered: every service re-registers after a name server restart
            except Exception as exc:  # noqa: BLE001 - the registrar outlives anything one round hits
                self.metrics.loop_errors.labels("registrar").inc()
                log_exception(log, "loop_error", "unexpected error in the name registrar; it goes on", exc,
                              loop="registrar")
                self._registered.clear()
                if ns is not None:
                    ns._pyroRelease()
                ns = None
                wait = backoff.next()
            self._stopping.wait(wait)
        if ns is not None:
            ns._pyroRelease()

    def _unregister(self) -> None:
        if not self._names:
            return
        try:
            ns = locate_ns(self.settings, 1.0, *client_credentials(self.settings))
            for name, uri in self._names.items():
                try:
                    if str(ns.lookup(name)) == str(uri):
                        ns.remove(name)
                except NamingError:
                    pass
            ns._pyroRelease()
        except (CommunicationError, PyroError, OSError, MVCError):
            pass  # the name server is gone too (or refuses us); nothing to undo
        except Exception as exc:  # noqa: BLE001 - a broken name server must not keep us from stopping
            log_exception(log, "unregister_failed", "could not unregister from the name server", exc)

    def stop(self) -> None:
        """Stop serving: unregister, shut the daemon down, run closers. Idempotent; returns within about
        ``MVC_STOP_TIMEOUT`` (a thread still busy then is a daemon thread, left to the process' exit)."""
        if self._closing.is_set():
            self._stopped.wait(self.settings.stop_timeout + 1)
            return
        self._stop_deadline = time.monotonic() + self.settings.stop_timeout
        self._closing.set()
        log_event(log, "service_stopping", "service stopping")
        self._run_closers(self._early_closers)
        self._stopping.set()
        self._unregister()
        if self.daemon is not None:
            self.daemon.shutdown()
            close = getattr(self.daemon, "close_connections", None)
            if close is not None:
                close()
        for t in self._threads:
            t.join(timeout=max(0.05, self.stop_time_left()))
        self._run_closers(self._closers)
        if self.daemon is not None:
            self.daemon.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log_event(log, "service_stopped", "service stopped")
        self._stopped.set()

    @staticmethod
    def _run_closers(closers: list[Callable[[], None]]) -> None:
        for closer in closers:
            try:
                closer()
            except Exception:  # a closer must not keep the others from running
                log.exception("error while stopping")

    def run(self) -> None:
        """Start, wait for SIGTERM or SIGINT, stop gracefully."""
        wake = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log_event(log, "signal", f"received {signal.Signals(signum).name}", signal=signum)
            wake.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        while not wake.wait(1.0):
            pass
        self.stop()
