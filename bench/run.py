"""Orchestrator: start each system, its viewer processes and the controller; measure; report.

``python -m bench --quick`` is the CI smoke run (small N, a few seconds per
system); ``python -m bench`` the full run (N = 1, 10, 50, 200, 1000). Both write
``bench-results/latest.json``, ``latest.md`` and ``fanout_p99.png`` and exit
non-zero when any system lost, duplicated or reordered a delivery to a healthy
viewer, or left one behind the final change.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench import report
from bench.analyze import analyze, pool
from bench.machine import machine_facts
from bench.systems import ROOT, System, make, stop_process

ALL_SYSTEMS = ["remote-mvc", "naive-twoway", "naive-oneway", "redis"]


@dataclass
class Config:
    ns: list[int]
    procs: int  # viewer processes per run (at most)
    rate: float
    paced_seconds: float
    unpaced_seconds: float
    unpaced_cap: int  # changes per unpaced run at most
    delivery_budget: int  # unpaced changes x N at most (bounds the run time at large N)
    drain_timeout: float
    slow: bool
    slow_n: int
    slow_sleep: float
    rounds: int = 1  # paced windows per system at the N in rounds_ns, taken in turns and pooled
    rounds_ns: tuple[int, ...] = ()
    viewer_server: str = ""  # MVC_VIEWER_SERVER of remote-mvc's viewer processes; "" = the library's default
    unpaced: bool = True  # also the unpaced scenario at every N
    dump: str = ""  # directory: keep each measurement's raw sends and viewer records (JSON) there


# N viewers over min(N, procs) processes, for every system: 8 as in the targets (N = 1000 in 8)
FULL = Config(ns=[1, 10, 50, 200, 1000], procs=8, rate=50.0, paced_seconds=10.0, unpaced_seconds=8.0,
              unpaced_cap=3000, delivery_budget=400_000, drain_timeout=60.0, slow=True, slow_n=10, slow_sleep=0.2,
              rounds=5, rounds_ns=(200,))
# the 10,000-viewer target: 10 processes of 1,000 viewers, paced at 10 changes/s (make bench-10k)
BIG = Config(ns=[10000], procs=10, rate=10.0, paced_seconds=20.0, unpaced_seconds=0.0, unpaced_cap=0,
             delivery_budget=0, drain_timeout=120.0, slow=False, slow_n=10, slow_sleep=0.2, unpaced=False)
QUICK = Config(ns=[1, 10], procs=2, rate=50.0, paced_seconds=2.0, unpaced_seconds=2.0,
               unpaced_cap=400, delivery_budget=20_000, drain_timeout=20.0, slow=True, slow_n=10, slow_sleep=0.2,
               rounds=2, rounds_ns=(10,))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# viewer processes -------------------------------------------------------------

class ViewerProc:
    """A viewer process and its JSON-lines pipe."""

    def __init__(self, system: System, first: int, count: int, workdir: Path) -> None:
        self.ids = [f"v{i}" for i in range(first, first + count)]
        argv = [sys.executable, "-m", "bench.viewer_proc", "--system", system.name,
                "--ids", f"{first}:{count}", "--connect", system.viewer_connect()]
        self.errlog = workdir / f"viewers-{first}.log"
        self.proc = subprocess.Popen(argv, env=system.viewer_env(), cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(self.errlog, "ab"),  # noqa: SIM115
                                     text=True, bufsize=1)
        self._lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.stopped = False

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._lines.put(json.loads(line))
            except ValueError:
                pass

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self._lines.empty():
                    tail = self.errlog.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"viewer process {self.pid} exited ({self.proc.returncode}):\n{tail}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"viewer process {self.pid} did not answer within {timeout}s") from None

    def request(self, cmd: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        self.send(cmd)
        return self.wait(timeout)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.stopped = False


def close_all(procs: list[ViewerProc]) -> None:
    """Ask every viewer process to quit at once, then wait for them all (kill stragglers)."""
    for p in procs:
        if p.proc.poll() is None:
            try:
                if p.stopped:
                    p.resume()
                p.send({"cmd": "quit"})
            except OSError:
                pass
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        stop_process(p.proc, 5)


def start_viewers(system: System, layout: list[int], workdir: Path) -> list[ViewerProc]:
    """Start the viewer processes of ``layout`` and wait until the server sees every subscription; on any
    failure (or SIGTERM) meanwhile, the processes already started are stopped, not left behind."""
    procs, first = [], 0
    try:
        for count in layout:
            procs.append(ViewerProc(system, first, count, workdir))
            first += count
        for p in procs:
            reply = p.wait(180)
            if not reply.get("ready"):
                raise RuntimeError(f"viewer process {p.pid} not ready: {reply}")
        total = sum(layout)
        # the server side must see every subscription before we measure
        deadline = time.monotonic() + 30
        while server_subscribers(system) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{system.name}: only {server_subscribers(system)}/{total} subscribed")
            time.sleep(0.05)
    except BaseException:
        close_all(procs)
        raise
    return procs


def server_subscribers(system: System) -> int:
    if system.name.startswith("remote-mvc"):
        return len(system.client.viewers())
    if system.name == "redis":
        return system.subscribers()
    return system.proxy.count()


def split(n: int, k: int) -> list[int]:
    k = max(1, min(n, k))
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


# server resource usage --------------------------------------------------------

class Sampler:
    """CPU time and peak RSS of the server process over a measurement window."""

    def __init__(self, pid: int, viewer_pids: list[int] = ()) -> None:
        self.p = psutil.Process(pid)
        self.viewers = [psutil.Process(v) for v in viewer_pids]
        self._stop = threading.Event()
        self.rss_peak = 0
        self.threads_peak = 0

    def start(self) -> Sampler:
        c = self.p.cpu_times()
        self.cpu0, self.wall0 = c.user + c.system, time.monotonic()
        self.vcpu0 = self._viewer_cpu()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.rss_peak = max(self.rss_peak, self.p.memory_info().rss)
                self.threads_peak = max(self.threads_peak, self.p.num_threads())
            except Exception:  # noqa: BLE001 - the process went away
                return
            if self._stop.wait(0.1):
                return

    def _viewer_cpu(self) -> float:
        total = 0.0
        for v in self.viewers:
            try:
                c = v.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
        return total

    def stop(self, viewers: int, deliveries: int = 0) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        c = self.p.cpu_times()
        return usage(cpu=c.user + c.system - self.cpu0, viewer_cpu=self._viewer_cpu() - self.vcpu0,
                     wall=time.monotonic() - self.wall0, rss=max(self.rss_peak, self.p.memory_info().rss),
                     threads=self.threads_peak, viewers=viewers, deliveries=deliveries)


def usage(*, cpu: float, viewer_cpu: float, wall: float, rss: float, threads: int, viewers: int,
          deliveries: int) -> dict[str, Any]:
    """Resource figures of a measurement window (or of several, added up)."""
    cpu_pct = 100.0 * cpu / wall if wall > 0 else 0.0
    per100 = 100.0 / max(1, viewers)
    return {"cpu_pct": round(cpu_pct, 1), "cpu_pct_per_100_viewers": round(cpu_pct * per100, 2),
            "cpu_seconds": round(cpu, 3), "wall_seconds": round(wall, 3),
            "rss_mb": round(rss / 2**20, 1), "rss_mb_per_100_viewers": round(rss / 2**20 * per100, 2),
            "threads": threads, "viewer_procs_cpu_seconds": round(viewer_cpu, 3), "deliveries": deliveries,
            # CPU cost of one delivery, server side and viewer side (robust to outside load)
            "server_cpu_us_per_delivery": round(cpu / deliveries * 1e6, 1) if deliveries else None,
            "viewer_cpu_us_per_delivery": round(viewer_cpu / deliveries * 1e6, 1) if deliveries else None}


def pool_usage(parts: list[dict[str, Any]], viewers: int) -> dict[str, Any]:
    """The resource figures of several rounds' windows taken together."""
    return usage(cpu=sum(u["cpu_seconds"] for u in parts), viewer_cpu=sum(u["viewer_procs_cpu_seconds"] for u in parts),
                 wall=sum(u["wall_seconds"] for u in parts), rss=max(u["rss_mb"] for u in parts) * 2**20,
                 threads=max(u["threads"] for u in parts), viewers=viewers,
                 deliveries=sum(u["deliveries"] for u in parts))


