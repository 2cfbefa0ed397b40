"""Cluster mode side by side with the embedded store: ``make bench-cluster``.

``python -m bench.cluster [--seconds 5] [--quick]`` measures, in one run on this machine:

* durable changes/s and modify p50/p99 for 1 and 16 controller processes (each making real
  authenticated, validated, audited ``modify`` calls back to back) on SQLite (one model server),
  etcd with 1 member and etcd with 3 members (one model replica in each case, so the store is
  the only difference);
* fan-out p99 (a change's ``modify`` start to a viewer's handler) at N = 200 and 1,000 viewers,
  served by 1 model replica and by 3 (etcd, 1 member), the viewers' processes split evenly over
  the replicas; changes paced at 10/s;
* the CPU seconds the model replicas spent per delivered event (the sizing figure of
  docs/cluster.md).

Writes ``bench-results/cluster.{json,md}``. Real processes and real etcd members on loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.common import setup_library
from bench.machine import machine_facts
from bench.systems import ROOT

MODEL = "bench.model"


def log(msg: str) -> None:
    print(f"[bench-cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Deployment:
    """A name server (this process), ``members`` etcd members (0: SQLite) and ``replicas`` model
    processes serving the benchmark model."""

    def __init__(self, workdir: Path, members: int, replicas: int = 1) -> None:
        from remote_mvc import NameServer, Settings
        from remote_mvc.etcd_testing import EtcdCluster

        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.etcd = None
        store = "sqlite"
        if members:
            self.etcd = EtcdCluster(workdir / "etcd", members)
            self.etcd.start()
            store = self.etcd.store_setting
        self.secret = secrets.token_hex(16)
        base = {"state_dir": str(workdir / "state"), "ns_port": 0, "port": 0, "metrics_port": -1,
                "register_interval": 2.0, "credentials": f"controller:controller:{self.secret}",
                "model_name": MODEL, "viewer_server": "multiplex", "log_level": "WARNING"}
        setup_library(Settings(service="nameserver", **base))
        self.ns = NameServer(Settings(service="nameserver", **base)).start()
        self.settings = Settings(service="model", store=store, **{**base, "ns_port": self.ns.port})
        self.procs: list[subprocess.Popen] = []
        for r in range(replicas):
            env = {**os.environ, **self.env(self.settings.replace(replica=f"r{r}", service=f"model-r{r}"))}
            out = open(workdir / f"model-r{r}.log", "ab")  # noqa: SIM115 - the process keeps it
            self.procs.append(subprocess.Popen([sys.executable, "-m", "bench.mvc_server"], env=env, stdout=out,
                                               stderr=subprocess.STDOUT, cwd=ROOT))
        self.wait_registered(replicas)

    @staticmethod
    def env(settings: Any) -> dict[str, str]:
        defaults = vars(type(settings)())
        return {f"MVC_{k.upper()}": str(v) for k, v in vars(settings).items() if v != defaults.get(k)}

    def wait_registered(self, count: int) -> None:
        from remote_mvc.client import resolve_all

        deadline = time.monotonic() + 60
        while True:
            try:
                if len(resolve_all(MODEL, self.settings)) >= count:
                    return
            except Exception:  # noqa: BLE001 - not registered yet
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"model replicas did not start; see {self.workdir}/model-r*.log")
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.procs:
            t = psutil.Process(p.pid).cpu_times()
            total += t.user + t.system
        return total

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        self.ns.stop()
        if self.etcd is not None:
            self.etcd.stop()


def commit_round(dep: Deployment, k: int, seconds: float) -> dict[str, Any]:
    """K controller processes modifying back to back for ``seconds`` (bench.commit's worker)."""
    env = {**os.environ, **dep.env(dep.settings.replace(identity="controller", service="bench-controller"))}
    procs = [subprocess.Popen([sys.executable, "-m", "bench.commit", "--worker", str(seconds)], env=env, cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(k)]
    try:
        for p in procs:
            assert json.loads(p.stdout.readline()).get("ready")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        calls = np.array([c for p in procs for c in json.loads(p.stdout.readline())["calls"]]) * 1000
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return {"controllers": k, "changes": len(calls), "changes_per_s": round(len(calls) / seconds, 1),
            "modify_ms": {"p50": round(float(np.percentile(calls, 50)), 2),
                          "p99": round(float(np.percentile(calls, 99)), 2)}}


def fanout_round(dep: Deployment, n: int, replicas: int, changes: int, rate: float, procs: int) -> dict[str, Any]:
    """N viewers in ``procs`` processes, each process watching one replica (evenly); paced changes."""
    from remote_mvc import ModelClient

    per = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    viewers = []
    first = 0
    for i, count in enumerate(per):
        watch = f"{MODEL}.replica.r{i % replicas}"
        s = dep.settings.replace(service="bench-viewer", credentials="", watch=watch)
        env = {**os.environ, **dep.env(s)}
        out = open(dep.workdir / f"viewers-{i}.log", "ab")  # noqa: SIM115
        viewers.append(subprocess.Popen([sys.executable, "-m", "bench.viewer_proc", "--system", "remote-mvc",
                                         "--ids", f"{first}:{count}"], env=env, cwd=ROOT, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=out, text=True, bufsize=1))
        first += count
    client = ModelClient(MODEL, dep.settings.replace(identity="controller"), retry_seconds=10)
    try:
        for v in viewers:
            line = v.stdout.readline()
            assert line and json.loads(line).get("ready"), f"viewer process failed; see {dep.workdir}"
        cpu0 = dep.cpu_seconds()
        sent: dict[int, float] = {}
        start = time.monotonic()
        for i in range(changes):
            due = start + i / rate
            time.sleep(max(0.0, due - time.monotonic()))
            t0 = time.time()
            sent[client.modify({"seq": i, "t0": t0})] = t0
        final = max(sent)
        latencies: list[float] = []
        behind = 0
        for idx, v in enumerate(viewers):
            path = dep.workdir / f"records-{n}-{replicas}-{idx}.json"
            v.stdin.write(json.dumps({"cmd": "collect", "final": final, "first": min(sent), "timeout": 30,
                                      "path": str(path)}) + "\n")
            v.stdin.flush()
            reply = json.loads(v.stdout.readline())
            behind += len(reply.get("behind", []))
            for rec in json.loads(path.read_text()).values():
                latencies += [(t - sent[s]) * 1000 for s, t, k in zip(rec["seqs"], rec["times"], rec["kinds"],
                                                                      strict=True) if k == 0 and s in sent]
        cpu = dep.cpu_seconds() - cpu0
    finally:
        client.close()
        for v in viewers:
            try:
                v.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                v.stdin.flush()
            except OSError:
                pass
        for v in viewers:
            try:
                v.wait(20)
            except subprocess.TimeoutExpired:
                v.kill()
    lat = np.array(latencies)
    deliveries = len(lat)
    return {"n": n, "replicas": replicas, "changes": changes, "deliveries": deliveries,
            "expected": n * changes, "viewers_behind": behind,
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2),
                           "p99": round(float(np.percentile(lat, 99)), 2)},
            "replica_cpu_s": round(cpu, 2),
            "cpu_us_per_delivery": round(cpu / max(1, deliveries) * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per commit round")
    parser.add_argument("--changes", type=int, default=50, help="changes per fan-out round (paced)")
    parser.add_argument("--rate", type=float, default=10.0, help="changes/s in the fan-out rounds")
    parser.add_argument("--ns", default="200,1000")
    parser.add_argument("--viewer-procs", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s rounds, N = 20")
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.changes, args.ns = 2.0, 10, "20"
    workdir = Path(tempfile.mkdtemp(prefix="mvc-cluster-"))
    facts = machine_facts(workdir)
    commits = []
    for label, members in (("sqlite", 0), ("etcd-1", 1), ("etcd-3", 3)):
        dep = Deployment(workdir / f"commit-{label}", members)
        try:
            for k in (1, 16):
                r = {"store": label, **commit_round(dep, k, args.seconds)}
                log(f"{label:>7} controllers={k:<3} {r['changes_per_s']} changes/s, modify p50/p99 "
                    f"{r['modify_ms']['p50']}/{r['modify_ms']['p99']} ms")
                commits.append(r)
        finally:
            dep.stop()
    fanouts = []
    for replicas in (1, 3):
        dep = Deployment(workdir / f"fanout-{replicas}", 1, replicas)
        try:
            for n in [int(x) for x in args.ns.split(",")]:
                r = fanout_round(dep, n, replicas, args.changes, args.rate, max(replicas, args.viewer_procs))
                log(f"fan-out N={n} replicas={replicas}: p50/p99 {r['latency_ms']['p50']}/{r['latency_ms']['p99']} "
                    f"ms, {r['deliveries']}/{r['expected']} deliveries, {r['cpu_us_per_delivery']} µs CPU each")
                fanouts.append(r)
        finally:
            dep.stop()
    base = {r["controllers"]: r for r in commits if r["store"] == "sqlite"}
    lines = [f"Cluster mode vs SQLite: {facts['cpu_model']}, {facts['cpus']} CPUs, commit {facts['git_commit']}"
             f"{' (with uncommitted changes)' if facts.get('git_dirty') else ''}, fsync p50 {facts['fsync_p50_us']} µs.",
             "", f"Durable changes ({args.seconds:g} s per round, one model server or replica):", "",
             "| store | controllers | changes/s | vs SQLite | modify p50 (ms) | modify p99 (ms) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in commits:
        ratio = r["changes_per_s"] / max(0.1, base[r["controllers"]]["changes_per_s"])
        lines.append(f"| {r['store']} | {r['controllers']} | {r['changes_per_s']} | {ratio:.2f} | "
                     f"{r['modify_ms']['p50']} | {r['modify_ms']['p99']} |")
    lines += ["", f"Fan-out (etcd, 1 member; {args.changes} changes at {args.rate:g}/s; viewers in "
              f"{args.viewer_procs} processes split over the replicas):", "",
              "| N | replicas | p50 (ms) | p99 (ms) | deliveries | replica CPU µs / delivery |",
              "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['n']} | {r['replicas']} | {r['latency_ms']['p50']} | {r['latency_ms']['p99']} | "
              f"{r['deliveries']}/{r['expected']} | {r['cpu_us_per_delivery']} |" for r in fanouts]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.json").write_text(json.dumps({"machine": facts, "commit": commits, "fanout": fanouts},
                                                 indent=1))
    (out / "cluster.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    lost = [r for r in fanouts if r["deliveries"] < r["expected"]]
    if lost:
        log(f"deliveries missing in {len(lost)} round(s): see viewers_behind in cluster.json")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
