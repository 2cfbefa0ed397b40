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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import libs as libs_mod
from bench.common import setup_library
from bench.machine import machine_facts
from bench.profile_summary import breakdown
from bench.systems import ROOT, RemoteMVC


def worker(seconds: float, rate: float = 0.0) -> None:
    """One controller process: wait for "go", modify back to back (or ``rate`` changes/s on a fixed
    schedule), print what it measured."""
    from remote_mvc import ModelClient, Settings

    settings = Settings.from_env()
    setup_library(settings)
    client = ModelClient(settings.model_name, settings, retry_seconds=0)
    client.modify({"seq": 0, "t0": time.time()})  # connect and authenticate first
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    calls: list[float] = []
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        if rate:
            wait = start + len(calls) / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # the schedule: change k is due at start + k / rate
        t0 = time.perf_counter()
        client.modify({"seq": len(calls), "t0": time.time()})
        calls.append(time.perf_counter() - t0)
    print(json.dumps({"calls": calls}), flush=True)


def measure(lib: str, name: str, k: int, seconds: float, workdir: Path, *, rate: float = 0.0,
            profile_dir: Path | None = None) -> dict[str, Any]:
    """K controllers against a fresh server of library ``lib``: changes/s, call latency, and the model
    server's CPU time per change (with ``profile_dir``: where that time goes, from a py-spy profile)."""
    system = RemoteMVC(workdir / f"{name}-{k}", lib)
    system.start()
    procs: list[subprocess.Popen] = []
    spy = None
    try:
        env = {**system.base_env(), **system.mvc_env(system.settings.replace(identity="controller"))}
        procs = [subprocess.Popen([sys.executable, "-m", "bench.commit", "--worker", str(seconds),
                                  "--rate", str(rate)], env=env,
                                  cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for _ in range(k)]
        for p in procs:
            assert json.loads(p.stdout.readline()).get("ready")
        if profile_dir is not None:
            spy = _start_spy(system.server_pid, profile_dir / f"commit-{name}-{k}{'-paced' if rate else ''}.txt", seconds)
        server = psutil.Process(system.server_pid)
        revision0 = system.client.snapshot()["revision"]
        cpu0 = sum(server.cpu_times()[:2])
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        calls = np.array([c for p in procs for c in json.loads(p.stdout.readline())["calls"]]) * 1000
        cpu = sum(server.cpu_times()[:2]) - cpu0
        made = system.client.snapshot()["revision"] - revision0
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if spy is not None:
            spy.wait(seconds + 30)
        system.stop()
    result: dict[str, Any] = {
        "system": name, "controllers": k, "rate": rate or None, "changes": int(made), "changes_per_s": round(made / seconds, 1),
        "call_ms": {"p50": round(float(np.percentile(calls, 50)), 3),
                    "p99": round(float(np.percentile(calls, 99)), 3)},
        # the model server's CPU time (all threads, user + system) per durable change
        "server_cpu_us_per_change": round(cpu / made * 1e6, 1) if made else None}
    if spy is not None and Path(spy.args[spy.args.index("--output") + 1]).exists():
        raw = Path(spy.args[spy.args.index("--output") + 1])
        result["profile"] = str(raw)
        per_change = result["server_cpu_us_per_change"] or 0.0
        # the server's CPU time per change, shared out as the profile's busy samples are
        result["breakdown_us_per_change"] = {cat: round(share * per_change, 1)
                                             for cat, share in breakdown(raw).items()}
    return result


def _start_spy(pid: int, output: Path, seconds: float) -> subprocess.Popen | None:
    """py-spy sampling the model server's busy threads for the measurement window; None when py-spy is
    not installed."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("[commit] py-spy not found: not profiling", file=sys.stderr)
        return None
    output.parent.mkdir(parents=True, exist_ok=True)
    argv = [spy, "record", "--pid", str(pid), "--rate", "500", "--format", "raw", "--output", str(output),
            "--duration", str(int(seconds))]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # let it attach
    return proc


def markdown(facts: dict[str, Any], ref: str, seconds: float, results: list[dict[str, Any]]) -> str:
    """The results as markdown: throughput and latency per run, then where the server's CPU goes."""
    dirty = " (with uncommitted changes)" if facts.get("git_dirty") else ""
    lines = [f"Concurrent controllers, no viewers: {facts['cpu_model']}, {facts['cpus']} CPUs, commit "
             f"{facts['git_commit']}{dirty}{', ref ' + ref if ref else ''}, fsync p50 {facts['fsync_p50_us']} µs, "
             f"{seconds:g} s each; every change a real audited, fsynced modify.", "",
             "| controllers | pace | system | changes/s | call p50 (ms) | call p99 (ms) | server CPU µs/change |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in results:
        pace = f"{r['rate']:g}/s each" if r.get("rate") else "back to back"
        lines.append(f"| {r['controllers']} | {pace} | {r['system']} | {r['changes_per_s']} | {r['call_ms']['p50']} "
                     f"| {r['call_ms']['p99']} | {r.get('server_cpu_us_per_change')} |")
    profiled = [r for r in results if r.get("breakdown_us_per_change")]
    if profiled:
        cats: list[str] = []
        for r in profiled:
            cats += [c for c in r["breakdown_us_per_change"] if c not in cats]
        heads = [f"{r['system']}, {r['controllers']} ctl{', paced' if r.get('rate') else ''}" for r in profiled]
        lines += ["", "Server CPU per change by category (µs; py-spy samples of busy threads, innermost match):", "",
                  "| category | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
        for c in cats:
            lines.append(f"| {c} | " + " | ".join(str(r["breakdown_us_per_change"].get(c, 0.0)) for r in profiled)
                         + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.commit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--controllers", default="1,4,16", help="comma-separated controller counts")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--ref", default="", help="also run the library as committed at this git ref")
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    parser.add_argument("--rate", type=float, default=0.0,
                        help="changes/s per controller on a fixed schedule (default: back to back)")
    parser.add_argument("--profile", default="", help="directory: py-spy profile of the model server per run, "
                        "and the server's CPU per change by category")
    parser.add_argument("--worker", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.rate)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="mvc-commit-"))
    libs = {"remote-mvc": str(libs_mod.snapshot(workdir / "lib"))}
    if args.ref:
        libs["remote-mvc-ref"] = str(libs_mod.from_ref(args.ref, workdir / "reflib"))
    facts = machine_facts(workdir)
    results = []
    for k in [int(x) for x in args.controllers.split(",")]:
        for name, lib in libs.items():
            r = measure(lib, name, k, args.seconds, workdir, rate=args.rate,
                        profile_dir=Path(args.profile) if args.profile else None)
            print(f"[commit] {name:>15} controllers={k:<3} {r['changes_per_s']} changes/s, call p50/p99 "
                  f"{r['call_ms']['p50']}/{r['call_ms']['p99']} ms, server CPU {r['server_cpu_us_per_change']} "
                  "µs/change", file=sys.stderr, flush=True)
            results.append(r)
    text = markdown(facts, args.ref, args.seconds, results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "commit-paced" if args.rate else "commit"
    (out / f"{stem}.json").write_text(json.dumps({"machine": facts, "ref": args.ref, "rate": args.rate,
                                                  "results": results}, indent=1))
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
