"""From what the controller sent and what every viewer recorded to latency and loss figures.

Definitions (all times from ``time.time()`` on the one machine clock):

* a change ``s`` has ``t0(s)``: when the controller started the call that made it;
* a viewer *has* ``s`` at the handler entry of the delivery of ``s`` itself, or,
  when ``s`` never came on its own, of the first snapshot at a revision >= ``s``
  (an explicit "you missed some, here is the state");
* fan-out latency of ``s`` = max over viewers of (has-time - t0(s));
* delivery latency = handler entry - t0 of what was delivered, for every delivery;
* paced runs also measure fan-out from when each change was *due* on the
  controller's fixed schedule (``fanout_due_ms``): the wait of a system that
  holds the controller up counts too. A change due in the window but never
  made counts with (time the controller stopped - due time), a lower bound,
  so percentiles over them are lower bounds (``unissued`` says how many);
* lost = a change a viewer neither got nor was covered for by a later snapshot;
  duplicated = a change delivered again; out of order = a change delivered after
  a later one (or a snapshot going backwards).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from typing import Any

import numpy as np


def pct(values: np.ndarray, q: float) -> float | None:
    if values.size == 0:
        return None
    return float(np.percentile(values, q, method="higher"))


def ms(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x * 1000.0, 3)


def analyze(sends: list[tuple[int, float, float]], records: dict[str, dict[str, list]],
            viewers: Iterable[str], schedule: dict[str, Any] | None = None) -> dict[str, Any]:
    """Latency, throughput and loss over the given viewers.

    ``sends``: (seq, t0, t1) per controller call, in call order.
    ``records``: viewer id -> {"seqs", "times", "kinds"} in arrival order.
    ``schedule``: for paced runs, {"due": due time per call, "unissued": due times of changes
    never made, "stopped": when the controller stopped}.

    The per-change samples behind the percentiles are kept under ``_samples`` (for
    :func:`pool`; the runner removes them before the result is written).
    """
    viewers = list(viewers)
    seqs = np.array([s for s, _, _ in sends], dtype=np.int64)
    t0 = np.array([t for _, t, _ in sends], dtype=np.float64)
    index = {int(s): k for k, s in enumerate(seqs)}
    first_seq, final_seq = int(seqs.min()), int(seqs.max())
    has = np.full((len(viewers), len(seqs)), np.nan)
    delivery: list[float] = []
    lost = dup = ooo = snapshots = deliveries = 0
    behind = []
    for row, vid in enumerate(viewers):
        rec = records.get(vid, {"seqs": [], "times": [], "kinds": []})
        seen: set[int] = set()
        high = -1
        snap_seqs: list[int] = []
        snap_times: list[float] = []
        for seq, t, kind in zip(rec["seqs"], rec["times"], rec["kinds"], strict=True):
            if seq < first_seq:
                continue  # from before this scenario (a reconnect resending old state)
            deliveries += 1
            k = index.get(seq)
            if k is not None:
                delivery.append(t - t0[k])
            if kind == 1:
                snapshots += 1
                if seq < high:
                    ooo += 1
                snap_seqs.append(seq)
                snap_times.append(t)
            else:
                if seq in seen:
                    dup += 1
                    continue
                if seq < high:
                    ooo += 1
                seen.add(seq)
                if k is not None:
                    has[row, k] = t
            high = max(high, seq)
        if high < final_seq:
            behind.append(vid)
        # changes that came only inside a later snapshot
        missing = np.nonzero(np.isnan(has[row]))[0]
        if missing.size and snap_seqs:
            running_min_time = []  # a snapshot at revision r covers every change <= r
            best = math.inf
            order = sorted(range(len(snap_seqs)), key=lambda j: snap_seqs[j], reverse=True)
            by_rev = []
            for j in order:
                best = min(best, snap_times[j])
                by_rev.append(snap_seqs[j])
                running_min_time.append(best)
            by_rev.reverse()
            running_min_time.reverse()
            for k in missing:
                j = bisect.bisect_left(by_rev, int(seqs[k]))
                if j < len(by_rev):
                    has[row, k] = running_min_time[j]
        lost += int(np.isnan(has[row]).sum())
    fan = has - t0[None, :]
    complete = ~np.isnan(fan).any(axis=0)
    fanout = np.nanmax(np.where(np.isnan(fan), -np.inf, fan), axis=0)[complete] if len(viewers) else np.array([])
    samples: dict[str, Any] = {"fanout": fanout, "delivery": np.array(delivery),
                               "calls": np.array([b - a for _, a, b in sends]), "from_due": None}
    if schedule is not None and len(viewers):
        due_t = np.array(schedule["due"], dtype=np.float64)
        worst = np.nanmax(np.where(np.isnan(has), -np.inf, has), axis=0)[complete]
        unissued = np.array([schedule["stopped"] - t for t in schedule["unissued"]], dtype=np.float64)
        samples.update(from_due=np.concatenate([worst - due_t[complete], unissued]), unissued=len(unissued),
                       behind_schedule=np.array([a - d for (_, a, _), d in zip(sends, due_t, strict=True)]))
    last_time = float(np.nanmax(has)) if np.isfinite(has).any() else math.nan
    counts = {"viewers": len(viewers), "changes": len(seqs), "first_seq": first_seq, "final_seq": final_seq,
              "deliveries": deliveries, "lost": lost, "out_of_order": ooo, "duplicated": dup,
              "snapshots": snapshots, "behind": behind[:20], "behind_count": len(behind),
              "window_s": last_time - float(t0.min()),
              "controller_window_s": max(s[2] for s in sends) - float(t0.min())}
    return _summary(counts, samples)


def _summary(counts: dict[str, Any], samples: dict[str, Any]) -> dict[str, Any]:
    """A result: counts, rates over the windows, percentiles over the samples."""
    fanout, from_due = samples["fanout"], samples["from_due"]
    due = None
    if from_due is not None:
        due = {"p50": ms(pct(from_due, 50)), "p99": ms(pct(from_due, 99)),
               "max": ms(float(from_due.max()) if from_due.size else None),
               "unissued": samples["unissued"], "lower_bound": bool(samples["unissued"]),
               "behind_schedule_p99": ms(pct(samples["behind_schedule"], 99))}
    window, controller_window = counts["window_s"], counts["controller_window_s"]
    return {
        **{k: counts[k] for k in ("viewers", "changes", "first_seq", "final_seq")},
        "fanout_ms": {"p50": ms(pct(fanout, 50)), "p99": ms(pct(fanout, 99)),
                      "max": ms(float(fanout.max()) if fanout.size else None)},
        "fanout_due_ms": due,
        "delivery_ms": {"p50": ms(pct(samples["delivery"], 50)), "p99": ms(pct(samples["delivery"], 99))},
        "call_ms": {"p50": ms(pct(samples["calls"], 50)), "p99": ms(pct(samples["calls"], 99))},
        "controller_changes_per_s": round(counts["changes"] / controller_window, 1) if controller_window > 0 else None,
        "changes_per_s": round(counts["changes"] / window, 1) if window > 0 else None,
        "deliveries": counts["deliveries"],
        "deliveries_per_s": round(counts["deliveries"] / window, 1) if window > 0 else None,
        **{k: counts[k] for k in ("lost", "out_of_order", "duplicated", "snapshots", "behind", "behind_count")},
        "window_s": round(window, 3),
        "controller_window_s": round(controller_window, 3),
        "_samples": samples,
    }


def pool(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several rounds of one measurement (same system, scenario and N).

    Percentiles are taken over the changes of all rounds together, counts are
    summed, and rates are over the rounds' windows added up (the gaps between
    rounds, when other systems were measured, count for nothing). ``rounds``
    keeps each round's own p99s and rate, so the spread between rounds shows.
    """
    if len(parts) == 1:
        return parts[0]
    samples = [p["_samples"] for p in parts]
    pooled: dict[str, Any] = {k: np.concatenate([s[k] for s in samples]) for k in ("fanout", "delivery", "calls")}
    pooled["from_due"] = None
    if all(s["from_due"] is not None for s in samples):
        pooled.update(from_due=np.concatenate([s["from_due"] for s in samples]),
                      unissued=sum(s["unissued"] for s in samples),
                      behind_schedule=np.concatenate([s["behind_schedule"] for s in samples]))
    counts: dict[str, Any] = {k: sum(p[k] for p in parts) for k in
                              ("changes", "deliveries", "lost", "out_of_order", "duplicated", "snapshots",
                               "behind_count", "window_s", "controller_window_s")}
    counts.update(viewers=parts[0]["viewers"], first_seq=min(p["first_seq"] for p in parts),
                  final_seq=max(p["final_seq"] for p in parts), behind=[v for p in parts for v in p["behind"]][:20])
    result = _summary(counts, pooled)
    result["rounds"] = [{"fanout_p99_ms": p["fanout_ms"]["p99"],
                         "fanout_due_p99_ms": p["fanout_due_ms"]["p99"] if p["fanout_due_ms"] else None,
                         "changes_per_s": p["changes_per_s"], "changes": p["changes"]} for p in parts]
    return result
