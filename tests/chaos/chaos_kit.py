"""The chaos tests' toolkit: a compose stack with fault injection, probes and measurements.

:class:`ChaosStack` is tests/e2e's :class:`~e2e_stack.Stack` (same compose file, isolated
environment, complete teardown) plus ``docker-compose.chaos.yml`` and what fault tests need:

* controllers that really run in the stack (``docker compose run controller python -c
  inside.py load``), one container each, reporting every attempt and its outcome;
* the model's state as clients see it (snapshot, complete history, viewers, name server
  registrations), its audit log, its /metrics, and its process' threads, RSS, fds and TCP
  sockets read from /proc inside the container;
* every viewer's received revisions, read back from its JSON log (one ``refresh`` line per
  applied revision; snapshots say so), checked for order and gaps, and timed against the
  change events' own timestamps (same host clock) for notification latency.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import math
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from e2e_stack import MODEL, REPO, TICKER, Stack, parse_json_lines, sh, wait_until

__all__ = ["DOCKER_QUIRKS", "ChaosStack", "ContainerLogs", "ControllerRun", "chaos_stack", "check_sequence", "free_subnet", "log",
           "percentiles", "MODEL", "TICKER", "wait_until"]

HERE = Path(__file__).resolve().parent
CHAOS_OVERRIDE = REPO / "docker-compose.chaos.yml"
INSIDE = (HERE / "inside.py").read_text(encoding="utf-8")
AUDIT_PATH = "/var/log/remote-mvc/audit.jsonl"

# Runs in a service container: the /proc figures of the process whose argv[1] is the given command.
_PROC_STATS = r"""
import json, os, sys
want, me = sys.argv[1], os.getpid()
pid = None
for p in os.listdir("/proc"):
    if not p.isdigit() or int(p) == me:
        continue
    try:
        argv = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    if len(argv) > 1 and argv[1].decode(errors="replace").rsplit("/", 1)[-1] == want:
        pid = p
        break
if pid is None:
    sys.exit(f"no process runs {want}")
status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)
kb = lambda k: int(status[k].split()[0])
tcp = {}
for name in ("tcp", "tcp6"):
    try:
        rows = open(f"/proc/{pid}/net/{name}").read().splitlines()[1:]
    except OSError:
        continue
    for row in rows:
        st = row.split()[3]
        tcp[st] = tcp.get(st, 0) + 1
print(json.dumps({"pid": int(pid), "threads": int(status["Threads"]), "rss_mb": kb("VmRSS") / 1024,
                  "peak_rss_mb": kb("VmHWM") / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")),
                  "tcp_established": tcp.get("01", 0), "tcp_close_wait": tcp.get("08", 0),
                  "tcp_listen": tcp.get("0A", 0)}))
"""

_METRICS = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
            "'http://127.0.0.1:9100/metrics', timeout=5).read().decode())")

_LOOKUP = r"""
import json
from remote_mvc import Settings
from remote_mvc.pyro.naming import locate_ns
ns = locate_ns(Settings.from_env(), timeout=2)
print(json.dumps({k: str(v) for k, v in ns.list().items()}))
"""


DOCKER_QUIRKS: list[str] = []  # Docker daemon misbehaviour seen during the run (reported, see chaos_stack)


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ts(iso: str) -> float:
    """A log record's ISO-8601 timestamp as Unix seconds."""
    return datetime.fromisoformat(iso).timestamp()


def percentiles(values: Iterable[float], *qs: float) -> list[float | None]:
    """Nearest-rank percentiles (q in 0..100) of the values; None when there are none."""
    data = sorted(values)
    if not data:
        return [None for _ in qs]
    return [data[min(len(data) - 1, max(0, math.ceil(q / 100 * len(data)) - 1))] for q in qs]


