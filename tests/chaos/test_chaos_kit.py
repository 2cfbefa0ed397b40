"""The chaos tests' own checks can fail: gaps, repeats and regressions in a viewer's log are caught."""

from __future__ import annotations

from chaos_kit import MODEL, check_sequence, percentiles


def _log(*items):
    records, t = [], 0
    for item in items:
        t += 1
        stamp = f"2026-01-01T00:00:{t:02d}+00:00"
        if item == "start":
            records.append({"event": "service_started", "timestamp": stamp})
        else:
            revision, snapshot = item if isinstance(item, tuple) else (item, None)
            rec = {"event": "refresh", "model": MODEL, "revision": revision, "timestamp": stamp}
            if snapshot:
                rec["snapshot"] = snapshot
            records.append(rec)
    return records


def test_a_complete_sequence_passes():
    rep = check_sequence(_log("start", (0, "subscribe"), 1, 2, 3, 4))
    assert rep.problems == [] and rep.last == 4 and rep.events == 4 and rep.snapshots == [(0, "subscribe")]


def test_gaps_repeats_and_regressions_are_caught():
    assert check_sequence(_log((0, "subscribe"), 1, 3)).problems == ["gap: 1 -> 3"]
    assert check_sequence(_log((0, "subscribe"), 1, 2, 2)).problems == ["repeated or out of order: 2 -> 2"]
    assert "went back" in check_sequence(_log((5, "subscribe"), 6, (4, "gap"))).problems[0]
    assert "went back" in check_sequence(_log((5, "subscribe"), 6, "start", (3, "subscribe"))).problems[0]


def test_explicit_snapshots_and_restarts_may_jump_ahead():
    rep = check_sequence(_log((0, "subscribe"), 1, (40, "behind"), 41, "start", (45, "subscribe"), 46))
    assert rep.problems == [] and rep.restarts == 1 and len(rep.snapshots) == 3


def test_the_check_starts_at_the_anchor():
    rep = check_sequence(_log((0, "subscribe"), 1, 5, 6, 7), from_revision=5)  # the gap before 5 is not ours
    assert rep.problems == [] and [e["revision"] for e in rep.entries] == [5, 6, 7]
    assert check_sequence(_log((0, "subscribe"), 1, 5, 6, 8), from_revision=5).problems == ["gap: 6 -> 8"]


def test_percentiles_nearest_rank():
    assert percentiles(range(1, 101), 50, 99, 100) == [50, 99, 100]
    assert percentiles([], 50) == [None]
