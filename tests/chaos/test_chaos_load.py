"""Fault 7 (a burst of viewers joining and leaving) and the soak, on one stack.

The model keeps a history of MVC_HISTORY_LIMIT=1000 events here (10000 by default), so that
its memory reaches its steady state quickly: the history is the one thing it is meant to
hold on to, and a leak is growth beyond it.

Soak knobs (environment): SOAK_SECONDS (default 150), SOAK_VIEWERS (20), SOAK_RATE (modify
attempts per second per controller, 4), SOAK_CONTROLLERS (3).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from chaos_kit import (
    MODEL,
    TICKER,
    ChaosStack,
    ContainerLogs,
    ControllerRun,
    chaos_stack,
    check_sequence,
    latency_summary,
    log,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.slow]

HISTORY_LIMIT = 1000
BURST = 30
BASE_VIEWERS = 3
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS") or 150)
SOAK_VIEWERS = int(os.environ.get("SOAK_VIEWERS") or 20)
SOAK_RATE = float(os.environ.get("SOAK_RATE") or 4)
SOAK_CONTROLLERS = int(os.environ.get("SOAK_CONTROLLERS") or 3)
# Resources the model may keep after a burst without leaking: its pools (Pyro5's idle workers,
# the fan-out's connector threads) stay warm, but they must not grow with the number of viewers
# that came and went, nor from one burst to the next.
LEFT = BURST - BASE_VIEWERS


@pytest.fixture(scope="module")
def load(e2e_images, chaos_env_dir):
    with chaos_stack(e2e_images, chaos_env_dir, "l", VIEWERS=str(BASE_VIEWERS), MVC_TICKER_INTERVAL="0.5",
                     MVC_HISTORY_LIMIT=str(HISTORY_LIMIT)) as stack:
        yield stack


def _settled(stack: ChaosStack, model: str, samples: int = 3) -> dict[str, Any]:
    """The model process' figures, least of a few samples (health checks and scrapes come and go)."""
    seen = []
    for i in range(samples):
        if i:
            time.sleep(1)  # spacing between samples of a measurement, not a wait for a condition
        seen.append(stack.proc_stats(model))
    best = {k: min(s[k] for s in seen) for k in ("threads", "fds", "tcp_established", "tcp_close_wait")}
    return {**best, "rss_mb": round(seen[-1]["rss_mb"], 1), "peak_rss_mb": round(seen[-1]["peak_rss_mb"], 1)}


def _back_to(stack: ChaosStack, model: str, before: dict[str, Any]) -> dict[str, Any] | None:
    """The model's figures once its fds and connections are back to their level before the burst
    and it holds fewer extra threads than viewers left (nothing kept per departed viewer)."""
    now = _settled(stack, model)
    ok = (now["fds"] <= before["fds"] + 2 and now["tcp_established"] <= before["tcp_established"] + 2
          and now["threads"] < before["threads"] + LEFT)
    return now if ok else None


def _connected(stack: ChaosStack, model: str) -> float:
    return stack.metric(model, "remote_mvc_viewers_connected", model=MODEL)


def _scale(stack: ChaosStack, n: int) -> float:
    """Scale the viewer replicas; done when the model counts n subscribed viewers (the condition
    that matters; Docker's health checks of 30 starting containers on 2 cores lag behind it)."""
    model = stack.one("model")
    t0 = time.time()
    stack.compose("up", "-d", "--no-build", "--no-recreate", "--no-deps", "--scale", f"viewer={n}", "viewer",
                  timeout=420)
    wait_until(lambda: len(stack.containers("viewer")) == n and _connected(stack, model) == n, timeout=240,
               what=f"{n} viewer replicas subscribed")
    return time.time() - t0


# ---------------------------------------------------------------------------- 7
def test_viewer_burst_3_to_30_to_3_leaks_nothing(load: ChaosStack, figures: dict[str, Any], tmp_path: Path) -> None:
    with ContainerLogs(tmp_path) as logs:
        _burst(load, figures, logs)


