"""docker/healthz.sh (the containers' health check, `mvc-healthz`) against a real MetricsServer:
200 is healthy, 503 and no listener are not, and a server that never answers cannot hang it."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from remote_mvc import Metrics, MetricsServer

PROBE = Path(__file__).resolve().parents[2] / "docker" / "healthz.sh"


def probe(port: int, timeout: str = "5") -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "MVC_METRICS_PORT": str(port), "HEALTHZ_TIMEOUT": timeout}
    return subprocess.run(["bash", str(PROBE)], env=env, capture_output=True, text=True, timeout=30)


def test_probe_follows_the_health_endpoint():
    healthy = [True]
    server = MetricsServer(Metrics(), "127.0.0.1", 0, healthy=lambda: healthy[0]).start()
    try:
        out = probe(server.port)
        assert out.returncode == 0 and out.stdout.strip() == "ok"
        healthy[0] = False
        out = probe(server.port)
        assert out.returncode == 1 and out.stdout.strip() == "unhealthy: HTTP 503"
    finally:
        server.stop()
    out = probe(server.port)  # nobody listens any more
    assert out.returncode == 1 and out.stdout.startswith("unavailable")


def test_probe_gives_up_on_a_server_that_accepts_and_never_answers():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        out = probe(silent.getsockname()[1], timeout="1")
    assert out.returncode == 1 and out.stdout.strip() == "unhealthy: no reply"
