"""The benchmark's verdicts and breakdowns: issue 13's targets from results, and where a profile's time goes.

The benchmark's own dependencies (numpy, psutil) come with ``make bench-deps``, which ``.ci/run`` runs first.
"""

from pathlib import Path

import pytest

pytest.importorskip("numpy")
pytest.importorskip("psutil")

from bench import report  # noqa: E402
from bench.commit import markdown  # noqa: E402
from bench.profile_summary import breakdown, waiting  # noqa: E402


def _result(system: str, scenario: str, n: int, p99_due: float | None, *, changes_per_s: float = 50.0,
            snapshots: int = 0, lost: int = 0, behind: int = 0, cpu_us: float = 10.0) -> dict:
    due = None if p99_due is None else {"p50": 1.0, "p99": p99_due, "max": p99_due, "lower_bound": False,
                                        "unissued": 0}
    return {"system": system, "label": system, "scenario": scenario, "n": n, "durable": system != "redis",
            "fanout_ms": {"p50": 1.0, "p99": p99_due if p99_due is not None else 5.0, "max": 9.0},
            "fanout_due_ms": due, "changes_per_s": changes_per_s, "snapshots": snapshots, "lost": lost,
            "behind_count": behind, "out_of_order": 0, "duplicated": 0,
            "server": {"server_cpu_us_per_delivery": cpu_us, "rss_mb": 40.0}}


def _verdicts(results: list[dict]) -> dict[str, bool | None]:
    return {t["target"].split(":")[0]: t["met"] for t in report.targets(results) if t["system"] == "remote-mvc"}


def test_each_target_passes_at_its_bound():
    results = [_result("remote-mvc", "paced", 1000, 50.0), _result("remote-mvc", "paced", 200, 8.0),
               _result("redis", "paced", 200, 10.0), _result("remote-mvc", "paced", 10000, 250.0),
               _result("remote-mvc", "unpaced", 200, None, changes_per_s=300.0),
               _result("redis", "unpaced", 200, None, changes_per_s=100.0)]
    v = _verdicts(results)
    assert v["N=1000 paced 50/s"] is True
    assert v["N=200 paced"] is True  # 8 <= 0.8 x 10
    assert v["N=10000 paced 10/s"] is True
    assert v["N=200 unpaced"] is True  # 300 >= 3 x 100
    assert v["server CPU per delivery reported (falls with viewers per host)"] is None  # reported, not judged


def test_each_target_fails_past_its_bound():
    results = [_result("remote-mvc", "paced", 1000, 50.1), _result("remote-mvc", "paced", 200, 8.1),
               _result("redis", "paced", 200, 10.0), _result("remote-mvc", "paced", 10000, 251.0),
               _result("remote-mvc", "unpaced", 200, None, changes_per_s=299.0),
               _result("redis", "unpaced", 200, None, changes_per_s=100.0)]
    v = _verdicts(results)
    assert not any(v[k] for k in ("N=1000 paced 50/s", "N=200 paced", "N=10000 paced 10/s", "N=200 unpaced"))


@pytest.mark.parametrize("drop", [{"snapshots": 1}, {"lost": 1}, {"behind": 1}])
def test_a_dropped_viewer_fails_the_big_targets_however_fast(drop: dict):
    results = [_result("remote-mvc", "paced", 1000, 5.0, **drop), _result("remote-mvc", "paced", 10000, 5.0, **drop)]
    v = _verdicts(results)
    assert v["N=1000 paced 50/s"] is False
    assert v["N=10000 paced 10/s"] is False


def test_a_p99_that_is_only_a_lower_bound_passes_no_target():
    """Changes due but never made: the p99 from due is a lower bound, below the target or not."""
    results = [_result("remote-mvc", "paced", 1000, 5.0), _result("remote-mvc", "paced", 200, 1.0),
               _result("redis", "paced", 200, 10.0), _result("remote-mvc", "paced", 10000, 5.0)]
    for r in results:
        r["fanout_due_ms"]["lower_bound"] = True
    v = _verdicts(results)
    assert (v["N=1000 paced 50/s"], v["N=200 paced"], v["N=10000 paced 10/s"]) == (False, False, False)


