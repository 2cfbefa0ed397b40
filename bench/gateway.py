"""Gateway benchmark: N SSE stream clients on one web gateway beside N direct Pyro5 viewers.

    python -m bench.gateway [--n 1 100 1000] [--procs 4] [--seconds 10] [--unpaced 500]
    make bench-gateway

One run starts a name server (in this process), a model server and a gateway (each its own
process, so their CPU is measured apart), then for each N, in turns: N stream clients of the
gateway (asyncio, raw HTTP/1.1, in ``--procs`` processes), and N direct remote-mvc viewers
(``ViewerHost`` with the multiplex server, in as many processes). For each: a paced phase (50
changes/s, open loop, every change a real authenticated, audited, fsynced modify) gives the
change-to-client latency (client arrival time minus the event's time, stamped by the model
server when it validated the change; one clock, one machine), and an unpaced phase (one
controller as fast as it goes) gives the changes/s fully delivered to all N. Every client must
get every revision exactly once, in order; anything else is reported as lost. Results:
bench-results/gateway.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import setup_library

MODEL = "remote_mvc.model"
REPO = Path(__file__).resolve().parents[1]


# client processes ------------------------------------------------------------------

class Rec:
    """One client's deliveries: revision and arrival minus event time, in arrival order."""

    __slots__ = ("revs", "lat", "at", "snapshots")

    def __init__(self) -> None:
        self.revs: list[int] = []
        self.lat: list[float] = []
        self.at: list[float] = []  # arrival times
        self.snapshots = 0


def _sse_clients(args: argparse.Namespace, recs: list[Rec], ready: threading.Event) -> None:
    """``len(recs)`` SSE streams on one asyncio loop: raw HTTP/1.1, chunked decoding by hand."""
    host, port = args.url.split("//", 1)[1].split(":")

    connected = [0]

    async def one(rec: Rec) -> None:
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 22)
        writer.write(f"GET /models/{MODEL}/events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
                     .encode())
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # status line and headers
        pending = b""
        loads = json.loads
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                return
            chunk = await reader.readexactly(size + 2)
            now = time.time()
            pending += chunk[:-2]
            *frames, pending = pending.split(b"\n\n")
            for frame in frames:
                kind, data = b"", b""
                for line in frame.split(b"\n"):
                    if line.startswith(b"event: "):
                        kind = line[7:]
                    elif line.startswith(b"data: "):
                        data = line[6:]
                if not data:
                    continue
                event = loads(data)
                if kind == b"snapshot":
                    rec.snapshots += 1
                    if rec.snapshots == 1:
                        connected[0] += 1
                        if connected[0] == len(recs):
                            ready.set()  # every stream is open and has its first snapshot
                    continue
                rec.revs.append(event["revision"])
                rec.lat.append(now - event["time"])
                rec.at.append(now)

    async def main() -> None:
        await asyncio.gather(*(one(rec) for rec in recs))

    asyncio.run(main())


def _pyro_viewers(args: argparse.Namespace, recs: list[Rec], ready: threading.Event) -> Any:
    from remote_mvc import Settings, Viewer, ViewerHost

    settings = Settings.from_env()
    setup_library(settings)
    host = ViewerHost(settings)
    viewers = []
    for i, rec in enumerate(recs):
        def on_change(viewer: Viewer, event: dict[str, Any] | None, rec: Rec = rec) -> None:
            if event is None:
                rec.snapshots += 1
            else:
                now = time.time()
                rec.revs.append(event["revision"])
                rec.lat.append(now - event["time"])
                rec.at.append(now)

        viewers.append(host.add(Viewer(f"bench-{os.getpid()}-{i}", MODEL, on_change=on_change, metrics=host.metrics,
                                       log_values=False)))
    host.start()
    deadline = time.monotonic() + 180
    while not (host.subscribed() == len(viewers) and all(v.synced for v in viewers)):
        if time.monotonic() > deadline:
            raise SystemExit(f"viewers not subscribed: {host.subscribed()}/{len(viewers)}")
        time.sleep(0.05)
    ready.set()
    return host


