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

import json
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest
from conftest import E2E_TAG
from e2e_stack import REPO, clean_env, log, parse_json_lines, sh, wait_until

sys.path.insert(0, str(REPO / "tests" / "chaos"))
from chaos_kit import INSIDE, check_sequence  # noqa: E402

pytestmark = pytest.mark.e2e

SWARM_SH = REPO / "deploy" / "swarm" / "swarm.sh"
ETCD_IMAGE = f"remote-mvc/etcd:{E2E_TAG}"


def swarm_state() -> str:
    return sh(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"]).stdout.strip()


class SwarmStack:
    """One deployed stack: its tasks' containers, the controller task, Prometheus through it."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.env = env
        self.engine_before = ""  # the engine's swarm state before the deploy (inactive/active)

    def script(self, *args: str, timeout: float = 420, extra: dict[str, str] | None = None) -> str:
        return sh(["bash", str(SWARM_SH), *args], env={**self.env, **(extra or {})}, timeout=timeout).stdout

    def containers(self, service: str) -> list[str]:
        label = f"label=com.docker.swarm.service.name={self.name}_{service}"
        return sorted(sh(["docker", "ps", "-q", "--no-trunc", "--filter", label,
                          "--filter", "status=running"]).stdout.split())

    def replicas(self, service: str) -> tuple[int, int]:
        out = sh(["docker", "service", "ls", "--filter", f"name={self.name}_{service}",
                  "--format", "{{.Name}} {{.Replicas}}"]).stdout
        for line in out.splitlines():
            name, reps = line.split()[:2]
            if name == f"{self.name}_{service}":
                running, _, wanted = reps.partition("/")
                return int(running), int(wanted)
        raise AssertionError(f"no service {self.name}_{service}")

    def healthy(self, service: str, count: int, timeout: float = 180) -> list[str]:
        def probe() -> list[str] | None:
            ids = self.containers(service)
            if len(ids) != count:
                return None
            states = [json.loads(sh(["docker", "inspect", "--format", "{{json .State.Health}}", c]).stdout)
                      for c in ids]
            return ids if all(s and s.get("Status") == "healthy" for s in states) else None
        return wait_until(probe, timeout=timeout, what=f"{count} healthy {service} task(s)")

    def controller(self) -> str:
        return wait_until(lambda: (self.containers("controller") or [None])[0], timeout=60,
                          what="the controller task")

    def exec(self, *cmd: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return sh(["docker", "exec", "-i", self.controller(), *cmd], timeout=timeout)

    def set(self, **values: Any) -> int:
        out = self.exec("remote-mvc-ctl", "--json", "set", *(f"{k}={v}" for k, v in values.items())).stdout
        return int(json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])["revision"])

    def prom_value(self, expr: str) -> float | None:
        code = ("import json, sys, urllib.parse, urllib.request; print(urllib.request.urlopen("
                "'http://prometheus:9090/api/v1/query?' + urllib.parse.urlencode({'query': sys.argv[1]}),"
                " timeout=5).read().decode())")
        body = json.loads(self.exec("python3", "-c", code, expr).stdout)
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def refreshes(self, container: str) -> list[dict[str, Any]]:
        proc = sh(["docker", "logs", container], check=False)
        return parse_json_lines(proc.stdout + "\n" + proc.stderr)

    def viewer_revision(self, container: str) -> int:
        revs = [r["revision"] for r in self.refreshes(container) if r.get("event") == "refresh"]
        return max(revs, default=-1)

    def wait_viewers_at(self, revision: int, count: int, timeout: float = 90) -> list[str]:
        def probe() -> list[str] | None:
            ids = self.containers("viewer")
            if len(ids) != count:
                return None
            return ids if all(self.viewer_revision(c) >= revision for c in ids) else None
        return wait_until(probe, timeout=timeout, what=f"{count} viewer task(s) at revision {revision}")

    def state(self, since: int) -> dict[str, Any]:
        out = self.exec("python3", "-c", INSIDE, "state", "--since", str(since), timeout=120).stdout
        return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])


class Load:
    """A controller in the controller task (inside.py load): every attempt and its outcome."""

    def __init__(self, stack: SwarmStack, prefix: str, duration: float) -> None:
        self.proc = subprocess.Popen(
            ["docker", "exec", "-i", stack.controller(), "python3", "-c", INSIDE, "load", "--prefix", prefix,
             "--rate", "5", "--duration", str(duration), "--retry", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=clean_env())
        self.records: list[dict[str, Any]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.records.extend(parse_json_lines(line))

    def acked(self) -> list[dict[str, Any]]:
        return [r for r in list(self.records) if r.get("kind") == "attempt" and "revision" in r]

    def wait(self, timeout: float = 180) -> list[dict[str, Any]]:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(10)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        assert code == 0 and any(r.get("kind") == "done" for r in self.records), f"load exited {code}: {err[-2000:]}"
        return [r for r in self.records if r.get("kind") == "attempt"]


def assert_nothing_lost(stack: SwarmStack, attempts: list[dict[str, Any]], since: int) -> None:
    """Every acknowledged change is in the model's history with its marker, and every viewer task
    applied every revision from ``since`` on, in order, without gaps (its own log)."""
    acked = [a for a in attempts if "revision" in a]
    assert acked, f"no acknowledged attempt: {attempts[:5]}"
    errors = [a for a in attempts if "error" in a]
    assert not errors, f"attempts refused or failed: {errors[:5]}"
    state = stack.state(since)
    by_rev = {h["revision"]: h for h in state["history"]}
    for a in acked:
        entry = by_rev.get(a["revision"])
        assert entry is not None and json.dumps(entry).count(a["marker"]), f"acknowledged {a} missing: {entry}"
    top = max(a["revision"] for a in acked)
    ids = stack.wait_viewers_at(top, 3)
    for cid in ids:
        report = check_sequence(stack.refreshes(cid), from_revision=since)
        assert not report.problems, f"viewer {cid[:12]}: {report.problems}"
        assert report.last is not None and report.last >= top


@pytest.fixture(scope="module")
def swarm(e2e_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    before = swarm_state()
    assert before in ("inactive", "active"), f"engine swarm state {before!r}: not touching it"
    if subprocess.run(["docker", "image", "inspect", ETCD_IMAGE], capture_output=True).returncode != 0:
        base = e2e_images.get("BASE_IMAGE", "unused")
        if base == "unused":
            base = sh(["bash", "docker/base-image.sh"], timeout=1200).stdout.split()[-1]
        log(f"building {ETCD_IMAGE}")
        sh(["docker", "build", "-q", "-t", ETCD_IMAGE, "--build-arg", f"BASE_IMAGE={base}",
            "-f", "docker/etcd.Dockerfile", "docker"], timeout=1200)
    name = f"mvcsw{uuid.uuid4().hex[:6]}"
    env = clean_env({
        "STACK": name, "STATE_DIR": str(tmp_path_factory.mktemp("swarm")), "PY": sys.executable,
        "REMOTE_MVC_IMAGE": e2e_images["REMOTE_MVC_IMAGE"], "PROMETHEUS_IMAGE": e2e_images["PROMETHEUS_IMAGE"],
        "ALERTMANAGER_IMAGE": e2e_images["ALERTMANAGER_IMAGE"], "ETCD_IMAGE": ETCD_IMAGE,
        "VIEWERS": "3", "MODEL_REPLICAS": "3", "TICKER_REPLICAS": "2",
        "MVC_LEASE_SECONDS": "6", "MVC_TICKER_INTERVAL": "0.5", "DEPLOY_TIMEOUT": "300",
    })
    stack = SwarmStack(name, env)
    stack.engine_before = before
    started = time.monotonic()
    try:
        log(f"deploying swarm stack {name} (engine swarm state before: {before})")
        out = stack.script("deploy")
        assert ("initialised a single-node swarm" in out) == (before == "inactive"), out
        log(f"{name} running in {time.monotonic() - started:.0f}s")
        yield stack
    finally:
        log(f"removing swarm stack {name}")
        stack.script("rm", extra={"SWARM_VOLUMES": "1"}, timeout=300)
        if before == "inactive" and swarm_state() == "active":  # a failed rm must not leave swarm mode
            sh(["docker", "swarm", "leave", "--force"], check=False)


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
    load = Load(swarm, "kill", duration=25)
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
    load = Load(swarm, "upd", duration=60)
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
