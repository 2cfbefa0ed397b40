import io
import json
import logging
import socket
import urllib.error
import urllib.request

import pytest

from remote_mvc import AuditLog, Metrics, MetricsServer, ModelServer, configure_logging, log_event
from remote_mvc._store import Store
from remote_mvc.ticker import Ticker, TickerModel, next_due


def test_next_due_does_not_drift():
    assert next_due(0.0, 1.0, 0.0) == 1.0
    assert next_due(0.0, 1.0, 0.999) == 1.0
    assert next_due(0.0, 1.0, 1.0) == 2.0
    assert next_due(10.0, 0.5, 13.26) == 13.5  # late wake-ups don't push later ticks back
    assert abs(next_due(0.0, 0.1, 1000.05) - 1000.1) < 1e-9


def test_ticker_steps_and_pauses(tmp_path):
    m = ModelServer("t", TickerModel, Store(tmp_path / "t.db"), AuditLog(tmp_path / "a"), Metrics()).start()
    t = Ticker(m, wall=lambda: 42.0, seed=1)
    assert t.step() == 1
    v = m.query()
    assert v["tick"] == 1 and v["time"] == 42.0 and v["price"] > 0
    m.modify({"paused": True})
    assert t.step() is None
    assert m.query()["tick"] == 1
    m.close()


def test_json_logs_have_the_fields_that_matter():
    stream = io.StringIO()
    handler = configure_logging("svc", "INFO", stream)
    try:
        log = logging.getLogger("remote_mvc.test")
        log_event(log, "refresh", "Received a refresh notification from the server", viewer_id="v1",
                  revision=3, name="reserved-word")
        line = json.loads(stream.getvalue().splitlines()[-1])
    finally:
        logging.getLogger().removeHandler(handler)
    assert line["service"] == "svc" and line["level"] == "INFO" and line["logger"] == "remote_mvc.test"
    assert line["event"] == "refresh" and line["viewer_id"] == "v1" and line["revision"] == 3
    assert line["name_"] == "reserved-word"
    assert line["timestamp"].endswith("+00:00") and "T" in line["timestamp"]


def test_metrics_server_serves_metrics_and_health():
    metrics = Metrics()
    metrics.viewers_connected.labels("m").set(3)
    metrics.notification_latency.labels("m").observe(0.0004)
    healthy = [True]
    server = MetricsServer(metrics, "127.0.0.1", 0, healthy=lambda: healthy[0]).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        text = urllib.request.urlopen(base + "/metrics").read().decode()
        assert 'remote_mvc_viewers_connected{model="m"} 3.0' in text
        assert 'remote_mvc_notification_latency_seconds_bucket{le="0.0005",model="m"} 1.0' in text
        assert urllib.request.urlopen(base + "/healthz").status == 200
        healthy[0] = False
        try:
            urllib.request.urlopen(base + "/healthz")
            raise AssertionError("expected 503")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
    finally:
        server.stop()


def test_metrics_registry_has_process_platform_and_gc_collectors():
    text = Metrics().exposition().decode()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "python_info", "python_gc_collections_total"):
        assert f"\n{name}" in text, name
    assert "process_cpu_seconds_total" not in Metrics(runtime_collectors=False).exposition().decode()


def test_metrics_server_cuts_off_silent_connections_and_bounds_them():
    """Silent peers cannot hold the server's threads: beyond max_connections a connection is closed
    at once, and each silent one is closed when its socket timeout runs out; scrapes work again."""
    server = MetricsServer(Metrics(), "127.0.0.1", 0, timeout=0.5, max_connections=3).start()
    silent = []
    try:
        for _ in range(3):
            silent.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        assert extra.recv(1) == b""  # closed by the server at once: no slot free
        extra.close()
        assert server.refused == 1
        for sock in silent:  # each silent connection is closed by the server when its timeout runs out
            assert sock.recv(1) == b""
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10).read().decode()
        assert "process_cpu_seconds_total" in text
        assert server.timed_out == 3 and server.refused == 1
    finally:
        for sock in silent:
            sock.close()
        server.stop()


def test_metrics_server_unknown_path_and_name_filter():
    metrics = Metrics()
    metrics.viewers_connected.labels("m").set(2)
    server = MetricsServer(metrics, "127.0.0.1", 0).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/nothing", timeout=10)
        assert err.value.code == 404
        text = urllib.request.urlopen(base + "/metrics?name[]=remote_mvc_viewers_connected", timeout=10).read()
        assert b'remote_mvc_viewers_connected{model="m"} 2.0' in text and b"process_cpu" not in text
    finally:
        server.stop()