def _burst(load: ChaosStack, figures: dict[str, Any], logs: ContainerLogs) -> None:
    load.wait_healthy("viewer", count=BASE_VIEWERS)
    model = load.one("model")
    for value in (1, 2):  # warm up every path once (modify, fan-out, the metrics server)
        revision = load.set(value=value)
    load.wait_revision(revision, load.containers("viewer"), timeout=60)
    before = _settled(load, model)
    samples = load.scrape(model)
    dropped0 = load.metric(model, "remote_mvc_viewers_dropped_total", samples)
    unsub0 = len(load.events(model, "viewer_unsubscribed"))
    cycles = []
    for cycle in (1, 2):
        log(f"burst {cycle}: scaling viewers {BASE_VIEWERS} -> {BURST}")
        up_s = _scale(load, BURST)
        viewers = load.containers("viewer")
        logs.follow(viewers)  # the leaving viewers' logs outlive their containers
        revision = load.set(value=100 + cycle)
        load.wait_revision(revision, viewers, timeout=90)
        peak = _settled(load, model, samples=1)
        log(f"burst {cycle}: scaling viewers {BURST} -> {BASE_VIEWERS}")
        down_s = _scale(load, BASE_VIEWERS)
        after = wait_until(lambda: _back_to(load, model, before), timeout=90,
                           what="the model's threads, fds and connections back to their level before the burst")
        cycles.append({"scale up (s)": round(up_s, 1), "scale down (s)": round(down_s, 1), "peak": peak,
                       "after": after})

    remaining = load.wait_healthy("viewer", count=BASE_VIEWERS)
    revision = load.set(value=200)
    load.wait_revision(revision, remaining, timeout=60)
    listed = load.ctl_json("viewers")
    assert len(listed) == BASE_VIEWERS, listed
    prom = wait_until(lambda: load.prom_value(f'sum(remote_mvc_viewers_connected{{model="{MODEL}"}})') == BASE_VIEWERS
                      and BASE_VIEWERS, timeout=30, what="Prometheus: 3 viewers connected")
    samples = load.scrape(model)
    dropped = load.metric(model, "remote_mvc_viewers_dropped_total", samples) - dropped0
    left = len(load.events(model, "viewer_unsubscribed")) - unsub0
    reasons = [(e.get("viewer_id"), e.get("reason")) for e in load.events(model, "viewer_dropped")]
    said = "".join(f"\n--- the last lines of {vid} ---\n{logs.of_host(str(vid).rsplit('-', 1)[0])}"
                   for vid, _ in reasons)
    assert (left, dropped) == (2 * LEFT, 0), (
        f"{left} leaving viewers unsubscribed and {int(dropped)} were dropped instead, expected {2 * LEFT} and 0; "
        f"drops: {reasons}{said}")

    after1, after2 = cycles[0]["after"], cycles[1]["after"]
    for c in cycles:
        assert c["peak"]["tcp_established"] >= BURST, "every subscribed viewer has its connection"
        assert c["after"]["tcp_close_wait"] == 0, "connections the model never closed"
    # nothing grows from one burst to the next: a leak per viewer would add 27 of something
    assert after2["threads"] <= after1["threads"] + 2, f"threads: {after1['threads']} -> {after2['threads']}"
    assert after2["fds"] <= after1["fds"] + 2, f"fds: {after1['fds']} -> {after2['fds']}"
    growth = after2["rss_mb"] - after1["rss_mb"]
    assert growth <= 2.0, f"the model's memory grew {growth:.1f} MiB in the second burst"

    figures.update({
        "viewer count after the bursts (model, Prometheus, viewers())": f"{BASE_VIEWERS}, {int(prom)}, {len(listed)}",
        "leaving viewers unsubscribed / dropped": f"{left} / {int(dropped)}",
        "before": before,
        "burst 1": cycles[0],
        "burst 2": cycles[1],
        "RSS growth from burst 1 to burst 2 (MiB)": round(growth, 2),
    })


