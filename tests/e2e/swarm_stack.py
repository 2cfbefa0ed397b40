"""Drive a remote-mvc stack on a real single-node Docker Swarm from tests (deploy/swarm/swarm.sh,
what `make swarm-deploy` / `make swarm-rm` run): its tasks' containers, the controller task,
Prometheus through it, controllers under load, and the check that nothing acknowledged was lost.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from e2e_stack import REPO, clean_env, log, parse_json_lines, sh, wait_until

sys.path.insert(0, str(REPO / "tests" / "chaos"))
from chaos_kit import INSIDE, check_sequence  # noqa: E402

SWARM_SH = REPO / "deploy" / "swarm" / "swarm.sh"


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
        self.stack, self.prefix, self.duration = stack, prefix, duration
        self.records: list[dict[str, Any]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)

    def start(self) -> Load:
        """Run the load in the controller task and start reading its records."""
        self.proc = subprocess.Popen(
            ["docker", "exec", "-i", self.stack.controller(), "python3", "-c", INSIDE, "load", "--prefix",
             self.prefix, "--rate", "5", "--duration", str(self.duration), "--retry", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=clean_env())
        self.reader.start()
        return self

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



def ensure_etcd_image(image: str, base: str) -> None:
    """Build the etcd image (docker/etcd.Dockerfile) under ``image`` unless it exists."""
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0:
        return
    if base == "unused":
        base = sh(["bash", "docker/base-image.sh"], timeout=1200).stdout.split()[-1]
    log(f"building {image}")
    sh(["docker", "build", "-q", "-t", image, "--build-arg", f"BASE_IMAGE={base}",
        "-f", "docker/etcd.Dockerfile", "docker"], timeout=1200)


@contextlib.contextmanager
def deployed(images: dict[str, str], etcd_image: str, state_dir: Path,
             extra: dict[str, str] | None = None) -> Iterator[SwarmStack]:
    """Deploy a stack with a unique name (swarm.sh inits a swarm when there is none), yield it, and
    always remove it with its volumes; the engine ends in the swarm state it had."""
    before = swarm_state()
    assert before in ("inactive", "active"), f"engine swarm state {before!r}: not touching it"
    ensure_etcd_image(etcd_image, images.get("BASE_IMAGE", "unused"))
    name = f"mvcsw{uuid.uuid4().hex[:6]}"
    env = clean_env({
        "STACK": name, "STATE_DIR": str(state_dir), "PY": sys.executable,
        "REMOTE_MVC_IMAGE": images["REMOTE_MVC_IMAGE"], "PROMETHEUS_IMAGE": images["PROMETHEUS_IMAGE"],
        "ALERTMANAGER_IMAGE": images["ALERTMANAGER_IMAGE"], "ETCD_IMAGE": etcd_image,
        "VIEWERS": "3", "MODEL_REPLICAS": "3", "TICKER_REPLICAS": "2",
        "MVC_LEASE_SECONDS": "6", "MVC_TICKER_INTERVAL": "0.5", "DEPLOY_TIMEOUT": "300",
        **(extra or {}),
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
        # a failed rm must not leave the engine in swarm mode -- unless other stacks run on it
        if before == "inactive" and swarm_state() == "active" and not sh(
                ["docker", "stack", "ls", "--format", "{{.Name}}"], check=False).stdout.strip():
            sh(["docker", "swarm", "leave", "--force"], check=False)