# the controller ---------------------------------------------------------------

class Controller:
    """Makes changes one call at a time, paced or as fast as it can; remembers each call's start.

    Paced runs follow a fixed schedule (change k is due at start + k / rate), open-loop as in
    wrk2: a system that holds the controller up does not thereby slow the schedule down. Each
    call's due time is kept with it, so latency can be taken from when the change was due as
    well as from when the call could start (a system that makes the controller wait otherwise
    hides that wait: "coordinated omission"). Changes still due when the window closes are
    not made; they are reported as never issued.
    """

    def __init__(self, system: System) -> None:
        self.system = system
        self.i = 1
        self.schedule: dict[str, Any] = {}

    def run(self, rate: float | None, seconds: float, max_changes: int) -> list[tuple[int, float, float]]:
        sends: list[tuple[int, float, float]] = []
        due: list[float] = []
        interval = 1.0 / rate if rate else 0.0
        change = self.system.change
        clock = time.time
        start = clock()
        while len(sends) < max_changes and clock() - start < seconds:
            if interval:
                at = start + len(sends) * interval
                now = clock()
                if now < at:
                    time.sleep(at - now)
            t0 = clock()
            seq = change(self.i, t0)
            t1 = clock()
            sends.append((seq, t0, t1))
            due.append(at if interval else t0)
            self.i += 1
        stop = clock()
        unissued = []
        if interval:  # due within the window (and the cap) but never made
            k = len(sends)
            while k < max_changes and start + k * interval < start + seconds:
                unissued.append(start + k * interval)
                k += 1
        self.schedule = {"due": due, "unissued": unissued, "stopped": stop}
        return sends


