"""The stack on a real single-node Docker Swarm (deploy/swarm/stack.yml through deploy/swarm/swarm.sh,
what `make swarm-deploy` / `make swarm-rm` run).

The module deploys one stack with a unique name; swarm.sh initialises a single-node swarm when the
engine is in none and leaves it again at removal (the test checks the engine ends as it began).
In order: every service runs and Prometheus finds every task; viewers scale 3 -> 10 -> 3 and a
change from the controller task reaches every viewer task; a model-replica task killed under load
is restarted by Swarm with nothing acknowledged lost; a rolling update of the model service while
a controller writes loses nothing; removing the stack leaves no service, network, secret or config
(and, with SWARM_VOLUMES=1, no volume).

Run with a tag of your own on a shared engine: ``E2E_TAG=swarm pytest tests/e2e/test_e2e_swarm.py``.
"""

from __future__ import annotations

import pytest
from conftest import E2E_TAG
from e2e_stack import sh, wait_until
from swarm_stack import Load, assert_nothing_lost, deployed, swarm_state

pytestmark = pytest.mark.e2e

ETCD_IMAGE = f"remote-mvc/etcd:{E2E_TAG}"


@pytest.fixture(scope="module")
def swarm(e2e_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    with deployed(e2e_images, ETCD_IMAGE, tmp_path_factory.mktemp("swarm")) as stack:
        yield stack


def test_every_service_runs_and_prometheus_finds_every_task(swarm):
    for service, count in (("etcd-1", 1), ("etcd-2", 1), ("etcd-3", 1), ("nameserver", 1), ("model", 3),
                           ("ticker", 2), ("viewer", 3), ("gateway", 1), ("controller", 1),
                           ("prometheus", 1), ("alertmanager", 1)):
        assert swarm.replicas(service) == (count, count), service
    swarm.healthy("model", 3)
    hosts = {sh(["docker", "inspect", "--format", "{{.Config.Hostname}}", c]).stdout.strip()
             for c in swarm.healthy("viewer", 3)}
    assert hosts == {"viewer-1", "viewer-2", "viewer-3"}  # a stable identity per task slot
    for job, count in (("model", 3), ("viewer", 3), ("etcd", 3), ("ticker", 2)):
        wait_until(lambda job=job, count=count: swarm.prom_value(f'count(up{{job="{job}"}} == 1)') == count,
                   timeout=90, what=f"Prometheus scraping {count} {job} task(s)")
    # the credentials are a Docker secret, never in a task's environment
    env = sh(["docker", "inspect", "--format", "{{json .Config.Env}}", swarm.controller()]).stdout
    assert "MVC_CREDENTIALS_FILE=/run/secrets/credentials.json" in env and "secret" not in env.replace(
        "/run/secrets/", "")


def test_scale_viewers_3_10_3_and_a_change_reaches_every_task(swarm):
    sh(["docker", "service", "scale", "--detach", f"{swarm.name}_viewer=10"])
    swarm.healthy("viewer", 10, timeout=240)
    rev = swarm.set(name="ten", value=10)
    ids = swarm.wait_viewers_at(rev, 10)
    assert len(ids) == 10
    wait_until(lambda: swarm.prom_value('count(up{job="viewer"} == 1)') == 10, timeout=90,
               what="Prometheus scraping 10 viewers")
    sh(["docker", "service", "scale", "--detach", f"{swarm.name}_viewer=3"])
    swarm.healthy("viewer", 3, timeout=180)
    rev = swarm.set(name="three", value=3)
    swarm.wait_viewers_at(rev, 3)
    wait_until(lambda: swarm.prom_value('count(up{job="viewer"} == 1)') == 3, timeout=90,
               what="Prometheus scraping 3 viewers again")


def test_a_killed_model_task_is_restarted_and_nothing_acknowledged_is_lost(swarm):
    since = swarm.set(name="before-kill", value=1)
    swarm.wait_viewers_at(since, 3)
    load = Load(swarm, "kill", duration=25).start()
    wait_until(lambda: len(load.acked()) >= 10, timeout=60, what="10 acknowledged changes")
    victim = swarm.containers("model")[0]
    sh(["docker", "kill", victim])
    wait_until(lambda: victim not in swarm.containers("model") and len(swarm.containers("model")) == 3,
               timeout=120, what="Swarm replacing the killed model task")
    attempts = load.wait()
    swarm.healthy("model", 3)
    assert_nothing_lost(swarm, attempts, since)


def test_rolling_update_of_the_model_while_writing_loses_nothing(swarm):
    since = swarm.set(name="before-update", value=2)
    swarm.wait_viewers_at(since, 3)
    old = set(swarm.containers("model"))
    load = Load(swarm, "upd", duration=60).start()
    wait_until(lambda: len(load.acked()) >= 10, timeout=60, what="10 acknowledged changes")
    # start-first (stack.yml): one new replica healthy before an old one stops, one at a time
    sh(["docker", "service", "update", "--force", "--update-order", "start-first",
        f"{swarm.name}_model"], timeout=400)
    new = set(swarm.healthy("model", 3))
    assert not (old & new), "every model task was replaced"
    attempts = load.wait()
    assert_nothing_lost(swarm, attempts, since)


def test_stack_rm_leaves_nothing_and_the_engine_as_it_was(swarm):
    """Runs last: removes the stack itself and checks what is left (the fixture's rm is then a no-op)."""
    label = f"label=com.docker.stack.namespace={swarm.name}"
    swarm.script("rm", extra={"SWARM_VOLUMES": "1"}, timeout=300)
    for kind in ("service", "network", "secret", "config", "volume"):
        if kind in ("service", "secret", "config") and swarm_state() != "active":
            continue  # the swarm was left: nothing of these kinds can exist any more
        left = sh(["docker", kind, "ls", "-q", "--filter", label]).stdout.split()
        assert not left, f"{kind}s left by {swarm.name}: {left}"
    assert not sh(["docker", "ps", "-aq", "--filter", label]).stdout.split()
    assert swarm_state() == swarm.engine_before  # left the swarm only if the deploy created it
