"""docs/reliability.md from the chaos tests' own measurements.

Each chaos test fills a ``figures`` dict (tests/chaos/conftest.py); at the end of a pytest run
the results of the tests that ran are merged into ``tests/chaos/results.json`` (tests that did
not run keep their previous figures, with their own date) and docs/reliability.md is written
from it. Only the fault descriptions and promises below are prose; every number in the
document comes from results.json.

    python tests/chaos/reliability.py     # re-render docs/reliability.md from results.json
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "results.json"
DOC = REPO / "docs" / "reliability.md"

# test name -> (title, how the fault is injected, what remote-mvc promises under it)
FAULTS: dict[str, tuple[str, str, str]] = {
    "test_model_sigkill_under_concurrent_controllers": (
        "1. Model server killed (SIGKILL) during concurrent modifications",
        "Three controller containers modify the model at a steady rate; `docker kill -s KILL` of the "
        "model container in the middle of the stream, then `docker start`.",
        "Every modification acknowledged to a controller is in the restored state and history, at the "
        "revision it was acknowledged with; none is applied twice (controllers retry with the same "
        "request id across the restart); revisions stay gap-free; the audit log has exactly one accepted "
        "record per applied change and none for anything else (a change recorded, then killed before its "
        "commit, is rolled forward from the audit log at start-up); every viewer re-subscribes from its last revision and ends at the final revision "
        "with a gap-free sequence (or an explicit snapshot)."),
    "test_paused_viewer_is_dropped_and_catches_up": (
        "2. Viewer replica paused (`docker pause`) for longer than its lease",
        "A controller streams changes; one of three viewer replicas is frozen with `docker pause` for "
        "1.5 leases, then `docker unpause`.",
        "The other replicas' notification latency stays in its normal range (the frozen viewer only "
        "holds up its own sender); the frozen viewer is dropped (call timeout, or lease) and "
        "counted in `remote_mvc_viewers_dropped_total`; once thawed it finds its lease gone, "
        "re-subscribes from its last revision and catches up without a gap."),
    "test_disconnected_viewer_is_dropped_and_catches_up": (
        "3. Viewer replica cut off the network (`docker network disconnect` / `connect`)",
        "A controller streams changes; one viewer replica is disconnected from the stack's network for "
        "1.5 leases, then connected again with the same address and DNS aliases (a healed partition).",
        "As for a paused viewer: the others are not slowed, the cut-off viewer is dropped and counted, "
        "and after the reconnect it re-subscribes and catches up without a gap."),
    "test_viewer_reconnected_with_a_new_address_recovers": (
        "3b. Viewer replica reconnected with a different address",
        "As in 3, but while the viewer is disconnected another container takes its address, so "
        "`docker network connect` gives it a new one (what plain disconnect/connect does whenever the "
        "address was reused meanwhile).",
        "Same as 3: the viewer host notices its new address when it re-subscribes and advertises it "
        "in its callback URI, then catches up."),
    "test_nameserver_restart_services_found_again": (
        "4. Name server restarted (killed, then recreated with empty storage)",
        "While a controller streams changes: `docker kill` + `docker start` of the name server (its "
        "registrations are durable), then the name server container and its volume removed and "
        "created again (no registrations at all).",
        "Model and ticker are found by name again with no manual step (they check their registration "
        "every 2 s and register again); running controllers and viewers are not interrupted (the name "
        "server is not on the data path); new clients and new viewers find the services."),
    "test_whole_stack_restart_keeps_state_revision_and_audit": (
        "5. Whole stack restarted (`docker compose restart`, then `down` / `up` keeping volumes)",
        "`docker compose restart` of every service; then `docker compose down` (containers and "
        "network removed, named volumes kept) and `up`.",
        "Values, revision, history and the audit log are byte-for-byte intact after each; the next "
        "change gets the next revision; new viewer containers start from the restored state."),
    "test_disk_full_refuses_changes_and_recovers": (
        "6. Disk full under the model server (state, then audit log)",
        "The model's state and audit directories are small tmpfs volumes (tests/chaos/"
        "compose.diskfull.yml); each is filled to the last byte from inside the container, "
        "modifications are attempted, then the space is freed.",
        "A change that cannot be made durable is refused with a clear `PersistenceError` and never "
        "acknowledged; nothing refused is ever applied, shown to a viewer or kept in the history; "
        "viewers keep the last good state; the service accepts changes again, at the next revision, "
        "as soon as there is space; the audit log stays valid JSON lines."),
    "test_viewer_burst_3_to_30_to_3_leaks_nothing": (
        "7. Burst of viewer replicas joining and leaving (scale 3 → 30 → 3, twice)",
        "`docker compose up --scale viewer=30`, a change that must reach all 30, then "
        "`--scale viewer=3`; the cycle is run twice.",
        "The viewer count returns to 3; the model server's open file descriptors and TCP connections "
        "return to their level before the burst; it keeps no thread per viewer that left (only its "
        "warm pools); threads, descriptors and memory do not grow from one cycle to the next; leaving "
        "viewers unsubscribe (none is dropped)."),
    "test_soak": (
        "Soak: steady controllers, tens of viewers, the ticker running",
        "Three controller containers at a steady rate (with some deliberately invalid and conflicting "
        "attempts), tens of viewer replicas on the model plus two on the ticker, for SOAK_SECONDS "
        "(CI: a few minutes; `make soak SOAK_SECONDS=3600` for longer).",
        "Every viewer received every revision once and in order (or an explicit snapshot); the audit "
        "log has exactly one record per attempt with the right result; the model server's memory and "
        "thread count stay flat."),
}


def _git() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{rev}{' (+ local changes)' if dirty else ''}" or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _docker() -> str:
    try:
        return subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                              text=True, timeout=20).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> dict[str, Any]:
    import os

    return {"commit": _git(), "cores": os.cpu_count(), "python": platform.python_version(), "docker": _docker(),
            "kernel": platform.release()}


def load() -> dict[str, Any]:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text(encoding="utf-8"))
    return {"tests": {}, "runs": []}


def update(results: dict[str, dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """Merge one pytest run's results into results.json and rewrite docs/reliability.md."""
    data = load()
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run = {"finished": now, "wall_s": round(wall_seconds, 1), "tests": sorted(results), **machine()}
    data["runs"] = (data.get("runs") or [])[-9:] + [run]
    for name, res in results.items():
        data["tests"][name] = {**res, "finished": now, "commit": run["commit"]}
    RESULTS.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    render(data)
    return data


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) if value else "none"
    if value is None:
        return "–"
    return str(value).replace("|", "\\|").replace("\n", " ")