# scenarios --------------------------------------------------------------------

class Runner:
    def __init__(self, cfg: Config, workdir: Path, libs: dict[str, str], profile_dir: Path | None,
                 profile_ns: set[int]) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.libs = libs
        self.profile_dir = profile_dir
        self.profile_ns = profile_ns
        self.results: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.profiles: list[dict[str, Any]] = []

    def measure(self, system: System, ctl: Controller, procs: list[ViewerProc], scenario: str, n: int, *,
                rate: float | None, seconds: float, max_changes: int, healthy: list[str] | None = None,
                extra_collect: list[ViewerProc] = (), profile: bool = False, keep: bool = True) -> dict[str, Any]:
        """One measurement window; its result is kept in the run's results unless ``keep`` is False
        (a round, pooled with the others by :meth:`keep_pooled`)."""
        cfg = self.cfg
        live = [p for p in procs if not p.stopped]
        for p in live:
            p.send({"cmd": "reset"})
        for p in live:
            p.wait(30)
        time.sleep(0.2)
        spy = self._start_profile(system, scenario, n, seconds) if profile else None
        psutil.cpu_percent(interval=None)  # start of the machine-wide busy measurement
        sampler = Sampler(system.server_pid, [p.pid for p in procs]).start()
        sends = ctl.run(rate, seconds, max_changes)
        final = max(s for s, _, _ in sends)
        paths = {}
        for p in live:
            paths[p] = self.workdir / f"rec-{system.name}-{scenario}-{n}-{p.pid}.json"
            timeout = 2.0 if p in extra_collect else cfg.drain_timeout
            p.send({"cmd": "collect", "final": final, "first": min(s for s, _, _ in sends), "timeout": timeout,
                    "path": str(paths[p])})
        records: dict[str, Any] = {}
        for p in live:
            p.wait(cfg.drain_timeout + 60)
            records.update(json.loads(paths[p].read_text()))
            paths[p].unlink()
        if cfg.dump:
            Path(cfg.dump).mkdir(parents=True, exist_ok=True)
            raw = {"sends": sends, "records": records, "schedule": ctl.schedule if rate else None,
                   "procs": {str(p.pid): p.ids for p in procs}}
            stem, k = f"{system.name}-{scenario}-{n}", 1
            while (Path(cfg.dump) / f"{stem}{f'-round{k}' if k > 1 else ''}.json").exists():  # a later round
                k += 1
            (Path(cfg.dump) / f"{stem}{f'-round{k}' if k > 1 else ''}.json").write_text(json.dumps(raw))
        ids = healthy if healthy is not None else [v for p in procs for v in p.ids]
        all_deliveries = sum(1 for rec in records.values() for s in rec["seqs"] if s >= sends[0][0])
        usage = sampler.stop(n, all_deliveries)
        if spy is not None:
            self._finish_profile(spy)
        result = analyze(sends, records, ids, schedule=ctl.schedule if rate else None)
        result.update(system=system.name, label=system.label, scenario=scenario, n=n, server=usage,
                      rate=rate, durable=system.durable, load1=round(os.getloadavg()[0], 2),
                      machine_cpu_pct=round(psutil.cpu_percent(interval=None), 1))
        if healthy is not None:
            others = [v for p in procs for v in p.ids if v not in set(healthy)]
            result["special_viewers"] = {v: _viewer_summary(records.get(v), sends) for v in others}
        if keep:
            result = self.keep_pooled([result])
        f = result["fanout_ms"]
        log(f"{system.name:>16} {scenario:<14} N={n:<5} fan-out p50/p99/max {f['p50']}/{f['p99']}/{f['max']} ms, "
            f"{result['changes_per_s']} changes/s, {result['deliveries_per_s']} deliveries/s, "
            f"cpu {usage['cpu_pct']}%, rss {usage['rss_mb']} MB, lost {result['lost']} ooo {result['out_of_order']} "
            f"dup {result['duplicated']} snap {result['snapshots']} behind {result['behind_count']}")
        return result

    def keep_pooled(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        """Keep one result for a measurement made in one or more rounds (see :func:`bench.analyze.pool`)."""
        result = {**rounds[-1], **pool(rounds)}
        if len(rounds) > 1:
            result.update(server=pool_usage([r["server"] for r in rounds], result["viewers"]),
                          load1=round(sum(r["load1"] for r in rounds) / len(rounds), 2),
                          machine_cpu_pct=round(sum(r["machine_cpu_pct"] for r in rounds) / len(rounds), 1))
        result.pop("_samples", None)
        self.results.append(result)
        return result

    def unpaced_changes(self, n: int) -> int:
        return max(100, min(self.cfg.unpaced_cap, self.cfg.delivery_budget // n))

    def run_n(self, names: list[str], n: int) -> None:
        """Every system at one N: paced, then unpaced. Where ``cfg.rounds`` > 1 at this N, all
        systems are up together and take turns at the paced window, round by round, in an order
        reversed every round (ABC CBA ABC): a burst of outside load then falls on one round of
        one system rather than on its only window, and each system's rounds are pooled into
        its paced result. Otherwise one system at a time, each with fresh processes."""
        cfg = self.cfg
        rounds = cfg.rounds if n in cfg.rounds_ns else 1
        groups = [names] if rounds > 1 else [[name] for name in names]
        for group in groups:
            up: list[tuple[System, list[ViewerProc], Controller]] = []
            try:
                for name in group:
                    started = self._start(name, n)
                    if started:
                        up.append(started)
                paced: dict[str, list[dict[str, Any]]] = {system.name: [] for system, _, _ in up}
                for r in range(rounds):
                    for system, procs, ctl in (up if r % 2 == 0 else up[::-1]):
                        with self._step(system.name, f"N={n}"):
                            paced[system.name].append(self.measure(
                                system, ctl, procs, "paced", n, rate=cfg.rate, seconds=cfg.paced_seconds,
                                max_changes=int(cfg.rate * cfg.paced_seconds) + 1, keep=False,
                                profile=r == 0 and self._profiling(system.name, n)))
                for system, procs, ctl in up:
                    if paced[system.name]:
                        kept = self.keep_pooled(paced[system.name])
                        if rounds > 1:
                            log(f"{system.name:>16} paced          N={n:<5} {rounds} rounds pooled: fan-out p99 "
                                f"{kept['fanout_ms']['p99']} ms (rounds: "
                                f"{', '.join(str(x['fanout_p99_ms']) for x in kept['rounds'])})")
                    if not cfg.unpaced:
                        continue
                    with self._step(system.name, f"N={n}"):
                        self.measure(system, ctl, procs, "unpaced", n, rate=None, seconds=cfg.unpaced_seconds,
                                     max_changes=self.unpaced_changes(n), profile=self._profiling(system.name, n))
            finally:
                for system, procs, _ in up:
                    close_all(procs)
                    system.stop()

    def _profiling(self, name: str, n: int) -> bool:
        return self.profile_dir is not None and n in self.profile_ns and name.startswith("remote-mvc")

    @contextlib.contextmanager
    def _step(self, name: str, what: str) -> Iterator[None]:
        """One step of one system (``what``: "N=200", "slow"): a failure is recorded, and must not
        hide the other systems."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001
            log(f"{name}: {what}: FAILED: {type(exc).__name__}: {exc}")
            self.errors.append(f"{name} {what}: {type(exc).__name__}: {exc}")

    def _start(self, name: str, n: int) -> tuple[System, list[ViewerProc], Controller] | None:
        """A fresh server and its viewer processes, warmed up; None (recorded) if it fails."""
        system = make(name, self.workdir / f"{name}-{n}", self.libs, self.cfg.viewer_server)
        procs: list[ViewerProc] = []
        with self._step(name, f"N={n}"):
            log(f"{name}: N={n}: starting server and {len(split(n, self.cfg.procs))} viewer processes")
            try:
                system.start()
                procs = start_viewers(system, split(n, self.cfg.procs), system.workdir)
                ctl = Controller(system)
                ctl.run(None, 0.5, 20)  # warm-up, not measured
            except BaseException:
                close_all(procs)
                system.stop()
                raise
            return system, procs, ctl
        return None

    def run_slow(self, name: str) -> None:
        """N viewers: N-2 healthy ones, one whose handler sleeps, one SIGSTOPped; healthy vs. not."""
        cfg = self.cfg
        n = cfg.slow_n
        system = make(name, self.workdir / f"{name}-slow", self.libs, cfg.viewer_server)
        procs: list[ViewerProc] = []
        try:
            with self._step(name, "slow"):
                log(f"{name}: slow-viewer scenario, N={n}")
                system.start()
                layout = split(n - 2, cfg.procs) + [1, 1]
                procs = start_viewers(system, layout, system.workdir)
                slow, stopped = procs[-2], procs[-1]
                healthy = [v for p in procs[:-2] for v in p.ids]
                ctl = Controller(system)
                ctl.run(None, 0.5, 20)
                kw = dict(rate=cfg.rate, seconds=cfg.paced_seconds,
                          max_changes=int(cfg.rate * cfg.paced_seconds) + 1, healthy=healthy)
                self.measure(system, ctl, procs, "slow-baseline", n, **kw)
                slow.request({"cmd": "sleep", "seconds": cfg.slow_sleep})
                stopped.pause()
                result = self.measure(system, ctl, procs, "slow-viewer", n, extra_collect=[slow], **kw)
                stopped.resume()
                # does the stopped viewer come back to the latest state once resumed?
                final = result["final_seq"]
                path = system.workdir / "stopped.json"
                reply = stopped.request({"cmd": "collect", "final": final, "timeout": 20.0, "path": str(path)}, 60)
                data = json.loads(path.read_text())
                last = max(data[stopped.ids[0]]["seqs"], default=None)
                result["special_viewers"][stopped.ids[0]]["after_resume"] = {
                    "caught_up": not reply.get("behind"), "last_seq": last}
        finally:
            close_all(procs)
            system.stop()

    # profiling --------------------------------------------------------------
    def _start_profile(self, system: System, scenario: str, n: int, seconds: float) -> dict[str, Any] | None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            log("py-spy not found; not profiling")
            return None
        assert self.profile_dir is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        stem = self.profile_dir / f"{system.name}-{scenario}-{n}"
        argv = [spy, "record", "--pid", str(system.server_pid), "--rate", "250", "--nonblocking", "--format", "raw",
                "--output", f"{stem}.txt", "--duration", str(int(seconds) + 1)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # let it attach
        return {"proc": proc, "raw": f"{stem}.txt", "system": system.name, "scenario": scenario, "n": n}

    def _finish_profile(self, spy: dict[str, Any]) -> None:
        try:
            spy["proc"].wait(30)
        except subprocess.TimeoutExpired:
            spy["proc"].send_signal(signal.SIGINT)
            spy["proc"].wait(10)
        self.profiles.append({k: v for k, v in spy.items() if k != "proc"})


def _viewer_summary(rec: dict[str, Any] | None, sends: list[tuple[int, float, float]]) -> dict[str, Any]:
    if not rec:
        return {"deliveries": 0}
    first = min(s for s, _, _ in sends)
    seqs = [s for s in rec["seqs"] if s >= first]
    return {"deliveries": len(seqs), "snapshots": sum(1 for s, k in zip(rec["seqs"], rec["kinds"], strict=True) if k and s >= first),
            "last_seq": max(seqs, default=None)}


# main -------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run: small N, seconds per system")
    parser.add_argument("--big", action="store_true", help="the N = 10,000 target: 10 viewer processes, paced at "
                        "10 changes/s (make bench-10k)")
    parser.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                        help=f"comma-separated, from {ALL_SYSTEMS}")
    parser.add_argument("--n", default="", help="comma-separated viewer counts (default: by mode)")
    parser.add_argument("--paced-seconds", type=float)
    parser.add_argument("--rate", type=float, help="paced changes per second (default 50)")
    parser.add_argument("--no-slow", action="store_true", help="skip the slow-viewer scenario")
    parser.add_argument("--rounds", type=int, help="paced windows per system, taken in turns and pooled, at the N "
                        "of --rounds-n (default: 5 at N = 200; quick: 2 at N = 10)")
    parser.add_argument("--rounds-n", help="comma-separated N measured in rounds")
    parser.add_argument("--viewer-server", default="",
                        help="MVC_VIEWER_SERVER of remote-mvc's viewer processes (default: the library's default, "
                        "as a user gets it)")
    parser.add_argument("--procs", type=int, help="viewer processes per N (at most; default 8, quick 2, big 10)")
    parser.add_argument("--out", default=str(ROOT / "bench-results"), help="results directory")
    parser.add_argument("--name", default="", help="results file stem (default: latest, or quick with --quick)")
    parser.add_argument("--no-docs", action="store_true", help="do not refresh the results block of "
                        "docs/performance.md (a full run named latest refreshes it by default)")
    parser.add_argument("--ref", default="", help="also benchmark the library as committed at this git ref "
                        "(system remote-mvc-ref), e.g. to measure a change before/after in one run")
    parser.add_argument("--dump", default="", help="directory: keep every measurement's raw data (the "
                        "controller's calls, each viewer's deliveries) as JSON, for analysis by hand")
    parser.add_argument("--profile", default="", help="directory: record py-spy profiles of the remote-mvc server")
    parser.add_argument("--profile-n", default="200", help="N values to profile at")
    args = parser.parse_args(argv)

    base = QUICK if args.quick else BIG if args.big else FULL
    args.name = args.name or ("quick" if args.quick else "big" if args.big else "latest")
    cfg = Config(**vars(base))
    if args.n:
        cfg.ns = [int(x) for x in args.n.split(",")]
    if args.paced_seconds:
        cfg.paced_seconds = args.paced_seconds
    if args.rate:
        cfg.rate = args.rate
    if args.no_slow:
        cfg.slow = False
    if args.rounds:
        cfg.rounds = args.rounds
    if args.rounds_n is not None:
        cfg.rounds_ns = tuple(int(x) for x in args.rounds_n.split(",") if x)
    cfg.dump = args.dump
    if args.viewer_server:
        cfg.viewer_server = args.viewer_server
    if args.procs:
        cfg.procs = args.procs
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.ref and "remote-mvc-ref" not in systems:
        systems.insert(0, "remote-mvc-ref")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mvc-bench-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the processes we started
    started = time.time()
    facts = machine_facts(workdir)
    # one run measures one library version, even if the working tree changes meanwhile
    from bench import libs as libs_mod
    libs = {"remote-mvc": str(libs_mod.snapshot(workdir / "lib"))}
    facts["library"] = {"fingerprint": libs_mod.fingerprint(workdir / "lib" / "remote_mvc"),
                        "git_dirty": facts.pop("git_dirty", None)}
    if "remote-mvc-ref" in systems:
        libs["remote-mvc-ref"] = str(libs_mod.from_ref(args.ref or "HEAD", workdir / "reflib"))
        libs["ref"] = args.ref or "HEAD"
        facts["library"]["ref"] = libs["ref"]
    log(f"machine: {facts['cpu_model']}, {facts['cpus']} CPUs, {facts['memory_gb']} GB; workdir {workdir}")
    runner = Runner(cfg, workdir, libs, Path(args.profile) if args.profile else None,
                    {int(x) for x in args.profile_n.split(",")})
    try:
        # N by N, every system in turn: systems compared at one N are measured minutes apart at most,
        # so background load on the machine shifts them alike (load is recorded with each result)
        for n in cfg.ns:
            runner.run_n(systems, n)
        if cfg.slow:
            for name in systems:
                runner.run_slow(name)
    finally:
        if not os.environ.get("BENCH_KEEP_TMP"):
            shutil.rmtree(workdir, ignore_errors=True)
    facts["duration_s"] = round(time.time() - started, 1)
    doc = report.build(runner.results, facts, cfg, mode="quick" if args.quick else "big" if args.big else "full", systems=systems,
                       errors=runner.errors, profiles=runner.profiles)
    json_path = out / f"{args.name}.json"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md = report.markdown(doc)
    (out / f"{args.name}.md").write_text(md)
    png = report.plot(doc, out / ("fanout_p99.png" if args.name == "latest" else f"{args.name}_fanout_p99.png"))
    print(md)
    if args.name == "latest" and not args.no_docs:
        docs = report.update_docs(ROOT / "docs" / "performance.md", md, out, png)
        if docs:
            log(f"refreshed the results block of {docs}")
    log(f"wrote {json_path}, {out / (args.name + '.md')}" + (f", {png}" if png else "")
        + f" in {facts['duration_s']} s")
    if runner.profiles:
        from bench.profile_summary import summarize
        for prof in runner.profiles:
            print(summarize(prof["raw"]))
    for note in report.expected_findings(doc):
        log(f"note: {note}")
    problems = report.problems(doc)
    for p in problems:
        log(f"PROBLEM: {p}")
    return 1 if problems else 0
