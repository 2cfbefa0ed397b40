"""Prometheus metrics and the small HTTP server every process runs.

:class:`Metrics` owns its :class:`~prometheus_client.CollectorRegistry`, so tests
pass a fresh one and read values back without global state; the process, platform
and GC collectors (``process_cpu_seconds_total``, ``process_resident_memory_bytes``,
``python_gc_*``, ``python_info``) are registered in it too. :class:`MetricsServer`
serves ``/metrics`` with prometheus_client's own WSGI exposition (content negotiation,
``name[]`` filters, gzip) and ``/healthz`` (200 when the service says it is healthy,
503 otherwise) on one port.

The port is reachable by anyone on the network, so what a peer can make the server
hold is bounded: every connection gets a socket timeout (a silent peer is cut off
instead of holding a thread forever) and at most ``max_connections`` are served at
once; a connection beyond that is closed at once and counted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    make_wsgi_app,
)

__all__ = ["Metrics", "MetricsServer", "LATENCY_BUCKETS"]

# Sub-millisecond resolution at the fast end, seconds at the slow end.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class Metrics:
    """Every metric remote-mvc exports, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None, runtime_collectors: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if runtime_collectors:  # what every Prometheus user looks for first: CPU, memory, fds, GC
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.viewers_connected = Gauge(
            "remote_mvc_viewers_connected", "Viewers currently subscribed.", ["model"], registry=r)
        self.notifications_sent = Counter(
            "remote_mvc_notifications_sent", "Notification calls delivered to viewers.", ["model"], registry=r)
        self.events_delivered = Counter(
            "remote_mvc_events_delivered", "Change events delivered to viewers (a batch holds several).",
            ["model"], registry=r)
        self.notifications_failed = Counter(
            "remote_mvc_notifications_failed", "Notification calls that failed.", ["model"], registry=r)
        self.snapshots_sent = Counter(
            "remote_mvc_snapshots_sent", "Snapshots sent in place of events to viewers that fell behind.",
            ["model"], registry=r)
        self.viewers_dropped = Counter(
            "remote_mvc_viewers_dropped", "Viewers dropped by the server.", ["model", "reason"], registry=r)
        self.notification_latency = Histogram(
            "remote_mvc_notification_latency_seconds",
            "Time from a change being made to a viewer handling it, measured at the viewer.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.modifications = Counter(
            "remote_mvc_modifications", "Modify attempts by result.", ["model", "result"], registry=r)
        self.audit_write_failures = Counter(
            "remote_mvc_audit_write_failures", "Audit records that could not be written.", registry=r)
        self.commit_batch = Histogram(
            "remote_mvc_commit_batch_size", "Changes made durable together by one audit fsync (group commit).",
            ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.model_revision = Gauge(
            "remote_mvc_model_revision", "Current revision of a model.", ["model"], registry=r)
        self.viewer_revision = Gauge(
            "remote_mvc_viewer_revision", "Last revision a viewer applied.", ["model"], registry=r)
        self.resyncs = Counter(
            "remote_mvc_viewer_resyncs", "Viewer catch-ups by kind (history or snapshot).", ["model", "kind"],
            registry=r)
        self.viewer_merged = Counter(
            "remote_mvc_viewer_merged", "Viewer host dispatches that applied several pending notifications "
            "in one go (the viewer's handler was behind).", ["model"], registry=r)
        self.viewer_conflated = Counter(
            "remote_mvc_viewer_conflated", "Viewers whose backlog overflowed and who were given the stream's "
            "latest state instead (their handler slower than the change rate).", ["model"], registry=r)
        self.viewer_stalls = Counter(
            "remote_mvc_viewer_stalls", "Times a viewer host added a spare dispatch worker because viewer "
            "handlers were stalled (running longer than MVC_VIEWER_STALL_SECONDS).", ["model"], registry=r)
        self.viewer_dispatch_exhausted = Gauge(
            "remote_mvc_viewer_dispatch_exhausted", "1 while every dispatch worker of this viewer host (at "
            "MVC_VIEWER_DISPATCH_THREADS_MAX) runs a stalled handler and other viewers' changes wait.",
            registry=r)
        self.handler_errors = Counter(
            "remote_mvc_viewer_handler_errors", "Viewer handlers (on_change) that raised.", ["model"], registry=r)
        self.auth_failures = Counter(
            "remote_mvc_auth_failures", "Refused connection handshakes.", ["reason"], registry=r)
        self.auth_throttled = Counter(
            "remote_mvc_auth_throttled", "Handshake refusals delayed for repeated failures from one address.",
            registry=r)
        self.wire_refused = Counter(
            "remote_mvc_wire_refused", "Connections and messages refused by a daemon, by stage (tls, handshake, "
            "call, connections).", ["stage"], registry=r)
        self.loop_errors = Counter(
            "remote_mvc_loop_errors", "Unexpected errors a background loop survived (logged with a traceback).",
            ["loop"], registry=r)
        self.refusals = Counter(
            "remote_mvc_refusals", "Remote calls refused (permission, validation, ownership, capability).",
            ["method", "result"], registry=r)
        self.audit_aggregated = Counter(
            "remote_mvc_audit_refusals_aggregated",
            "Refusal records folded into a per-address summary record (the audit log's throttle).", registry=r)
        self.registrations = Counter(
            "remote_mvc_ns_registrations", "Times a service (re-)registered with the name server.", ["name"],
            registry=r)
        # cluster mode (etcd): per replica, i.e. per process
        self.watch_lag = Gauge(
            "remote_mvc_cluster_watch_lag", "Model revisions committed in etcd that this replica has not applied "
            "yet (at its last look at etcd's head).", ["model"], registry=r)
        self.etcd_revision = Gauge(
            "remote_mvc_cluster_etcd_revision", "The etcd store revision this replica's watch has reached.",
            ["model"], registry=r)
        self.stale = Gauge(
            "remote_mvc_cluster_stale", "1 while this replica cannot confirm its state with etcd (reads may be "
            "stale, writes are refused).", ["model"], registry=r)
        self.txn_conflicts = Counter(
            "remote_mvc_cluster_txn_conflicts", "etcd transactions whose compare failed (another replica wrote "
            "first, or a request id already existed).", ["model"], registry=r)
        self.txn_retries = Counter(
            "remote_mvc_cluster_txn_retries", "etcd transactions tried again after a conflict or an unanswered "
            "call.", ["model"], registry=r)
        self.cluster_resets = Counter(
            "remote_mvc_cluster_resets", "Times a replica reloaded the model from etcd and made its viewers "
            "resnapshot, by reason (epoch, gap).", ["model", "reason"], registry=r)
        self.elected = Gauge(
            "remote_mvc_cluster_elected", "1 while this process holds an election it takes part in (the active "
            "ticker).", ["election"], registry=r)
        # the web gateway (remote_mvc.gateway): its HTTP stream clients
        self.gateway_clients = Gauge(
            "remote_mvc_gateway_clients", "Event-stream (SSE) clients connected to the gateway.", ["model"],
            registry=r)
        self.gateway_events_sent = Counter(
            "remote_mvc_gateway_events_sent", "Change events written to stream clients.", ["model"], registry=r)
        self.gateway_resumes = Counter(
            "remote_mvc_gateway_resumes", "Streams resumed exactly from a revision, by source (ring or history).",
            ["model", "source"], registry=r)
        self.gateway_snapshots = Counter(
            "remote_mvc_gateway_snapshots", "Snapshot events sent to stream clients, by reason.",
            ["model", "reason"], registry=r)
        self.gateway_slow_dropped = Counter(
            "remote_mvc_gateway_slow_clients_dropped", "Stream clients dropped for not reading in time.",
            ["model"], registry=r)
        self.gateway_requests = Counter(
            "remote_mvc_gateway_requests", "HTTP requests answered by the gateway, by route and status.",
            ["route", "status"], registry=r)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class _Handler(WSGIRequestHandler):
    """wsgiref's handler, quiet (scrapes stay out of the logs)."""

    def log_message(self, *args: object) -> None:
        pass


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most ``max_connections`` of them, each with a socket timeout."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[WSGIRequestHandler], *,
                 timeout: float = 5.0, max_connections: int = 16) -> None:
        self.connection_timeout = timeout
        self.max_connections = max_connections
        self.refused = 0  # connections closed at once because max_connections were being served
        self.timed_out = 0  # connections closed because the peer went silent
        self._slots = threading.BoundedSemaphore(max_connections)
        self._count_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with self._count_lock:
                self.refused += 1
            self.shutdown_request(request)
            return
        request.settimeout(self.connection_timeout)
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start: give the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a peer that went silent or hung up is normal input, not a traceback on stderr
        with self._count_lock:
            self.timed_out += 1


