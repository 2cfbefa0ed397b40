"""The cluster stack in containers (docker-compose.yml + docker-compose.cluster.yml): 3 etcd members
(Debian's etcd-server, built from the local base image), 3 model replicas, 2 tickers, 3 viewers,
Prometheus scraping the replicas and the etcd members. A change reaches every viewer, through
several replicas: the replica serving viewers is killed and they move on.

Run with a tag of your own on a shared engine: ``E2E_TAG=etcd pytest tests/e2e/test_e2e_cluster.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from conftest import E2E_TAG
from e2e_stack import MODEL, REPO, Stack, log, wait_until

pytestmark = pytest.mark.e2e

ETCD_IMAGE = f"remote-mvc/etcd:{E2E_TAG}"
CLUSTER_FILE = REPO / "docker-compose.cluster.yml"


@pytest.fixture(scope="module")
def cluster(e2e_images, tmp_path_factory):
    variables = {**e2e_images, "ETCD_IMAGE": ETCD_IMAGE, "VIEWERS": "3", "PROMETHEUS_PORT": "",
                 "PROMETHEUS_BIND": "127.0.0.1", "MVC_LEASE_SECONDS": "6", "MVC_TICKER_INTERVAL": "0.5"}
    s = Stack(f"mvce2ecl{uuid.uuid4().hex[:8]}", variables, tmp_path_factory.mktemp("env"),
              overrides=[CLUSTER_FILE])
    reuse = os.environ.get("E2E_REUSE_IMAGES") == "1" and subprocess.run(
        ["docker", "image", "inspect", ETCD_IMAGE], capture_output=True).returncode == 0
    if not reuse:
        if variables.get("BASE_IMAGE", "unused") == "unused":
            variables["BASE_IMAGE"] = subprocess.run(["bash", "docker/base-image.sh"], cwd=REPO, text=True,
                                                     capture_output=True, check=True).stdout.split()[-1]
            s = Stack(s.project, variables, tmp_path_factory.mktemp("env"), overrides=[CLUSTER_FILE])
        log(f"building {ETCD_IMAGE}")
        s.compose("build", "etcd-1", timeout=1200)
    try:
        with s.running():
            yield s
    finally:
        left = s.leftovers()
        if any(left.values()):
            print(f"WARNING: left behind by {s.project}: {left}", file=sys.stderr)


def serving(stack: Stack) -> dict[str, int]:
    """Model replica container -> viewers it serves now (from its own metrics, via Prometheus)."""
    rows = stack.prom(f'remote_mvc_viewers_connected{{job="model", model="{MODEL}"}}')
    return {r["metric"]["instance"]: int(float(r["value"][1])) for r in rows}


def test_three_etcd_members_three_model_replicas_and_prometheus_scrapes_them(cluster):
    assert len(cluster.wait_healthy("model", count=3)) == 3
    etcd = [svc for svc in ("etcd-1", "etcd-2", "etcd-3") if cluster.containers(svc)]
    assert etcd == ["etcd-1", "etcd-2", "etcd-3"]
    wait_until(lambda: cluster.prom_value('count(up{job="etcd"} == 1)') == 3, timeout=90,
               what="Prometheus scraping 3 etcd members")
    wait_until(lambda: cluster.prom_value('count(up{job="model"} == 1)') == 3, timeout=90,
               what="Prometheus scraping 3 model replicas")
    assert cluster.prom_value('max(etcd_server_has_leader)') == 1


def test_a_change_reaches_every_viewer_through_several_replicas(cluster):
    first = cluster.set(name="cluster", value=1)
    cluster.wait_viewers_at(first, {"name": "cluster", "value": 1})
    wait_until(lambda: sum(serving(cluster).values()) == 3, timeout=60, what="3 viewers counted by replicas")
    before = {k: v for k, v in serving(cluster).items() if v}
    victim_ip = sorted(before)[0].split(":")[0]
    victim = next(c for c in cluster.containers("model")
                  if victim_ip in str(cluster.inspect(c)["NetworkSettings"]["Networks"]))
    subprocess.run(["docker", "kill", victim], capture_output=True, check=True)
    second = cluster.set(name="moved", value=2)  # through a replica that is alive
    cluster.wait_viewers_at(second, {"name": "moved", "value": 2}, timeout=90)

    def after() -> dict[str, int] | None:
        now = {k: v for k, v in serving(cluster).items() if v and not k.startswith(victim_ip + ":")}
        return now if sum(now.values()) == 3 else None

    moved = wait_until(after, timeout=90, what="the victim's viewers served by the other replicas")
    assert len(set(before) | set(moved)) >= 2  # the viewers were served through several replicas
    snap = cluster.snapshot()
    assert snap["values"] == {"name": "moved", "value": 2} and snap["stale"] is False