def test_target_table_says_pass_fail_and_reported():
    results = [_result("remote-mvc", "paced", 1000, 70.0), _result("remote-mvc", "paced", 200, 1.0),
               _result("redis", "paced", 200, 10.0)]
    doc = {"targets": report.targets(results), "results": results, "ratios": [], "errors": []}
    rows = [line for line in report.markdown_targets(doc) if line.startswith("| remote-mvc")]
    assert any("N=1000" in r and "| FAIL |" in r for r in rows)
    assert any("N=200 paced" in r and "| pass |" in r for r in rows)
    assert any("CPU per delivery" in r and "| reported |" in r and "N=200: 10.0 µs" in r for r in rows)


def _profile(tmp_path: Path, stacks: dict[str, int]) -> Path:
    path = tmp_path / "p.txt"
    path.write_text("".join(f"{stack} {count}\n" for stack, count in stacks.items()))
    return path


def test_breakdown_shares_busy_samples_and_leaves_waits_out(tmp_path: Path):
    root = "Thread._bootstrap (threading.py:1002);Worker.run (Pyro5/svr_threads.py:272)"
    path = _profile(tmp_path, {
        f"{root};Store.commit_many (remote_mvc/_store.py:210)": 30,
        f"{root};AuditLog.record_many (remote_mvc/audit.py:140);dumps (json/__init__.py:231)": 10,
        f"{root};log_event (remote_mvc/logs.py:66);Logger.log (logging/__init__.py:1500)": 10,
        f"{root};AuditLog.record_many (remote_mvc/audit.py:146)": 500,  # blocked in the fsync
        "Thread._bootstrap (threading.py:1002);Event.wait (threading.py:629);Condition.wait (threading.py:331)": 900,
        f"{root};select (selectors.py:1);EpollSelector.select (selectors.py:468)": 700,
    })
    shares = breakdown(path)
    assert shares == pytest.approx({"sqlite commit": 0.6, "json (de)serialize": 0.2,
                                    "logging (JSON log lines)": 0.2})
    assert sum(breakdown(path, busy=False).values()) == pytest.approx(1.0)


def test_waiting_is_decided_by_the_innermost_frame():
    assert waiting(["a (x.py:1)", "Condition.wait (threading.py:331)"])
    assert not waiting(["Condition.wait (threading.py:331)", "dumps (json/__init__.py:231)"])


def test_commit_markdown_lists_cpu_per_change_and_its_breakdown():
    facts = {"cpu_model": "cpu", "cpus": 2, "git_commit": "abc", "fsync_p50_us": 100}
    runs = [{"system": "remote-mvc", "controllers": 1, "rate": 50.0, "changes_per_s": 50.0,
             "call_ms": {"p50": 0.5, "p99": 2.0}, "server_cpu_us_per_change": 400.0,
             "breakdown_us_per_change": {"sqlite commit": 60.0, "logging (JSON log lines)": 20.0}},
            {"system": "remote-mvc-ref", "controllers": 1, "rate": 50.0, "changes_per_s": 50.0,
             "call_ms": {"p50": 0.6, "p99": 2.5}, "server_cpu_us_per_change": 450.0,
             "breakdown_us_per_change": {"sqlite commit": 70.0}}]
    text = markdown(facts, "8deed8e", 5.0, runs)
    assert "| 1 | 50/s each | remote-mvc | 50.0 | 0.5 | 2.0 | 400.0 |" in text
    assert "| logging (JSON log lines) | 20.0 | 0.0 |" in text  # a category one run lacks counts 0 there


def test_commit_path_takes_the_median_of_each_stage_and_lists_every_stage():
    from bench.commit_path import STAGES, median_run
    from bench.commit_path import markdown as path_markdown

    runs = [{"changes": 100, "wall_us": w, "cpu_us": w / 2, "stages_us": {s: w / 10 for s in STAGES}}
            for w in (300.0, 500.0, 310.0)]
    m = median_run(runs)
    assert (m["wall_us"], m["cpu_us"], m["repeats"]) == (310.0, 155.0, 3)
    assert m["stages_us"]["audit: write + fsync"] == 31.0
    facts = {"cpu_model": "cpu", "cpus": 2, "git_commit": "abc", "fsync_p50_us": 100}
    text = path_markdown(facts, {"remote-mvc": m, "remote-mvc @ ref": median_run(runs[:1])})
    assert all(f"| {s} | 31.0 | 30.0 |" in text for s in STAGES)
    assert "| **wall per change** | **310.0** | **300.0** |" in text
