"""The running stack, end to end: controllers, viewers, Prometheus, restarts, auth.

The tests share one stack (the ``stack`` fixture) and run in file order; each makes its
own changes and checks only what it caused, so any one of them also runs alone (-k).
"""

from __future__ import annotations

import secrets

import pytest
from e2e_stack import MODEL, TICKER, log, parse_json_lines, sh, wait_until

pytestmark = pytest.mark.e2e

VIEWER_METRIC = f'sum(remote_mvc_viewers_connected{{model="{MODEL}"}})'
SCRAPED_VIEWERS = 'count(up{job="viewer"} == 1)'


def test_controller_change_reaches_every_viewer_replica(stack):
    viewers = stack.wait_healthy("viewer", count=3)
    revision = stack.set(name="e2e", value=7)
    states = stack.wait_viewers_at(revision, {"name": "e2e", "value": 7}, viewers, timeout=30)
    for state in states:
        assert state["level"] == "INFO" and state["service"] == "viewer"
        assert {"timestamp", "logger", "message", "viewer_id"} <= state.keys()
        assert state["message"].startswith("Model values now: {")
    # Each replica also logged the refresh for that revision, under its own viewer id.
    ids = set()
    for cid in viewers:
        refresh = stack.events(cid, "refresh", revision=revision)
        assert refresh and refresh[-1]["message"] == "Received a refresh notification from the server"
        ids.add(refresh[-1]["viewer_id"])
    assert len(ids) == 3
    modified = stack.events(stack.containers("model")[0], "modified", revision=revision)
    assert modified and modified[0]["identity"] == "controller"


def test_controller_without_credentials_cannot_modify(stack):
    before = stack.snapshot()
    marker = f"intruder-{secrets.token_hex(3)}"
    proc = stack.ctl("set", f"name={marker}", env={"MVC_CREDENTIALS_FILE": "", "MVC_IDENTITY": ""}, check=False)
    assert proc.returncode != 0, proc.stdout
    assert "Permission" in proc.stderr or "denied" in proc.stderr.lower(), proc.stderr
    after = stack.snapshot()
    assert (after["revision"], after["values"]) == (before["revision"], before["values"])
    # The refusal is in the audit log, inside the model container.
    model = stack.containers("model")[0]
    audit = sh(["docker", "exec", model, "cat", "/var/log/remote-mvc/audit.jsonl"]).stdout
    records = [r for r in parse_json_lines(audit) if marker in str(r.get("changes"))]
    assert records, f"no audit record for the refused change in:\n{audit[-2000:]}"
    assert records[-1]["action"] == "modify"
    assert records[-1]["result"] == "forbidden"
    assert records[-1]["identity"] == "anonymous"
    # Wrong credentials are refused at the handshake (and audited as well).
    proc = stack.ctl(
        "set", f"name={marker}", env={"MVC_IDENTITY": "controller", "MVC_SECRET": "00" * 32}, check=False
    )
    assert proc.returncode != 0
    assert stack.snapshot()["revision"] == before["revision"]


