"""The web gateway: browsers and clients outside the network watch and control models over HTTP.

A :class:`Gateway` is a :class:`~remote_mvc.ViewerHost` with one :class:`~remote_mvc.Viewer`
per model it serves (a relay: ten thousand HTTP clients cost the model server one
subscription) and an HTTP server (Starlette on uvicorn, in its own thread and event loop)
that serves the JSON API, Server-Sent Event streams with exact resume, and the live page.
See ``_http`` for the routes and ``_relay`` for how events reach each stream client.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..audit import AuditLog
from ..auth import Throttle
from ..client import ModelClient
from ..config import Settings
from ..errors import PersistenceError
from ..logs import log_event
from ..metrics import Metrics
from ..viewer import Viewer, ViewerHost
from ._http import build_app
from ._relay import Feed, tend

__all__ = ["Gateway"]

log = logging.getLogger("remote_mvc.gateway")


def _header_timeout_protocol(timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head within
    ``timeout`` seconds of opening (or of its last response). uvicorn's own keep-alive timer stops
    at the first byte of data, so a peer sending nothing, or half a request line, would hold its
    connection (and its memory) for as long as it liked. A request being served (a long event
    stream) is never cut: the timer only closes a connection with no request in progress."""

    class HeaderTimeoutH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(timeout, self._expire)

        def _expire(self) -> None:
            self._head_timer = None
            serving = self.cycle is not None and not self.cycle.response_complete
            if not serving and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11


class Gateway(ViewerHost):
    """One viewer of each model, relayed to HTTP clients (API, SSE streams, live page)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        super().__init__(settings, metrics)
        if not settings.identity and self.credentials.get("gateway") is not None:
            # the gateway proves its own identity (role gateway: read + delegate) to the model servers
            self.settings = settings = settings.replace(identity="gateway")
        self.audit = AuditLog(settings.audit_file(), self.metrics)
        self.throttle = Throttle()
        self.closing = False
        self.feeds: dict[str, Feed] = {}
        self._callers: dict[str, ModelClient] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        viewer_id = settings.default_viewer_id()
        for name in settings.gateway_model_names:
            self.feeds[name] = Feed(name, settings.gateway_ring, settings.gateway_client_buffer, self.metrics)
            self._callers[name] = ModelClient(name, settings, retry_seconds=2 * settings.call_timeout)
            self.add(Viewer(f"gateway-{viewer_id}-{name}", name, on_change=self._on_change, metrics=self.metrics,
                            log_values=False))
        self.app = build_app(self)
        self.on_stop(self._stop_http, early=True)
        self.on_stop(self._close_callers)

    # the relay -------------------------------------------------------------------------
    def _on_change(self, viewer: Viewer, event: dict[str, Any] | None) -> None:
        """In a Pyro5 worker: hand the change to the event loop (cheap; never blocks)."""
        feed = self.feeds[viewer.model]
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            if event is None:
                loop.call_soon_threadsafe(feed.on_snapshot, viewer.revision, dict(viewer.values), viewer.clock())
            else:
                loop.call_soon_threadsafe(feed.on_event, event)
        except RuntimeError:  # the loop closed meanwhile: we are stopping
            pass

    def client(self, model: str) -> ModelClient:
        """The model server client the HTTP side calls (as the gateway identity)."""
        return self._callers[model]

    def record_refusal(self, action: str, identity: str, address: str, reason: str) -> None:
        """Audit a request the gateway refused itself (the model server audits its own refusals)."""
        try:
            self.audit.record(action, identity, address, "refused", error=reason, via="gateway")
        except PersistenceError:
            pass  # counted by the audit log's metric; the refusal stands

    # lifecycle -------------------------------------------------------------------------
    @property
    def http_port(self) -> int:
        """The port the HTTP server listens on."""
        if self._socket is None:
            raise RuntimeError("the gateway is not started")
        return self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        """The gateway's base URL."""
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "", "::") else "127.0.0.1"
        return f"http://{host}:{self.http_port}"

    def start(self) -> Gateway:
        """Start the viewers and the HTTP server (returns once it listens); returns self."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.settings.host, self.settings.gateway_port))
        sock.listen(2048)
        sock.setblocking(False)
        self._socket = sock
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", ws="none",
                                timeout_graceful_shutdown=2, server_header=False, date_header=False,
                                http=_header_timeout_protocol(self.settings.gateway_header_timeout),
                                limit_concurrency=self.settings.gateway_max_clients + 256)
        self._server = uvicorn.Server(config)
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve() -> None:
            assert self._loop is not None and self._server is not None
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(started.set)
            tender = self._loop.create_task(tend(list(self.feeds.values()), self.settings.gateway_heartbeat,
                                                 self.settings.gateway_send_timeout, self.metrics))
            try:
                self._loop.run_until_complete(self._server.serve(sockets=[sock]))
                tender.cancel()
                self._loop.run_until_complete(asyncio.gather(tender, return_exceptions=True))
            finally:
                self._loop.close()

        self._http_thread = threading.Thread(target=serve, name="gateway-http", daemon=True)
        self._http_thread.start()
        started.wait(10)
        super().start()
        log_event(log, "gateway_started", f"gateway listening on {self.url}", port=self.http_port,
                  models=list(self.feeds))
        return self

    def healthy(self) -> bool:
        """True while the service is healthy (its viewers subscribed), every feed holds its model's
        state (before that, reads answer 503), and the HTTP server runs."""
        return (super().healthy() and all(feed.synced for feed in self.feeds.values())
                and self._server is not None and self._server.started and not self.closing)

    def _stop_http(self) -> None:
        """End every stream (each writes its last bytes and closes), then the HTTP server."""
        self.closing = True
        loop, server = self._loop, self._server
        if loop is not None and server is not None and not loop.is_closed():
            try:
                for feed in self.feeds.values():
                    loop.call_soon_threadsafe(feed.close)
            except RuntimeError:
                pass
            server.should_exit = True
        if self._http_thread is not None:
            self._http_thread.join(min(10.0, max(0.1, self.stop_time_left() - 0.5)))
        if self._socket is not None:
            self._socket.close()

    def _close_callers(self) -> None:
        """At stop: the clients that forward modifies, and the audit log (not ``_close_clients``, the
        viewer host's keeper's own reset of its model clients after a failure)."""
        for client in self._callers.values():
            client.close()
        self.audit.close()
