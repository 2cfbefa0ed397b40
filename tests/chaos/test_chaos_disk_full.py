"""Fault 6: the model server's disk fills up (state, then audit log), then has space again.

Own stack: name server, model, 2 viewers (no ticker, no Prometheus), with the model's state
and audit directories on small tmpfs volumes (tests/chaos/compose.diskfull.yml), filled to
the last byte from inside the container by the service's own user.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from chaos_kit import HERE, MODEL, ChaosStack, chaos_stack, log, parse_json_lines

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.slow]

STATE_DIR = "/var/lib/remote-mvc"
AUDIT_DIR = "/var/log/remote-mvc"


@pytest.fixture(scope="module")
def disk(e2e_images, chaos_env_dir):
    with chaos_stack(e2e_images, chaos_env_dir, "d", overrides=[HERE / "compose.diskfull.yml"], up_args=["viewer"],
                     VIEWERS="2", MVC_LEASE_SECONDS="5", MVC_CALL_TIMEOUT="2") as stack:
        yield stack


def _fill(stack: ChaosStack, model: str, directory: str) -> int:
    """Fill the file system to the last byte; returns the bytes written."""
    script = (f"dd if=/dev/zero of={directory}/chaos-fill bs=64k 2>/dev/null; "
              f"dd if=/dev/zero of={directory}/chaos-fill-tail bs=512 2>/dev/null; "
              f"df -k --output=avail {directory} | tail -1; du -bc {directory}/chaos-fill* | tail -1")
    avail, used = stack.exec(model, "sh", "-c", script).stdout.split()[:2]
    assert int(avail) == 0, f"{directory} still has {avail} KiB free"
    return int(used)


def _free(stack: ChaosStack, model: str, directory: str) -> None:
    stack.exec(model, "sh", "-c", f"rm -f {directory}/chaos-fill {directory}/chaos-fill-tail")


def _attempts(stack: ChaosStack, prefix: str, count: int) -> list[dict[str, Any]]:
    return stack.controller(prefix, rate=20, count=count, retry=5).wait(timeout=120)


def _model_counter(stack: ChaosStack, model: str, name: str, **labels: str) -> float:
    return stack.metric(model, name, **labels)


def test_disk_full_refuses_changes_and_recovers(disk: ChaosStack, figures: dict[str, Any]) -> None:
    viewers = disk.wait_healthy("viewer", count=2)
    model = disk.one("model")
    tag = uuid.uuid4().hex[:5]
    good = _attempts(disk, f"good{tag}", 5)
    assert all("revision" in a for a in good)
    acked = list(good)
    refused: list[dict[str, Any]] = []
    phases: dict[str, Any] = {}

    for phase, directory, expected in (("state", STATE_DIR, "could not commit"),
                                       ("audit", AUDIT_DIR, "audit log")):
        last_good = disk.snapshot()["revision"]
        disk.wait_revision(last_good, viewers, timeout=60)
        filled = _fill(disk, model, directory)
        log(f"{phase} file system full ({filled} bytes of filler)")
        tries = _attempts(disk, f"{phase}{tag}", 40 if phase == "audit" else 8)
        ok = [a for a in tries if "revision" in a]
        bad = [a for a in tries if "revision" not in a]
        assert bad, f"no modification refused with the {phase} file system full"
        assert all(a["error"] == "PersistenceError" and expected in a["message"] for a in bad), bad[:3]
        first_refused = bad[0]["i"]
        assert all("revision" not in a for a in tries if a["i"] > first_refused), \
            "accepted again while the disk was still full"
        # what a person sees
        cli = disk.ctl("set", f"name=cli-{phase}{tag}", check=False)
        cli_error = [ln for ln in cli.stderr.splitlines() if ln.startswith("error:")]
        assert cli.returncode == 1 and cli_error and cli_error[-1].startswith("error: PersistenceError:"), cli.stderr
        # the model did not move past what it acknowledged; viewers keep the last good state
        current = disk.snapshot()
        assert current["revision"] == (ok[-1]["revision"] if ok else last_good)
        for cid in viewers:
            assert disk.last_revision(cid) == current["revision"], f"viewer {cid[:12]} is not at the last good state"
        assert disk.wait_healthy("viewer", count=2)

        _free(disk, model, directory)
        again = _attempts(disk, f"{phase}ok{tag}", 3)
        assert all("revision" in a for a in again), f"not accepting changes after the {phase} disk recovered"
        assert again[0]["revision"] == current["revision"] + 1, "a refused change used up a revision"
        acked += ok + again
        refused += bad + [{"marker": f"cli-{phase}{tag}"}]
        phases[phase] = {
            "filler bytes": filled,
            "attempts while full": len(tries),
            "acknowledged while full (fit in space already allocated)": len(ok),
            "refused": len(bad),
            "error": f"{bad[0]['error']}: {bad[0]['message'][:120]}",
            "CLI": cli_error[-1][:160],
            "accepted again at revision": again[0]["revision"],
        }

    final = acked[-1]["revision"]
    disk.wait_revision(final, viewers, timeout=60)
    state = disk.state()
    history = state["history"]
    assert [e["revision"] for e in history] == list(range(1, final + 1)), "history not gap-free"
    assert state["snapshot"]["revision"] == final
    by_marker = {e.get("request"): e["revision"] for e in history}
    for a in acked:
        assert by_marker.get(a["marker"]) == a["revision"], f"acknowledged {a} missing from history"
    names_seen = {e["values"]["name"] for e in history}
    leaked = [a["marker"] for a in refused if a["marker"] in names_seen]
    assert not leaked, f"refused changes in the history: {leaked}"

    per_viewer = []
    for cid in viewers:
        seq = disk.sequence(cid)
        assert not seq.problems and seq.last == final, (cid[:12], seq.problems, seq.last)
        shown = {r["values"]["name"] for r in disk.events(cid, "values") if r.get("model") == MODEL}
        assert not [m for m in (a["marker"] for a in refused) if m in shown], f"viewer {cid[:12]} showed a refused change"
        per_viewer.append(f"{seq.events}/{len(seq.snapshots)}")

    # counted, and the audit log is whole (valid JSON lines: no half-written record)
    samples = disk.scrape(model)
    persist_failed = disk.metric(model, "remote_mvc_modifications_total", samples, result="persist_failed")
    audit_failed = disk.metric(model, "remote_mvc_modifications_total", samples, result="audit_failed")
    assert persist_failed == phases["state"]["refused"] + 1  # + the CLI attempt
    assert audit_failed == phases["audit"]["refused"] + 1
    text = disk.audit_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # raises on a torn record
    assert len(records) == len(parse_json_lines(text))
    state_markers = {a["marker"] for a in refused if a["marker"].startswith(f"state{tag}")}
    state_records = [r for r in records if r.get("request") in state_markers]
    assert sorted(r["request"] for r in state_records) == sorted(state_markers), "one accepted record each"
    failed = {r["revision"] for r in records if r["result"] == "failed"}
    assert all(r["result"] == "accepted" and r["revision"] in failed for r in state_records), \
        "each refused change's accepted record must be followed by a failed record"
    audit_markers = {a["marker"] for a in refused if a["marker"].startswith(f"audit{tag}")}
    assert not [r for r in records if r.get("request") in audit_markers], "a refused change was audited as accepted"

    unclear = [a["message"] for a in refused if "message" in a and a["message"].startswith("could not commit")
               and "full" not in a["message"]]
    figures.update({
        "refusals whose message names the cause (disk full)": f"{sum(1 for a in refused if 'message' in a) - len(unclear)}"
                                                             f" of {sum(1 for a in refused if 'message' in a)}",
        "tmpfs sizes (state, audit)": "8 MiB, 2 MiB",
        "state full": phases["state"],
        "audit full": phases["audit"],
        "final revision (gap-free, only acknowledged changes)": final,
        "modifications_total{result=persist_failed}": int(persist_failed),
        "modifications_total{result=audit_failed}": int(audit_failed),
        "audit records while the state disk was full": "per refused change: accepted, then failed",
        "audit log lines, all valid JSON": len(lines),
        "viewers (changes applied/snapshots, all gap-free)": ", ".join(per_viewer),
    })

    if unclear:
        # the refusal must name the cause (it once said "cannot rollback - no transaction is
        # active": Store.commit's ROLLBACK after SQLite had already rolled back by itself)
        pytest.fail(f"unclear refusal message for a full state disk: {unclear[0]!r}")


def test_freed_space_goes_to_the_wal_first_and_changes_go_through_without_a_restart(
        disk: ChaosStack, figures: dict[str, Any]) -> None:
    """The wedge of issue 14: with a grown WAL, a full state disk, then a little space freed, the
    retried commits used to append to the WAL again (about 30 changes fit in 512 KiB) while the
    checkpoint that would empty it needed the database file to grow first: the model refused every
    change from then on, even after a restart. Now the first commit after the refusal empties the WAL
    (TRUNCATE checkpoint) and everything after it goes through."""
    viewers = disk.wait_healthy("viewer", count=2)
    model = disk.one("model")
    tag = uuid.uuid4().hex[:5]
    warm = _attempts(disk, f"walwarm{tag}", 150)
    assert all("revision" in a for a in warm)
    wal_before = int(disk.exec(model, "sh", "-c", f"stat -c %s {STATE_DIR}/*-wal").stdout.split()[0])
    filled = _fill(disk, model, STATE_DIR)
    tries = _attempts(disk, f"walfull{tag}", 5)
    assert [a for a in tries if "revision" not in a], "no change refused with the state disk full"
    # free 512 KiB only: less than the WAL the retried commits would otherwise append to
    disk.exec(model, "sh", "-c", f"rm -f {STATE_DIR}/chaos-fill-tail; truncate -s -512K {STATE_DIR}/chaos-fill")
    after = _attempts(disk, f"walfree{tag}", 60)
    accepted = [a for a in after if "revision" in a]
    truncated = disk.events(model, "wal_truncated")
    wal_after = int(disk.exec(model, "sh", "-c", f"stat -c %s {STATE_DIR}/*-wal").stdout.split()[0])
    _free(disk, model, STATE_DIR)
    figures.update({"WAL wedge (512 KiB freed after a full state disk)": {
        "WAL bytes before the fill": wal_before, "filler bytes": filled,
        "changes accepted after freeing 512 KiB": f"{len(accepted)} of {len(after)}",
        "WAL bytes after them": wal_after, "wal_truncated log events": len(truncated)}})
    assert len(accepted) == len(after), f"only {len(accepted)} of {len(after)} changes accepted: {after[-1]}"
    assert truncated, "the model did not log emptying its write-ahead log"
    disk.wait_revision(accepted[-1]["revision"], viewers, timeout=60)