def client_main(args: argparse.Namespace) -> None:
    """A client process: connect ``--count`` clients, then answer orchestrator commands on stdin."""
    recs = [Rec() for _ in range(args.count)]
    ready = threading.Event()
    host = None
    if args.client == "sse":
        threading.Thread(target=_sse_clients, args=(args, recs, ready), daemon=True).start()
    else:
        host = _pyro_viewers(args, recs, ready)
    if not ready.wait(180):
        raise SystemExit(f"{args.client} clients not all connected within 180 s")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        first, last = cmd["first"], cmd["last"]  # wait until every client has last, then report [first, last]
        deadline = time.monotonic() + cmd["timeout"]
        while any((r.revs[-1] if r.revs else -1) < last for r in recs) and time.monotonic() < deadline:
            time.sleep(0.01)
        lat, lost, snaps, done_at = [], 0, 0, 0.0
        for r in recs:
            got = [(rv, lt, at) for rv, lt, at in zip(r.revs, r.lat, r.at, strict=True) if first <= rv <= last]
            if [rv for rv, _, _ in got] != list(range(first, last + 1)):
                lost += 1
            lat += [lt for _, lt, _ in got]
            done_at = max([done_at] + [at for rv, _, at in got if rv == last])
            snaps += max(0, r.snapshots - 1)  # beyond the one each client gets when it connects
        Path(cmd["path"]).write_text(json.dumps({"lat": lat, "clients_incomplete": lost, "snapshots": snaps,
                                                 "done_at": done_at}))
        print(json.dumps({"written": cmd["path"]}), flush=True)
    if host is not None:
        host.stop()


# the orchestrator ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Clients:
    """``n`` clients of one kind spread over ``procs`` processes."""

    def __init__(self, kind: str, n: int, procs: int, url: str, env: dict[str, str]) -> None:
        self.procs = []
        counts = [n // procs + (1 if i < n % procs else 0) for i in range(min(procs, n))]
        for count in counts:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.gateway", "--client", kind, "--count", str(count), "--url", url],
                env=env, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in self.procs:
            line = p.stdout.readline()
            if not line:
                raise SystemExit(f"a {kind} client process failed to start")

    def collect(self, first: int, last: int, workdir: Path, timeout: float = 120) -> dict[str, Any]:
        paths = []
        for i, p in enumerate(self.procs):
            path = workdir / f"collect-{i}-{first}-{last}.json"
            p.stdin.write(json.dumps({"cmd": "collect", "first": first, "last": last, "timeout": timeout,
                                      "path": str(path)}) + "\n")
            p.stdin.flush()
            paths.append(path)
        for p in self.procs:
            p.stdout.readline()
        merged: dict[str, Any] = {"lat": [], "clients_incomplete": 0, "snapshots": 0, "done_at": 0.0}
        for path in paths:
            part = json.loads(path.read_text())
            merged["lat"] += part["lat"]
            merged["clients_incomplete"] += part["clients_incomplete"]
            merged["snapshots"] += part["snapshots"]
            merged["done_at"] = max(merged["done_at"], part["done_at"])
        return merged

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                p.stdin.flush()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


def _cpu(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def run_phase(kind: str, n: int, args: argparse.Namespace, stack: Any, gw_url: str, procs: dict[str, int],
              workdir: Path) -> dict[str, Any]:
    client = stack.client(retry_seconds=10)
    env = stack.env("bench-viewer", identity="", viewer_server="multiplex", metrics_port=-1, lease_seconds=10.0,
                    call_timeout=5.0)
    started = time.monotonic()
    clients = Clients(kind, n, args.procs, gw_url, env)
    setup = time.monotonic() - started
    result: dict[str, Any] = {"kind": kind, "n": n, "setup_s": round(setup, 1),
                              "loadavg_1m_before": round(os.getloadavg()[0], 1)}
    try:
        # paced: 50 changes/s, open loop (each change due at its time, whatever the previous did)
        first = client.snapshot()["revision"] + 1
        count = int(args.seconds * args.rate)
        cpu0 = {name: _cpu(pid) for name, pid in procs.items()}
        t0 = time.time() + 0.2
        for i in range(count):
            due = t0 + i / args.rate
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)  # pacing: the schedule, not a wait for a condition
            last = client.modify({"value": i})
        paced = clients.collect(first, last, workdir)
        cpu = {name: _cpu(pid) - cpu0[name] for name, pid in procs.items()}
        deliveries = count * n
        result["paced"] = {
            "changes": count, "p50_ms": round(1000 * _percentile(paced["lat"], 0.50), 2),
            "p99_ms": round(1000 * _percentile(paced["lat"], 0.99), 2),
            "max_ms": round(1000 * max(paced["lat"] or [float("nan")]), 1),
            "delivered": len(paced["lat"]), "expected": deliveries,
            "clients_incomplete": paced["clients_incomplete"], "snapshots": paced["snapshots"],
            "cpu_us_per_delivery": {name: round(1e6 * c / deliveries, 1) for name, c in cpu.items()},
        }
        # unpaced: one controller as fast as it goes; changes/s until the last client has the last change
        first = last + 1
        t0 = time.time()
        for i in range(args.unpaced):
            last = client.modify({"value": -i})
        written = time.time()
        unpaced = clients.collect(first, last, workdir)
        done = unpaced["done_at"] or float("inf")  # when the last client had the last change
        result["unpaced"] = {
            "changes": args.unpaced, "write_changes_per_s": round(args.unpaced / (written - t0), 1),
            "delivered_changes_per_s": round(args.unpaced / (done - t0), 1),
            "p99_ms": round(1000 * _percentile(unpaced["lat"], 0.99), 1),
            "delivered": len(unpaced["lat"]), "expected": args.unpaced * n,
            "clients_incomplete": unpaced["clients_incomplete"], "snapshots": unpaced["snapshots"],
        }
    finally:
        clients.close()
    result["loadavg_1m_after"] = round(os.getloadavg()[0], 1)  # the machine is shared: how busy it was
    print(json.dumps(result), flush=True)
    return result


def orchestrate(args: argparse.Namespace) -> None:
    out = REPO / "bench-results"
    out.mkdir(exist_ok=True)
    results = []
    for n in args.n:
        for kind in ("sse", "pyro"):  # in turns, each phase with fresh servers
            results.append(phase_with_fresh_servers(kind, n, args))
    report = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
              "rate": args.rate, "seconds": args.seconds, "procs": args.procs, "client_buffer": args.client_buffer,
              "unpaced": args.unpaced, "results": results}
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