def test_ticker_changes_reach_a_viewer_watching_the_ticker(stack):
    name = (
        sh(
            [
                *stack.compose_argv,
                "run",
                "-d",
                "--no-deps",
                "-e",
                f"MVC_WATCH={TICKER}",
                "-e",
                "MVC_VIEWER_ID=e2e-ticker-watch",
                "viewer",
            ],
            env=stack.env,
            timeout=120,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    try:

        def ticks():
            seen = [r for r in stack.logs(name) if r.get("event") == "values" and r.get("model") == TICKER]
            return seen if len({r["revision"] for r in seen}) >= 3 else None

        seen = wait_until(ticks, timeout=60, what="3 ticker revisions at the ticker viewer")
        revisions = [r["revision"] for r in seen]
        assert revisions == sorted(revisions)
        assert all(r["viewer_id"] == "e2e-ticker-watch" for r in seen)
        assert seen[-1]["values"]["tick"] > seen[0]["values"]["tick"]
        # The ticker counts it as its subscriber.
        wait_until(
            lambda: stack.prom_value(f'sum(remote_mvc_viewers_connected{{model="{TICKER}"}})') == 1,
            timeout=30,
            what="ticker's viewer gauge at 1 in Prometheus",
        )
    finally:
        sh(["docker", "rm", "-f", "-v", name], check=False)


def test_prometheus_counts_viewers_and_latency_through_scaling(stack):
    wait_until(
        lambda: stack.prom_value(VIEWER_METRIC) == 3 and stack.prom_value(SCRAPED_VIEWERS) == 3,
        timeout=60,
        what="Prometheus: 3 viewers connected and scraped",
    )
    revision = stack.set(value=11)
    stack.wait_viewers_at(revision, {"value": 11}, timeout=30)
    count = wait_until(
        lambda: stack.prom_value(f'sum(remote_mvc_notification_latency_seconds_count{{model="{MODEL}"}})'),
        timeout=30,
        what="latency observations in Prometheus",
    )
    assert count >= 3
    p99 = wait_until(
        lambda: stack.prom_value(
            f'histogram_quantile(0.99, sum by (le) (remote_mvc_notification_latency_seconds_bucket{{model="{MODEL}"}}))'
        ),
        timeout=30,
        what="a latency p99",
    )
    assert 0 < p99 < 10
    buckets = stack.prom(f'remote_mvc_notification_latency_seconds_bucket{{model="{MODEL}"}}')
    assert len({b["metric"]["instance"] for b in buckets}) == 3, "every replica exports its histogram"

    log("scaling viewers to 5")
    stack.up("--no-recreate", "--scale", "viewer=5", "viewer")
    assert len(stack.wait_healthy("viewer", count=5)) == 5
    wait_until(
        lambda: stack.prom_value(VIEWER_METRIC) == 5 and stack.prom_value(SCRAPED_VIEWERS) == 5,
        timeout=60,
        what="Prometheus: 5 viewers connected and scraped",
    )

    victim = stack.containers("viewer")[0]
    viewer_id = stack.events(victim, "subscribed")[-1]["viewer_id"]
    log(f"stopping viewer {viewer_id} gracefully")
    sh(["docker", "stop", "-t", "10", victim])
    assert stack.inspect(victim)["State"]["ExitCode"] == 0, "graceful stop should exit 0"
    wait_until(
        lambda: stack.prom_value(VIEWER_METRIC) == 4 and stack.prom_value(SCRAPED_VIEWERS) == 4,
        timeout=60,
        what="Prometheus: 4 viewers after stopping one",
    )
    model = stack.containers("model")[0]
    gone = stack.events(model, "viewer_unsubscribed", viewer_id=viewer_id)
    assert gone, f"model did not log viewer_unsubscribed for {viewer_id}"
    assert not stack.events(model, "viewer_dropped", viewer_id=viewer_id)
    assert stack.events(victim, "unsubscribed", viewer_id=viewer_id)


def test_model_restart_loses_no_acknowledged_change(stack):
    marker = f"durable-{secrets.token_hex(3)}"
    revision = stack.set(name=marker, value=42)
    before = stack.snapshot()
    assert before["revision"] == revision and before["values"]["name"] == marker

    log("killing the model container (SIGKILL) and starting it again")
    stack.compose("kill", "-s", "SIGKILL", "model")
    stack.compose("start", "model")
    stack.wait_healthy("model", count=1, timeout=90)
    after = wait_until(stack.snapshot, timeout=30, what="model answering after restart")
    assert (after["revision"], after["values"]) == (before["revision"], before["values"])

    revision2 = stack.set(value=43)
    assert revision2 == revision + 1
    stack.wait_viewers_at(revision2, {"name": marker, "value": 43}, timeout=60)
    # History is gap-free across the restart.
    events = stack.ctl_json("history", "--since", str(revision - 1))
    assert [e["revision"] for e in events] == [revision, revision2]


def test_nameserver_restart_services_found_again(stack):
    log("restarting the name server container")
    stack.compose("restart", "nameserver")
    stack.wait_healthy("nameserver", count=1, timeout=90)
    snap = wait_until(stack.snapshot, timeout=60, what="remote-mvc-ctl query to find the model by name")
    assert snap["model"] == MODEL
    revision = stack.set(name="after-ns-restart", value=5)
    stack.wait_viewers_at(revision, {"name": "after-ns-restart", "value": 5}, timeout=60)
    # The ticker is found by name as well.
    assert stack.snapshot("ticker")["model"] == TICKER
