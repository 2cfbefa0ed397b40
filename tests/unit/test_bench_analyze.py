"""The benchmark's figures: latency, loss and order from raw records, and rounds pooled into one result.

The benchmark's own dependencies (numpy) come with ``make bench-deps``, which ``.ci/run`` runs first.
"""

import pytest

pytest.importorskip("numpy")

from bench.analyze import analyze, pool  # noqa: E402


def _round(first_seq: int, start: float, latencies_ms: list[list[float]], rate: float = 50.0):
    """Changes first_seq.. made on a 1/rate schedule from ``start``; latencies_ms[v][k]: viewer v, change k."""
    n = len(latencies_ms[0])
    sends = [(first_seq + k, start + k / rate, start + k / rate + 0.001) for k in range(n)]
    records = {f"v{v}": {"seqs": [s for s, _, _ in sends],
                         "times": [t0 + lat / 1000 for (_, t0, _), lat in zip(sends, lats, strict=True)],
                         "kinds": [0] * n}
               for v, lats in enumerate(latencies_ms)}
    schedule = {"due": [t0 for _, t0, _ in sends], "unissued": [], "stopped": sends[-1][2]}
    return sends, records, schedule


def test_fanout_is_the_slowest_viewer_per_change():
    sends, records, schedule = _round(1, 1000.0, [[1, 2, 3, 4], [5, 1, 1, 9]])
    r = analyze(sends, records, ["v0", "v1"], schedule)
    assert r["fanout_ms"]["max"] == pytest.approx(9, abs=1e-3)
    assert r["fanout_ms"]["p50"] == pytest.approx(5, abs=1e-3)  # of 5, 2, 3, 9 (the higher middle value)
    assert (r["lost"], r["duplicated"], r["out_of_order"], r["behind_count"]) == (0, 0, 0, 0)


def test_lost_duplicated_and_reordered_deliveries_are_counted():
    sends, records, _ = _round(1, 1000.0, [[1, 1, 1, 1]])
    rec = records["v0"]
    rec["seqs"] = [1, 3, 2, 3]  # 2 after 3, then 3 again, and 4 never
    r = analyze(sends, records, ["v0"])
    assert (r["lost"], r["out_of_order"], r["duplicated"], r["behind_count"]) == (1, 1, 1, 1)


def test_rounds_pool_into_percentiles_over_all_changes():
    a = analyze(*_round(1, 1000.0, [[1.0] * 99 + [50.0]])[:2], ["v0"], _round(1, 1000.0, [[1.0] * 100])[2])
    b = analyze(*_round(200, 2000.0, [[2.0] * 100])[:2], ["v0"], _round(200, 2000.0, [[2.0] * 100])[2])
    assert a["fanout_ms"]["p99"] == pytest.approx(50, abs=1e-3)  # one slow change in 100 is the p99...
    pooled = pool([a, b])
    assert pooled["changes"] == 200
    assert pooled["fanout_ms"]["max"] == pytest.approx(50, abs=1e-3)
    assert pooled["fanout_ms"]["p99"] == pytest.approx(2.0, abs=1e-3)  # ...of 200 over two rounds, it is not
    assert pooled["fanout_due_ms"]["p99"] == pytest.approx(2.0, abs=1e-3)
    # rates over the rounds' own windows: the gap between them (1000 s) counts for nothing
    assert pooled["changes_per_s"] == pytest.approx(200 / (a["window_s"] + b["window_s"]), rel=1e-2)
    assert [x["fanout_p99_ms"] for x in pooled["rounds"]] == [a["fanout_ms"]["p99"], b["fanout_ms"]["p99"]]


def test_one_round_pools_to_itself():
    a = analyze(*_round(1, 1000.0, [[1.0, 2.0]])[:2], ["v0"])
    assert pool([a]) is a