def figure_rows(figures: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(name, value) rows; a small dict of plain values becomes one row ("threads 12, fds 20")."""
    rows = []
    for key, value in figures.items():
        if isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()) \
                and len(value) <= 8:
            rows.append((f"{prefix}{key}", ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())))
        elif isinstance(value, dict):
            rows += figure_rows(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", _fmt(value)))
    return rows


def render(data: dict[str, Any]) -> str:
    tests = data.get("tests", {})
    runs = data.get("runs") or [{}]
    last = runs[-1]
    out = [
        "# Reliability under faults and load",
        "",
        "<!-- Generated by tests/chaos/reliability.py at the end of every chaos test run, from",
        "     tests/chaos/results.json. Do not edit by hand: run `make chaos` (or `make soak`). -->",
        "",
        "The chaos tests (`tests/chaos/`) inject real faults into the running Compose stack "
        "(`docker-compose.yml` + `docker-compose.chaos.yml`) and check, from the outside, what "
        "remote-mvc promises: controllers' acknowledged changes (their request ids and revisions), "
        "the model's history, snapshot, audit log, `/metrics` and `/proc` figures, and every "
        "viewer's own log of the revisions it applied. Each section below states the promise and "
        "the figures the latest run of that test measured.",
        "",
        "Run them: `make chaos` (all faults and a short soak, ~12 minutes on 2 cores), "
        "`make soak SOAK_SECONDS=3600` (the soak alone, longer). They need Docker with Compose v2.",
        "",
        f"Latest run: {last.get('finished', '?')}, commit {last.get('commit', '?')}, "
        f"{last.get('cores', '?')} cores, Docker {last.get('docker', '?')}, Python {last.get('python', '?')}; "
        f"{len(last.get('tests', []))} test(s) in {_fmt(last.get('wall_s'))} s (image build, when not "
        "reused, and stacks started and removed included).",
        "",
        "| fault | result | test time | when |",
        "| --- | --- | --- | --- |",
    ]
    for name, (title, _, _) in FAULTS.items():
        res = tests.get(name)
        if res is None:
            out.append(f"| {title} | not run yet | | |")
        else:
            out.append(f"| [{title}](#{_anchor(title)}) | **{res['outcome']}** | {_fmt(res.get('duration_s'))} s "
                       f"| {res.get('finished', '?')} |")
    for name, (title, how, promise) in FAULTS.items():
        res = tests.get(name)
        out += ["", f"## {title}", "", f"**Injected:** {how}", "", f"**Promise:** {promise}", ""]
        if res is None:
            out.append("_No result yet._")
            continue
        out.append(f"**Latest result:** {res['outcome']} ({res.get('finished', '?')}, commit "
                   f"{res.get('commit', '?')}, {_fmt(res.get('duration_s'))} s, `{name}`).")
        if res.get("failure"):
            out += ["", "```", res["failure"][:1500], "```"]
        rows = figure_rows(res.get("figures") or {})
        if rows:
            out += ["", "| figure | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    out += ["", "## Definitions", "",
            "* *latency*: time from the model server stamping a change event (`time`, before it is "
            "audited and committed) to the viewer logging that it applied it, both on the same host "
            "clock. *Exact*: from the viewers' logs and the change events' own timestamps, for every "
            "delivery of a revision the history still holds (`n`); *Prometheus*: from the viewers' "
            "`remote_mvc_notification_latency_seconds` histograms (bucket-interpolated).",
            "* *threads*, *RSS*, *fds*, *TCP*: of the model server's Python process, from `/proc/<pid>` inside "
            "its container (`peak RSS` is the kernel's high-water mark `VmHWM`).",
            "* *gap-free*: each viewer applied revisions r, r+1, r+2, … with nothing missing or repeated; a "
            "jump is allowed only where the viewer logged an explicit snapshot.", ""]
    text = "\n".join(out)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    return text


def _anchor(title: str) -> str:
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -")
    return keep.replace(" ", "-")


if __name__ == "__main__":
    render(load())
    print(f"wrote {DOC}", file=sys.stderr)