def latency_summary(values: list[float]) -> dict[str, Any]:
    p50, p99 = percentiles(values, 50, 99)
    return {"n": len(values), "p50_ms": _ms(p50), "p99_ms": _ms(p99), "max_ms": _ms(max(values) if values else None)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


# ---------------------------------------------------------------------------- networks
def free_subnet() -> str:
    """A /24 overlapping no Docker network and no route of this machine."""
    taken: list[ipaddress.IPv4Network] = []
    ids = sh(["docker", "network", "ls", "-q"], check=False).stdout.split()
    if ids:
        for net in json.loads(sh(["docker", "network", "inspect", *ids], check=False).stdout or "[]"):
            for cfg in (net.get("IPAM") or {}).get("Config") or []:
                with contextlib.suppress(ValueError, KeyError):
                    taken.append(ipaddress.ip_network(cfg["Subnet"], strict=False))
    with contextlib.suppress(OSError):
        for row in Path("/proc/net/route").read_text().splitlines()[1:]:
            cols = row.split()
            dest, mask = (ipaddress.IPv4Address(bytes.fromhex(c)[::-1]) for c in (cols[1], cols[7]))
            if int(mask):
                taken.append(ipaddress.ip_network(f"{dest}/{mask}", strict=False))
    candidates = [ipaddress.ip_network(f"10.{a}.{b}.0/24") for a in range(201, 251) for b in range(256)]
    random.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(t) for t in taken if t.version == 4):
            return str(net)
    raise RuntimeError("no free /24 in 10.201.0.0-10.250.255.0")


# ---------------------------------------------------------------------------- viewers' records
@dataclass
class SequenceReport:
    """What one viewer applied, from ``from_revision`` on (see :func:`check_sequence`)."""

    entries: list[dict[str, Any]] = field(default_factory=list)  # revision, snapshot reason, time
    problems: list[str] = field(default_factory=list)
    snapshots: list[tuple[int, str]] = field(default_factory=list)
    restarts: int = 0

    @property
    def last(self) -> int | None:
        return self.entries[-1]["revision"] if self.entries else None

    @property
    def events(self) -> int:
        return sum(1 for e in self.entries if e["snapshot"] is None)


def check_sequence(records: list[dict[str, Any]], from_revision: int = 0, model: str = MODEL) -> SequenceReport:
    """Check a viewer's log: every change applied once, in order, no gap unless a snapshot says so.

    ``records`` are the container's JSON log records (several processes when it restarted:
    each ``service_started`` begins one, and its first state is a snapshot that must not be
    older than what the previous process showed). The check starts at the last entry at or
    before ``from_revision`` (the anchor) so a test looks only at what it caused.
    """
    rep = SequenceReport()
    applied: list[dict[str, Any]] = []
    for r in records:
        if r.get("event") == "service_started":
            applied.append({"restart": True})
        elif r.get("event") == "refresh" and r.get("model", model) == model:
            applied.append({"revision": r["revision"], "snapshot": r.get("snapshot"), "time": ts(r["timestamp"])})
    start = 0
    for i, e in enumerate(applied):
        if "revision" in e and e["revision"] <= from_revision:
            start = i
    prev: int | None = None
    restarted = False
    for e in applied[start:]:
        if "restart" in e:
            restarted = True
            rep.restarts += 1
            continue
        rev, snap = e["revision"], e["snapshot"]
        if snap is not None:
            rep.snapshots.append((rev, snap))
        if prev is not None:
            if restarted or snap is not None:
                if rev < prev:
                    rep.problems.append(f"went back from {prev} to {rev} ({'restart' if restarted else snap})")
            elif rev != prev + 1:
                kind = "gap" if rev > prev + 1 else "repeated or out of order"
                rep.problems.append(f"{kind}: {prev} -> {rev}")
        rep.entries.append(e)
        prev, restarted = rev, False
    return rep