def phase_with_fresh_servers(kind: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """A name server (here), a model server and a gateway (processes), one phase, all stopped."""
    from remote_mvc.testing import Stack, wait_until

    with tempfile.TemporaryDirectory(prefix="bench-gw-") as tmp:
        workdir = Path(tmp)
        stack = Stack(workdir / "state", lease_seconds=10.0, call_timeout=5.0, register_interval=2.0).start()
        try:
            model = stack.process("model", identity="service")
            model.wait_for_log(lambda line: line.get("event") == "registered", 60)
            port = _free_port()
            gateway = stack.process("gateway", identity="gateway", gateway_port=port, gateway_models=MODEL,
                                    gateway_max_clients=20000, gateway_client_buffer=args.client_buffer)
            gateway.wait_for_log(lambda line: line.get("event") == "gateway_started", 60)
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: b'"synced":true' in _get(f"{url}/models/{MODEL}"), 60, message="gateway synced")
            return run_phase(kind, n, args, stack, url, {"model": model.pid, "gateway": gateway.pid}, workdir)
        finally:
            stack.close()


def _get(url: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.read()
    except OSError:
        return b""


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Gateway benchmark: {report['machine']['cores']} cores, paced {report['rate']}/s for "
             f"{report['seconds']} s, unpaced {report['unpaced']} changes, clients in {report['procs']} processes, "
             f"gateway client buffer {report['client_buffer']}.", "",
             "| N | clients | paced p50 / p99 / max ms | delivered (paced) | CPU µs/delivery gateway / model "
             "| unpaced changes/s written / delivered to all | clients missing a change | snapshots after the first "
             "| load avg before / after |",
             "| ---: | --- | --- | --- | --- | --- | ---: | ---: | --- |"]
    for r in report["results"]:
        p, u = r["paced"], r["unpaced"]
        kind = "SSE via gateway" if r["kind"] == "sse" else "direct Pyro5 viewers"
        cpu = p["cpu_us_per_delivery"]
        gw_cpu = cpu["gateway"] if r["kind"] == "sse" else "–"
        lines.append(f"| {r['n']} | {kind} | {p['p50_ms']} / {p['p99_ms']} / {p['max_ms']} | "
                     f"{p['delivered']} of {p['expected']} | {gw_cpu} / {cpu['model']} | "
                     f"{u['write_changes_per_s']} / {u['delivered_changes_per_s']} | "
                     f"{p['clients_incomplete'] + u['clients_incomplete']} | {p['snapshots'] + u['snapshots']} | "
                     f"{r['loadavg_1m_before']} / {r['loadavg_1m_after']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1, 100, 1000])
    p.add_argument("--procs", type=int, default=4, help="client processes per phase")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the paced phase")
    p.add_argument("--rate", type=float, default=50.0, help="paced changes per second")
    p.add_argument("--unpaced", type=int, default=500, help="changes in the unpaced phase")
    p.add_argument("--client-buffer", type=int, default=1024,
                   help="MVC_GATEWAY_CLIENT_BUFFER (default 1024: holds the unpaced burst of 500; with the "
                        "service default of 256 a client that falls further behind gets a snapshot instead)")
    p.add_argument("--name", default="gateway", help="bench-results/<name>.{json,md}")
    p.add_argument("--client", choices=["sse", "pyro"], help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--url", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        client_main(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
