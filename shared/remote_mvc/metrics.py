"""Prometheus metrics and the small HTTP server every process runs.

:class:`Metrics` owns its :class:`~prometheus_client.CollectorRegistry`, so tests
pass a fresh one and read values back without global state. :class:`MetricsServer`
serves ``/metrics`` (Prometheus text format) and ``/healthz`` (200 when the
service says it is healthy, 503 otherwise) on one port.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["Metrics", "MetricsServer", "LATENCY_BUCKETS"]

# Sub-millisecond resolution at the fast end, seconds at the slow end.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class Metrics:
    """Every metric remote-mvc exports, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
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
        return generate_latest(self.registry)


class MetricsServer:
    """Serve ``/metrics`` and ``/healthz`` in a daemon thread."""

    def __init__(self, metrics: Metrics, host: str = "0.0.0.0", port: int = 0,
                 healthy: Callable[[], bool] = lambda: True) -> None:
        self.metrics = metrics
        self.healthy = healthy
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, outer.metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = outer.healthy()
                    self._reply(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", "text/plain")
                else:
                    self._reply(404, b"not found\n", "text/plain")

            def _reply(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # keep scrapes out of the logs
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