# ---------------------------------------------------------------------------- soak
class Sampler(threading.Thread):
    """The model process' figures every few seconds while the soak runs."""

    def __init__(self, stack: ChaosStack, model: str, every: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.stack, self.model, self.every = stack, model, every
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append({"t": time.time(), **self.stack.proc_stats(self.model)})
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(str(exc)[:200])
            self._stop_event.wait(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)


def _ticker_watcher(stack: ChaosStack, name: str) -> str:
    return stack.compose("run", "-d", "--no-deps", "-e", f"MVC_WATCH={TICKER}", "-e", f"MVC_VIEWER_ID={name}",
                         "viewer").stdout.strip().splitlines()[-1]


@pytest.mark.soak
def test_soak(load: ChaosStack, figures: dict[str, Any]) -> None:
    model = load.one("model")
    tag = uuid.uuid4().hex[:5]
    # the history at its limit first, so memory is measured in its steady state
    filler = load.controller(f"fill{tag}", rate=500, count=HISTORY_LIMIT + 100, retry=30).wait(timeout=300)
    assert all("revision" in a for a in filler)
    log(f"soak: scaling viewers to {SOAK_VIEWERS}, two ticker watchers")
    _scale(load, SOAK_VIEWERS)
    viewers = load.containers("viewer")
    watchers = [_ticker_watcher(load, f"soak-ticker-{i}") for i in range(2)]
    try:
        start = load.state()["snapshot"]["revision"]
        load.wait_revision(start, viewers, timeout=60)
        counters0 = load.scrape(model)
        sampler = Sampler(load, model)
        sampler.start()
        log(f"soak: {SOAK_CONTROLLERS} controllers x {SOAK_RATE}/s for {SOAK_SECONDS:.0f}s, {SOAK_VIEWERS} viewers")
        t0 = time.time()
        runs: list[ControllerRun] = [
            load.controller(f"soak{tag}c{c}", rate=SOAK_RATE, duration=SOAK_SECONDS, retry=30, invalid_every=25,
                            conflict_every=40) for c in range(SOAK_CONTROLLERS)]
        try:
            attempts = [a for run in runs for a in run.wait(timeout=SOAK_SECONDS + 180)]
        finally:
            for run in runs:
                run.kill()
            sampler.stop()
        t1 = time.time()
        acked = [a for a in attempts if "revision" in a]
        final = max(a["revision"] for a in acked)
        load.wait_revision(final, viewers, timeout=120)
        counters1 = load.scrape(model)
        end_stats = load.proc_stats(model)
        state = load.state(since=start, ticker=True)
        ticker_final = state["ticker"]["revision"]
        load.wait_revision(ticker_final, watchers, timeout=60, model=TICKER)

        # controllers: every valid attempt acknowledged, every refused one refused for its reason
        by_type = Counter(a["type"] for a in attempts)
        wrong = [a for a in attempts if {"valid": "revision" in a, "invalid": a.get("error") == "ValidationError",
                                         "conflict": a.get("error") == "ConflictError"}[a["type"]] is not True]
        assert not wrong, f"{len(wrong)} attempts with an unexpected outcome: {wrong[:3]}"

        # the history (what it still holds) and the revisions: gap-free, each change once
        history = state["history"]
        first_kept = history[0]["revision"] if history else final + 1
        assert [e["revision"] for e in history] == list(range(first_kept, final + 1))
        assert final - start == len(acked), "revisions not made by these controllers"
        by_revision = {e["revision"]: e for e in history}
        for a in acked:
            if a["revision"] >= first_kept:
                assert by_revision[a["revision"]].get("request") == a["marker"], a
        assert sorted(a["revision"] for a in acked) == list(range(start + 1, final + 1)), "duplicate or lost revisions"

        # the audit log: exactly one record per attempt, with the right result and revision
        expected_result = {"valid": "accepted", "invalid": "invalid", "conflict": "conflict"}
        records: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in load.audit():
            name = (r.get("changes") or {}).get("name") if isinstance(r.get("changes"), dict) else None
            if isinstance(name, str) and name.startswith(f"soak{tag}"):
                records[name].append(r)
        assert set(records) == {a["marker"] for a in attempts}, "audit records without an attempt, or missing"
        for a in attempts:
            recs = records[a["marker"]]
            assert len(recs) == 1, f"{len(recs)} audit records for {a['marker']}: {recs}"
            assert recs[0]["result"] == expected_result[a["type"]], (a, recs[0])
            assert recs[0].get("revision") == a.get("revision"), (a, recs[0])

        # every viewer: every revision once, in order, with the acknowledged values; latency
        values_at = {a["revision"]: (a["marker"], a["value"]) for a in acked}
        made = {e["revision"]: e["time"] for e in history}
        latencies, applied, coalesced = [], 0, 0
        for cid in viewers:
            records_v = load.logs(cid)
            seq = check_sequence(records_v, start)
            assert not seq.problems, f"viewer {cid[:12]}: {seq.problems[:5]}"
            assert seq.last == final
            shown = {r["revision"]: (r["values"]["name"], r["values"]["value"]) for r in records_v
                     if r.get("event") == "values" and r.get("model") == MODEL and r["revision"] > start}
            assert all(shown.get(rev, v) == v for rev, v in values_at.items()), f"viewer {cid[:12]} showed other values"
            applied += sum(1 for e in seq.entries if e["snapshot"] is None and e["revision"] > start)
            coalesced += len([s for s in seq.snapshots if s[0] > start])
            latencies += [e["time"] - made[e["revision"]] for e in seq.entries
                          if e["snapshot"] is None and e["revision"] in made and e["revision"] > start]
        ticker_events = 0
        for cid in watchers:
            seq = load.sequence(cid, 0, model=TICKER)
            assert not seq.problems and seq.last is not None and seq.last >= ticker_final, (cid[:12], seq.problems)
            ticker_events += seq.events

        # the model's memory and threads are flat (after the first quarter: connections warm up)
        samples = sampler.samples
        assert len(samples) >= 8, f"too few samples: {len(samples)} ({sampler.errors[:2]})"
        q = max(2, len(samples) // 4)
        rss_first = statistics.median(s["rss_mb"] for s in samples[q:2 * q])
        rss_last = statistics.median(s["rss_mb"] for s in samples[-q:])
        threads_first = statistics.median(s["threads"] for s in samples[q:2 * q])
        threads_last = statistics.median(s["threads"] for s in samples[-q:])
        assert rss_last - rss_first <= max(3.0, 0.05 * rss_first), \
            f"the model's RSS grew from {rss_first:.1f} to {rss_last:.1f} MiB during the soak"
        assert threads_last <= threads_first + 2, f"threads grew from {threads_first} to {threads_last}"

        def delta(name: str, **labels: str) -> int:
            return int(load.metric(model, name, counters1, **labels) - load.metric(model, name, counters0, **labels))

        window = max(10, int(t1 - t0))
        prom_p = {}
        for quantile in (0.5, 0.99):
            value = load.prom_value(
                f'histogram_quantile({quantile}, sum by (le) (increase(remote_mvc_notification_latency_seconds_bucket'
                f'{{model="{MODEL}"}}[{window}s])))')
            prom_p[f"p{int(quantile * 100)}_ms"] = None if value is None else round(value * 1000, 1)
        drops = delta("remote_mvc_viewers_dropped_total")
        lat = latency_summary(latencies)
        peak_rss = max(s["rss_mb"] for s in samples)
        figures.update({
            "report": (f"{len(acked)} changes applied, {applied} notifications delivered to {SOAK_VIEWERS} viewers "
                       f"(+{ticker_events} ticker events to 2 watchers), {drops} drops, latency p50 {lat['p50_ms']} ms "
                       f"p99 {lat['p99_ms']} ms, model peak RSS {peak_rss:.1f} MiB"),
            "duration (s)": round(t1 - t0, 1),
            "controllers x rate (attempts/s)": f"{SOAK_CONTROLLERS} x {SOAK_RATE}",
            "viewers (model + ticker)": f"{SOAK_VIEWERS} + 2",
            "attempts (valid, invalid, conflict)": f"{by_type['valid']}, {by_type['invalid']}, {by_type['conflict']}",
            "changes applied": len(acked),
            "revisions": f"{start + 1}..{final}",
            "history verified from revision": first_kept,
            "audit records checked (one per attempt)": len(attempts),
            "notifications delivered (events applied by viewers)": applied,
            "model: events delivered / notify calls": f"{delta('remote_mvc_events_delivered_total')} / "
                                                      f"{delta('remote_mvc_notifications_sent_total')}",
            "snapshots (coalesced) during the soak": coalesced,
            "drops": drops,
            "latency (exact, from logs)": lat,
            "latency (Prometheus histogram)": prom_p,
            "ticker events applied by the 2 watchers": ticker_events,
            "model RSS MiB (2nd quarter -> last quarter, peak)": f"{rss_first:.1f} -> {rss_last:.1f}, {peak_rss:.1f}",
            "model threads (2nd quarter -> last quarter)": f"{threads_first:.0f} -> {threads_last:.0f}",
            "model fds / TCP established at the end": f"{end_stats['fds']} / {end_stats['tcp_established']}",
            "samples": len(samples),
        })
    finally:
        for cid in watchers:
            load.docker("rm", "-f", "-v", cid, check=False)
        _scale(load, BASE_VIEWERS)
