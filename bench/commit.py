"""Concurrent controllers: how many durable changes per second one model server takes.

``python -m bench.commit [--controllers 1,4,16] [--seconds 5] [--ref REF]`` starts a
remote-mvc model service (no viewers), then K controller processes that each make
real ``modify`` calls back to back (authenticated, validated, audited and fsynced,
committed) for the same number of seconds, and reports changes/s and each call's
latency. With ``--ref`` the library as committed at REF runs too, K by K in turn:
the group commit's before/after in one run. Writes ``bench-results/commit.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import libs as libs_mod
from bench.common import setup_library
from bench.machine import machine_facts
from bench.systems import ROOT, RemoteMVC


def worker(seconds: float) -> None:
    """One controller process: wait for "go", modify back to back, print what it measured."""
    from remote_mvc import ModelClient, Settings

    settings = Settings.from_env()
    setup_library(settings)
    client = ModelClient(settings.model_name, settings, retry_seconds=0)
    client.modify({"seq": 0, "t0": time.time()})  # connect and authenticate first
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    calls: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        client.modify({"seq": len(calls), "t0": time.time()})
        calls.append(time.perf_counter() - t0)
    print(json.dumps({"calls": calls}), flush=True)


def measure(lib: str, name: str, k: int, seconds: float, workdir: Path) -> dict[str, Any]:
    system = RemoteMVC(workdir / f"{name}-{k}", lib)
    system.start()
    procs: list[subprocess.Popen] = []
    try:
        env = {**system.base_env(), **system.mvc_env(system.settings.replace(identity="controller"))}
        procs = [subprocess.Popen([sys.executable, "-m", "bench.commit", "--worker", str(seconds)], env=env,
                                  cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for _ in range(k)]
        for p in procs:
            assert json.loads(p.stdout.readline()).get("ready")
        revision0 = system.client.snapshot()["revision"]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        calls = np.array([c for p in procs for c in json.loads(p.stdout.readline())["calls"]]) * 1000
        made = system.client.snapshot()["revision"] - revision0
    finally:
        for p in procs:
            p.kill()
            p.wait()
        system.stop()
    return {"system": name, "controllers": k, "changes": int(made), "changes_per_s": round(made / seconds, 1),
            "call_ms": {"p50": round(float(np.percentile(calls, 50)), 3),
                        "p99": round(float(np.percentile(calls, 99)), 3)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.commit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--controllers", default="1,4,16", help="comma-separated controller counts")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--ref", default="", help="also run the library as committed at this git ref")
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    parser.add_argument("--worker", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="mvc-commit-"))
    libs = {"remote-mvc": str(libs_mod.snapshot(workdir / "lib"))}
    if args.ref:
        libs["remote-mvc-ref"] = str(libs_mod.from_ref(args.ref, workdir / "reflib"))
    facts = machine_facts(workdir)
    results = []
    for k in [int(x) for x in args.controllers.split(",")]:
        for name, lib in libs.items():
            r = measure(lib, name, k, args.seconds, workdir)
            print(f"[commit] {name:>15} controllers={k:<3} {r['changes_per_s']} changes/s, call p50/p99 "
                  f"{r['call_ms']['p50']}/{r['call_ms']['p99']} ms", file=sys.stderr, flush=True)
            results.append(r)
    dirty = " (with uncommitted changes)" if facts.get("git_dirty") else ""
    lines = [f"Concurrent controllers, no viewers: {facts['cpu_model']}, {facts['cpus']} CPUs, commit "
             f"{facts['git_commit']}{dirty}{', ref ' + args.ref if args.ref else ''}, fsync p50 {facts['fsync_p50_us']} µs, "
             f"{args.seconds:g} s each; every change a real audited, fsynced modify.", "",
             "| controllers | system | changes/s | call p50 (ms) | call p99 (ms) |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['controllers']} | {r['system']} | {r['changes_per_s']} | {r['call_ms']['p50']} "
              f"| {r['call_ms']['p99']} |" for r in results]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "commit.json").write_text(json.dumps({"machine": facts, "ref": args.ref, "results": results}, indent=1))
    (out / "commit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