class MetricsServer:
    """Serve ``/metrics`` and ``/healthz`` in a daemon thread (started by :meth:`start`)."""

    def __init__(self, metrics: Metrics, host: str = "0.0.0.0", port: int = 0,
                 healthy: Callable[[], bool] = lambda: True, *, timeout: float = 5.0,
                 max_connections: int = 16) -> None:
        self.metrics = metrics
        self.healthy = healthy
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._server = make_server(host, port, self._app, server_class=_make_server_class(timeout, max_connections),
                                   handler_class=_Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/healthz":
            ok = self.healthy()
            body = b"ok\n" if ok else b"unhealthy\n"
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self._server.server_address[1]

    @property
    def refused(self) -> int:
        """Connections closed at once because ``max_connections`` were being served."""
        return self._server.refused

    @property
    def timed_out(self) -> int:
        """Connections closed because the peer stayed silent past the timeout (or broke off)."""
        return self._server.timed_out

    def start(self) -> MetricsServer:
        """Serve ``/metrics`` and ``/healthz`` from a background thread; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()


def _make_server_class(timeout: float, max_connections: int) -> type[_BoundedServer]:
    """wsgiref's make_server takes a class, not arguments: bind them in a subclass."""

    class Server(_BoundedServer):
        def __init__(self, address: tuple[str, int], handler: type[WSGIRequestHandler]) -> None:
            super().__init__(address, handler, timeout=timeout, max_connections=max_connections)

    return Server
