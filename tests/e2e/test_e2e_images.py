"""The images: every service starts and becomes healthy; the Prometheus config is valid."""

from __future__ import annotations

import json

import pytest
from e2e_stack import REPO, SERVICES, sh

pytestmark = pytest.mark.e2e


def test_every_service_container_becomes_healthy(stack):
    for service in SERVICES:
        ids = stack.wait_healthy(service, timeout=60)
        expected = 3 if service == "viewer" else 1
        assert len(ids) == expected, f"{service}: {len(ids)} containers"
        for cid in ids:
            state = stack.inspect(cid)
            assert state["State"]["Running"], f"{service} not running"
            assert state["HostConfig"]["Init"] is True, f"{service} runs without an init process"
    # The image: non-root, health check wired to the cheap probe, every entry point installed.
    model = stack.containers("model")[0]
    image = json.loads(sh(["docker", "image", "inspect", stack.variables["REMOTE_MVC_IMAGE"]]).stdout)[0][
        "Config"
    ]
    assert image["User"] == "mvc"
    assert image["Healthcheck"]["Test"][-1:] == ["mvc-healthz"]
    out = sh(
        [
            "docker",
            "exec",
            model,
            "sh",
            "-c",
            "id -u; for c in remote-mvc-nameserver remote-mvc-model remote-mvc-ticker remote-mvc-viewer "
            "remote-mvc-ctl; do command -v $c; done; remote-mvc-ctl health; mvc-healthz",
        ]
    ).stdout.split()
    assert out[0] != "0", "services must not run as root"
    assert [p.rsplit("/", 1)[-1] for p in out[1:6]] == [
        "remote-mvc-nameserver",
        "remote-mvc-model",
        "remote-mvc-ticker",
        "remote-mvc-viewer",
        "remote-mvc-ctl",
    ]
    # Viewers publish no host ports; only Prometheus does (on loopback).
    for cid in stack.containers("viewer"):
        assert not any(
            stack.inspect(cid)["NetworkSettings"]["Ports"].get(p) for p in ("9093/tcp", "9100/tcp")
        )
    assert stack.prometheus_url().startswith("http://127.0.0.1:")


def test_prometheus_config_and_rules_pass_promtool(e2e_images):
    """promtool (from the Prometheus image) checks the repo's ops/prometheus files as they are now."""
    image = e2e_images["PROMETHEUS_IMAGE"]
    mount = ["-v", f"{REPO / 'ops' / 'prometheus'}:/etc/prometheus:ro"]
    base = ["docker", "run", "--rm", "--network", "none", *mount, "--entrypoint", "promtool", image]
    out = sh([*base, "check", "config", "/etc/prometheus/prometheus.yml"]).stdout
    assert "SUCCESS" in out
    assert "SUCCESS" in sh([*base, "check", "rules", "/etc/prometheus/rules.yml"]).stdout
    # Unit tests of the recording rules and alerts (ops/prometheus/rules_test.yml).
    sh([*base, "test", "rules", "/etc/prometheus/rules_test.yml"])


def test_grafana_dashboard_is_valid_json():
    dashboards = sorted((REPO / "ops" / "grafana").glob("*.json"))
    assert dashboards, "no dashboard in ops/grafana"
    for path in dashboards:
        board = json.loads(path.read_text(encoding="utf-8"))
        exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
        assert exprs and all("remote_mvc" in e or "up{" in e for e in exprs), path