# ---------------------------------------------------------------------------- controllers
class ControllerRun:
    """One controller container running ``inside.py load``; its attempts as they complete."""

    def __init__(self, stack: ChaosStack, prefix: str, args: list[str]) -> None:
        self.stack = stack
        self.prefix = prefix
        self.name = f"{stack.project}-ctl-{prefix}"
        self.cmd = [*stack.compose_argv, "run", "--rm", "-T", "--no-deps", "--name", self.name, "controller",
                    "python", "-c", INSIDE, "load", "--prefix", prefix, *args]
        self.records: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._lock = threading.Lock()
        self._readers = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]

    def start(self) -> ControllerRun:
        """Run the container and start reading its output (the constructor only prepares)."""
        self.proc = subprocess.Popen(self.cmd, env=self.stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True, cwd=REPO)
        for t in self._readers:
            t.start()
        return self

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            for rec in parse_json_lines(line):
                rec["seen"] = time.time()
                with self._lock:
                    self.records.append(rec)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def attempts(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.records if r.get("kind") == "attempt"]

    def acked(self) -> list[dict[str, Any]]:
        return [a for a in self.attempts() if "revision" in a]

    def started(self) -> bool:
        with self._lock:
            return any(r.get("kind") == "start" for r in self.records)

    def stop(self) -> None:
        """SIGTERM to the controller: it finishes the attempt in flight and exits."""
        sh(["docker", "kill", "-s", "TERM", self.name], check=False)

    def wait(self, timeout: float = 120) -> list[dict[str, Any]]:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"controller {self.prefix} still running after {timeout:.0f}s") from None
        for t in self._readers:
            t.join(10)
        done = [r for r in self.records if r.get("kind") == "done"]
        assert code == 0 and done, (f"controller {self.prefix} exited {code} without finishing:\n"
                                    + "".join(self.stderr[-30:]))
        return self.attempts()

    def kill(self) -> None:
        if self.proc.poll() is None:
            sh(["docker", "rm", "-f", self.name], check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
            if self.proc.poll() is None:
                self.proc.kill()


def wait_acks(runs: list[ControllerRun], n: int, timeout: float) -> int:
    return wait_until(lambda: sum(len(r.acked()) for r in runs) >= n and sum(len(r.acked()) for r in runs),
                      timeout=timeout, what=f"{n} acknowledged modifications")


class ContainerLogs:
    """``docker logs --follow`` of containers into files that outlive them: compose removes the
    replicas it scales down, and their logs with them, so what a leaving replica said on its way out
    is only kept if it was followed. ``with ContainerLogs(dir) as logs:`` stops the followers."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._followed: dict[str, tuple[subprocess.Popen[bytes], Any, Path]] = {}

    def __enter__(self) -> ContainerLogs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def follow(self, containers: Iterable[str]) -> None:
        """Follow each container not followed yet (a follower ends when its container is removed)."""
        for container in containers:
            if container in self._followed:
                continue
            path = self.directory / f"{container[:12]}.log"
            out = path.open("wb")
            proc = subprocess.Popen(["docker", "logs", "--follow", container], stdout=out,
                                    stderr=subprocess.STDOUT)
            self._followed[container] = (proc, out, path)

    def of_host(self, hostname: str, last: int = 40) -> str:
        """The last lines logged by the container whose hostname (Docker's default: the short id) this is."""
        for container, (_, out, path) in self._followed.items():
            if container.startswith(hostname):
                out.flush()
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
                return "\n".join(lines[-last:])
        return f"(no followed container has hostname {hostname})"

    def close(self) -> None:
        for proc, out, _ in self._followed.values():
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.close()


# ---------------------------------------------------------------------------- the stack
class ChaosStack(Stack):
    """docker-compose.yml + docker-compose.chaos.yml (+ more overrides), with fault tools."""

    def __init__(self, project: str, variables: dict[str, str], env_dir: Path,
                 overrides: Iterable[Path] = ()) -> None:
        super().__init__(project, variables, env_dir, overrides=[CHAOS_OVERRIDE, *overrides])
        self.network = f"{project}_default"

    # containers ------------------------------------------------------------
    def one(self, service: str) -> str:
        ids = self.containers(service)
        assert len(ids) == 1, f"expected one {service} container, found {ids}"
        return ids[0]

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return sh(["docker", *args], check=check, timeout=timeout)

    def exec(self, container: str, *cmd: str, user: str | None = None, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.docker("exec", *(["-u", user] if user else []), container, *cmd, check=check, timeout=timeout)

    def wait_all_healthy(self, viewers: int, timeout: float = 180) -> None:
        for service in ("nameserver", "model", "ticker"):
            self.wait_healthy(service, count=1, timeout=timeout)
        self.wait_healthy("viewer", count=viewers, timeout=timeout)

    # processes and metrics -------------------------------------------------
    def proc_stats(self, container: str, command: str = "remote-mvc-model") -> dict[str, Any]:
        out = self.exec(container, "python3", "-c", _PROC_STATS, command).stdout
        return json.loads(out.strip().splitlines()[-1])

    def scrape(self, container: str) -> list[tuple[str, dict[str, str], float]]:
        """(name, labels, value) of every sample on the container's /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.exec(container, "python3", "-c", _METRICS, timeout=30).stdout
        return [(s.name, dict(s.labels), float(s.value))
                for family in text_string_to_metric_families(text) for s in family.samples]

    def metric(self, container: str, name: str, samples: list | None = None, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        samples = samples if samples is not None else self.scrape(container)
        return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))

    def lookup(self, container: str) -> dict[str, str]:
        """The name server's registrations, asked from inside ``container`` (has the library)."""
        return json.loads(self.exec(container, "python3", "-c", _LOOKUP, timeout=30).stdout.strip())

    # clients ----------------------------------------------------------------
    def ctl(self, *args: str, env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """``remote-mvc-ctl ARGS`` in a controller container, like Stack.ctl but with --no-deps:
        compose must not refuse to run a client because a health check ran late under load."""
        flags = [item for k, v in (env or {}).items() for item in ("-e", f"{k}={v}")]
        return self.compose("run", "--rm", "-T", "--no-deps", *flags, "controller", "remote-mvc-ctl", *args,
                            timeout=timeout, check=check)

    def inside(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        proc = self.compose("run", "--rm", "-T", "--no-deps", "controller", "python", "-c", INSIDE, *args,
                            timeout=timeout)
        found = parse_json_lines(proc.stdout)
        assert found, f"no output from inside.py {args}: {proc.stderr[-2000:]}"
        return found[-1]

    def state(self, since: int = 0, ticker: bool = False) -> dict[str, Any]:
        return self.inside("state", "--since", str(since), *(["--ticker"] if ticker else []))

    def controller(self, prefix: str, *, rate: float = 5.0, count: int = 0, duration: float = 0.0,
                   retry: float = 60.0, invalid_every: int = 0, conflict_every: int = 0) -> ControllerRun:
        args = ["--rate", str(rate), "--count", str(count), "--duration", str(duration), "--retry", str(retry),
                "--invalid-every", str(invalid_every), "--conflict-every", str(conflict_every)]
        return ControllerRun(self, prefix, args).start()

    # the model's records -----------------------------------------------------
    def audit_text(self) -> str:
        return self.exec(self.one("model"), "cat", AUDIT_PATH).stdout

    def audit(self) -> list[dict[str, Any]]:
        return parse_json_lines(self.audit_text())

    @staticmethod
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # viewers -----------------------------------------------------------------
    def viewer_id(self, container: str) -> str:
        subscribed = self.events(container, "subscribed")
        assert subscribed, f"viewer {container[:12]} never subscribed"
        return subscribed[-1]["viewer_id"]

    def sequence(self, container: str, from_revision: int = 0, model: str = MODEL) -> SequenceReport:
        return check_sequence(self.logs(container), from_revision, model)

    def last_revision(self, container: str, model: str = MODEL) -> int | None:
        """The last revision the viewer logged (cheap: the log's tail first)."""
        for tail in ("40", "all"):
            proc = sh(["docker", "logs", "--tail", tail, container], check=False)
            records = parse_json_lines(proc.stdout + "\n" + proc.stderr)
            revs = [r["revision"] for r in records if r.get("event") == "refresh" and r.get("model", model) == model]
            if revs:
                return revs[-1]
        return None

    def wait_revision(self, revision: int, containers: Iterable[str], timeout: float = 60,
                      model: str = MODEL) -> None:
        pending = list(containers)

        def probe() -> bool:
            pending[:] = [c for c in pending if (self.last_revision(c, model) or -1) < revision]
            return not pending

        wait_until(probe, timeout=timeout, what=f"viewers at revision {revision} (pending: {pending})")

    # network -----------------------------------------------------------------
    def stale_network(self, network: str) -> bool:
        """A network Docker refuses to remove although no container is attached to it."""
        proc = self.docker("network", "rm", network, check=False)
        if proc.returncode == 0 or "active endpoints" not in proc.stderr:
            return False
        found = json.loads(self.docker("network", "inspect", network, check=False).stdout or "[{}]")
        return not (found and found[0].get("Containers"))

    def down_keeping_volumes(self) -> subprocess.CompletedProcess[str]:
        """``docker compose down`` (containers and network removed, named volumes kept)."""
        proc = self.compose("down", "--timeout", "15", timeout=300, check=False)
        if proc.returncode != 0:
            stale = [n for n in self.leftovers()["networks"] if self.stale_network(n)]
            left = self.leftovers()
            if left["containers"] or set(left["networks"]) - set(stale):
                raise AssertionError(f"compose down failed: {proc.stderr[-2000:]}")
            if stale:
                DOCKER_QUIRKS.append(f"{self.project}: down kept network {', '.join(stale)} (stale Docker endpoint)")
                log(f"WARNING: {DOCKER_QUIRKS[-1]}; up will reuse it")
        return proc

    def endpoint(self, container: str) -> dict[str, Any]:
        return self.inspect(container)["NetworkSettings"]["Networks"][self.network]

    def disconnect(self, container: str) -> dict[str, Any]:
        """Cut the container off the project network; returns what reconnect() needs."""
        ep = self.endpoint(container)
        self.docker("network", "disconnect", self.network, container)
        return {"ip": ep["IPAddress"], "aliases": [a for a in ep.get("Aliases") or [] if a != container[:12]]}

    def reconnect(self, container: str, saved: dict[str, Any]) -> None:
        """Connect it again with the same address and DNS aliases (a partition that heals)."""
        aliases = [arg for a in saved["aliases"] for arg in ("--alias", a)]
        self.docker("network", "connect", "--ip", saved["ip"], *aliases, self.network, container)


@contextlib.contextmanager
def chaos_stack(images: dict[str, str], env_dir: Path, tag: str, *, overrides: Iterable[Path] = (),
                up_args: Iterable[str] = (), **variables: str) -> Iterator[ChaosStack]:
    """A fresh compose project for chaos tests; removed completely afterwards (checked)."""
    project = f"mvcchaos{tag}{uuid.uuid4().hex[:6]}"
    values = {**images, "PROMETHEUS_PORT": "", "PROMETHEUS_BIND": "127.0.0.1", "CHAOS_SUBNET": free_subnet(),
              **variables}
    stack = ChaosStack(project, values, env_dir, overrides)
    log(f"{project}: subnet {values['CHAOS_SUBNET']}")
    try:
        with stack.running(*up_args):
            yield stack
    finally:
        stale = [n for n in stack.leftovers()["networks"] if stack.stale_network(n)]
        left = stack.leftovers()  # stale_network() removed the networks it could
        if stale:
            # Docker 20.10 sometimes keeps a phantom endpoint on a network whose containers are all
            # gone ("has active endpoints"); only a daemon restart clears it. Nothing of ours runs
            # on it: say so, and do not fail the test for the daemon's bookkeeping.
            DOCKER_QUIRKS.append(f"{project}: network {', '.join(stale)} kept by a stale Docker endpoint")
            log(f"WARNING: {DOCKER_QUIRKS[-1]}")
            left["networks"] = [n for n in left["networks"] if n not in stale]
        if any(left.values()):
            raise AssertionError(f"{project} left behind: {left}")
