#!/usr/bin/env python3
"""What the containers' health check costs: CPU of N idle viewer containers, old probe vs new.

    .venv/bin/python bench/health_probe_cpu.py [--viewers 30] [--seconds 60] [--write-docs]

For each probe -- ``remote-mvc-ctl health`` (a Python interpreter importing the library per
check, the image's health check until issue 14) and ``mvc-healthz`` (docker/healthz.sh: bash and
one socket) -- it starts a compose project of its own (name server, model, N viewers, health
check every 3 s as in docker-compose.yml), waits until every viewer is healthy and a settling
period has passed, then reads the CPU time of every viewer container's cgroup (the probe runs
inside it: ``docker exec`` joins the container's cgroups) at the start and the end of the window.
Nothing changes during the window: the containers are idle apart from lease renewals and the
probe, so the difference between the two runs is the probe's cost.

Images: REMOTE_MVC_IMAGE (default remote-mvc:latest, e.g. from `make images`). A measurement,
never a test: it prints a table and, with --write-docs, puts it into docs/operations.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBES = {"remote-mvc-ctl health": ["CMD", "remote-mvc-ctl", "health"], "mvc-healthz": ["CMD", "mvc-healthz"]}
MARK = "HEALTH-PROBE-RESULTS"


def sh(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> str:
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
    return out.stdout


def cgroup_cpu_seconds(container: str) -> float:
    """CPU seconds the container's cgroup used so far (cgroup v1 cpuacct or v2 cpu.stat)."""
    pid = sh(["docker", "inspect", "-f", "{{.State.Pid}}", container]).strip()
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpuacct" in controllers.split(","):
            base = Path("/sys/fs/cgroup/cpuacct") if Path("/sys/fs/cgroup/cpuacct").exists() else \
                Path("/sys/fs/cgroup/cpu,cpuacct")
            return int((base / path.lstrip("/") / "cpuacct.usage").read_text()) / 1e9
    for line in lines:
        if line.startswith("0::"):
            stat = Path("/sys/fs/cgroup") / line[3:].lstrip("/") / "cpu.stat"
            usage = dict(ln.split() for ln in stat.read_text().splitlines())
            return int(usage["usage_usec"]) / 1e6
    raise RuntimeError(f"no CPU accounting cgroup for {container}")


def measure(probe: str, viewers: int, seconds: float, settle: float, image: str) -> dict[str, float]:
    project = f"mvcprobe{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="ops-probe-") as tmp:
        override = Path(tmp) / "probe.yml"
        override.write_text(json.dumps({"services": {"viewer": {"healthcheck": {
            "test": PROBES[probe], "interval": "3s", "timeout": "10s", "retries": 10, "start_period": "60s"}}}}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MVC_")}
        env.update({"REMOTE_MVC_IMAGE": image, "VIEWERS": str(viewers)})
        compose = ["docker", "compose", "-p", project, "-f", "docker-compose.yml", "-f", str(override)]
        try:
            sh([*compose, "up", "-d", "--no-build", "--wait", "--wait-timeout", "600", "viewer"], env, 900)
            ids = sh([*compose, "ps", "-q", "viewer"], env).split()
            assert len(ids) == viewers, f"{len(ids)} viewers"
            time.sleep(settle)  # start-up (imports, subscriptions) is over before the window opens
            start = {c: cgroup_cpu_seconds(c) for c in ids}
            t0 = time.monotonic()
            time.sleep(seconds)
            used = sum(cgroup_cpu_seconds(c) - start[c] for c in ids)
            elapsed = time.monotonic() - t0
        finally:
            subprocess.run([*compose, "down", "--volumes", "--timeout", "10"], cwd=REPO, env=env,
                           capture_output=True, timeout=300)
    checks = viewers * elapsed / 3.0
    return {"cpu_seconds": used, "elapsed": elapsed, "cores": used / elapsed,
            "per_check_ms": 1000 * used / checks, "checks": checks}


def table(results: dict[str, dict[str, float]], viewers: int) -> str:
    rows = [f"| probe | CPU of {viewers} idle viewers | share of one core | CPU per container and check |",
            "|-------|------|------|------|"]
    for probe, r in results.items():
        rows.append(f"| `{probe}` | {r['cpu_seconds']:.1f} s in {r['elapsed']:.0f} s | {100 * r['cores']:.1f} % | "
                    f"{r['per_check_ms']:.0f} ms (probe and idle process together) |")
    old, new = results["remote-mvc-ctl health"], results["mvc-healthz"]
    rows.append("")
    rows.append(f"The cheap probe saves {100 * (old['cores'] - new['cores']):.1f} % of a core at {viewers} viewers "
                f"({old['cpu_seconds'] / max(new['cpu_seconds'], 1e-9):.1f}x less CPU); measured "
                f"{time.strftime('%Y-%m-%d', time.gmtime())} on {os.cpu_count()} cores, shared with other work.")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--viewers", type=int, default=30)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--settle", type=float, default=20.0)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    image = os.environ.get("REMOTE_MVC_IMAGE", "remote-mvc:latest")
    results = {}
    for probe in PROBES:
        print(f"measuring {probe} on {args.viewers} viewers for {args.seconds:.0f} s ...", file=sys.stderr)
        results[probe] = measure(probe, args.viewers, args.seconds, args.settle, image)
        print(json.dumps({probe: results[probe]}), file=sys.stderr)
    text = table(results, args.viewers)
    print(text)
    if args.write_docs:
        doc = REPO / "docs" / "operations.md"
        body = doc.read_text()
        start, end = f"<!-- {MARK} -->", f"<!-- /{MARK} -->"
        if start in body:
            body = body[: body.index(start)] + start + "\n" + text + "\n" + body[body.index(end):]
        else:
            body = body.replace(MARK, f"{start}\n{text}\n{end}")
        doc.write_text(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
