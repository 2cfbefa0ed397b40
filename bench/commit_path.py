"""The durable commit path in one process, stage by stage: where a change's time goes besides the fsync.

``python -m bench.commit_path [--changes 2000] [--repeats 3] [--ref REF]`` drives the SQLite
commit pipeline (:class:`remote_mvc.commit.GroupCommit` with a real :class:`remote_mvc.AuditLog`
and :class:`remote_mvc.store.SQLiteStore` on this machine's disk, JSON logging at INFO to
/dev/null) with one change at a time, as ``ModelServer.modify`` does after the remote call:
validate and enqueue under the lock, then commit (audit record fsynced, SQLite transaction,
apply, publish, log line). No network, no Pyro5, no viewers: what is left is the commit path's
own cost, measured per change as

* wall and CPU time of the whole change;
* the audit record (``record_many``: encode + write + fsync), and of it the JSON encoding
  (re-timed on the same records);
* the SQLite transaction (``commit_many``), and of it the JSON encoding of event and values;
* the log line (its handler: format + write);
* validation and event building (under the server's lock), and the rest (the pipeline's
  bookkeeping: locks, apply, metrics).

With ``--ref`` the library as committed at REF runs the same workload, the two alternating
``--repeats`` times (medians reported): before/after in one run. Writes
``bench-results/commit_path.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import libs as libs_mod
from bench.machine import machine_facts
from bench.systems import ROOT

STAGES = ["validate + event", "audit: JSON encode", "audit: write + fsync", "sqlite: JSON encode",
          "sqlite: transaction", "log line", "apply, locks, metrics (rest)"]


def worker(changes: int, directory: str) -> dict[str, Any]:
    """Run ``changes`` changes through the pipeline of the library on PYTHONPATH; per-stage µs per change."""
    from remote_mvc import AuditLog, Field, Metrics, Model, configure_logging
    from remote_mvc.commit import GroupCommit
    from remote_mvc.store import SQLiteStore

    class BenchModel(Model):
        seq = Field(int, 0, doc="change number")
        t0 = Field(float, 0.0, doc="a time")

    spent = dict.fromkeys(STAGES, 0.0)
    overhead = [0.0]  # the re-timed encodings: measurement, not commit path (taken off the wall time)
    clock = time.perf_counter

    class TimedAudit(AuditLog):
        def record_many(self, records: list) -> list[dict]:  # type: ignore[override]
            t = clock()
            entries = super().record_many(records)
            total = clock() - t
            t = clock()
            "".join(json.dumps(e, default=repr, ensure_ascii=True) + "\n" for e in entries)
            encode = clock() - t
            overhead[0] += encode
            spent["audit: JSON encode"] += encode
            spent["audit: write + fsync"] += total - encode
            return entries

    class TimedStore(SQLiteStore):
        def commit_many(self, model: str, events: list[dict[str, Any]], fsync: bool = True) -> None:
            t = clock()
            super().commit_many(model, events, fsync)
            total = clock() - t
            t = clock()
            json.dumps(events[-1]["values"])
            [json.dumps(e) for e in events]
            encode = clock() - t
            overhead[0] += encode
            spent["sqlite: JSON encode"] += encode
            spent["sqlite: transaction"] += total - encode

    with open(os.devnull, "w") as null:  # noqa: PTH123
        handler = configure_logging("bench-commit", "INFO", stream=null)
        handle = handler.handle

        def timed_handle(record: Any) -> Any:
            t = clock()
            try:
                return handle(record)
            finally:
                spent["log line"] += clock() - t

        handler.handle = timed_handle  # type: ignore[method-assign]
        metrics = Metrics()
        audit = TimedAudit(Path(directory) / "audit.log", metrics)
        store = TimedStore(Path(directory) / "state.sqlite3", metrics=metrics)
        pipeline = GroupCommit("bench.model", BenchModel, store, audit, metrics)
        pipeline.publish = lambda event: None  # the fan-out is measured by the fan-out benchmark
        for i in range(200):  # warm-up
            _change(pipeline, BenchModel, i, spent, clock)
        for k in spent:
            spent[k] = 0.0
        overhead[0] = 0.0
        wall0, cpu0 = clock(), time.process_time()
        for i in range(changes):
            _change(pipeline, BenchModel, 200 + i, spent, clock)
        wall, cpu = clock() - wall0 - overhead[0], time.process_time() - cpu0 - overhead[0]
        store.close()
        audit.close()
    spent["apply, locks, metrics (rest)"] = wall - sum(spent.values())
    return {"changes": changes, "wall_us": round(wall / changes * 1e6, 1), "cpu_us": round(cpu / changes * 1e6, 1),
            "stages_us": {k: round(v / changes * 1e6, 1) for k, v in spent.items()}}


def _change(pipeline: Any, schema: Any, i: int, spent: dict[str, float], clock: Any) -> None:
    """One change as ModelServer.modify makes it: validated and enqueued under the lock, then committed."""
    t = clock()
    with pipeline.lock:
        _, values = pipeline.head()
        normalized = schema.validate(values, {"seq": i, "t0": 1.0})
        pending = pipeline.enqueue(normalized, "controller", "127.0.0.1:1", f"req-{i}")
    spent["validate + event"] += clock() - t
    pipeline.commit(pending)


def run_lib(lib: str, changes: int, workdir: Path) -> dict[str, Any]:
    """One worker process running the library at ``lib`` in a fresh directory."""
    directory = tempfile.mkdtemp(dir=workdir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MVC_", "PYRO_"))}
    env["PYTHONPATH"] = os.pathsep.join([lib, str(ROOT)])
    out = subprocess.run([sys.executable, "-m", "bench.commit_path", "--worker", str(changes), "--dir", directory],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"commit_path worker failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over repeated runs."""
    return {"changes": runs[0]["changes"], "repeats": len(runs),
            "wall_us": round(statistics.median(r["wall_us"] for r in runs), 1),
            "cpu_us": round(statistics.median(r["cpu_us"] for r in runs), 1),
            "stages_us": {k: round(statistics.median(r["stages_us"][k] for r in runs), 1)
                          for k in runs[0]["stages_us"]}}


def markdown(facts: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    """Per-stage µs per change, one column per library."""
    names = list(results)
    lines = [f"The commit path in one process (no network): {facts['cpu_model']}, {facts['cpus']} CPUs, commit "
             f"{facts['git_commit']}, fsync p50 {facts['fsync_p50_us']} µs; median of "
             f"{results[names[0]]['repeats']} runs of {results[names[0]]['changes']} changes each, µs per change.",
             "", "| stage | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for stage in STAGES:
        lines.append(f"| {stage} | " + " | ".join(str(results[n]["stages_us"].get(stage, "–")) for n in names) + " |")
    lines.append("| **wall per change** | " + " | ".join(f"**{results[n]['wall_us']}**" for n in names) + " |")
    lines.append("| CPU per change | " + " | ".join(str(results[n]["cpu_us"]) for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.commit_path", description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref", default="", help="also run the library as committed at this git ref")
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.dir)))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="mvc-commit-path-"))
    libs = {"remote-mvc": str(libs_mod.snapshot(workdir / "lib"))}
    if args.ref:
        libs[f"remote-mvc @ {args.ref}"] = str(libs_mod.from_ref(args.ref, workdir / "reflib"))
    facts = machine_facts(workdir)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in libs}
    for r in range(args.repeats):  # alternating, so that outside load falls on both alike
        for name, lib in (list(libs.items()) if r % 2 == 0 else list(libs.items())[::-1]):
            runs[name].append(run_lib(lib, args.changes, workdir))
            print(f"[commit-path] {name}: {runs[name][-1]['wall_us']} µs/change", file=sys.stderr, flush=True)
    results = {name: median_run(rs) for name, rs in runs.items()}
    text = markdown(facts, results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "commit_path.json").write_text(json.dumps({"machine": facts, "ref": args.ref, "results": results,
                                                      "runs": runs}, indent=1))
    (out / "commit_path.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
