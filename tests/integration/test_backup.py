"""remote-mvc-backup: an online backup of a running model, restored into a fresh state directory,
resumes at the same revision with the same values, history and audit log."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from remote_mvc import read_audit
from remote_mvc.backup import create_backup, restore_backup
from remote_mvc.testing import Stack


def backup_while_writing(client, settings, dest, first: int) -> dict:
    """Take a backup while a controller modifies the model back to back (values first, first+1, ...)."""
    stop = threading.Event()

    def writer() -> None:
        i = first
        while not stop.is_set():
            client.modify({"value": i})
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        return create_backup(settings, dest)
    finally:
        stop.set()
        t.join(10)


def test_backup_while_changes_flow_then_restore_into_a_fresh_stack(mvc_stack, tmp_path):
    model = mvc_stack.model()
    rm = mvc_stack.client()
    for i in range(1, 21):
        rm.modify({"value": i})
    # changes keep coming while the backup runs: the snapshot is consistent, the copied log holds it all
    manifest = backup_while_writing(rm, model.settings, tmp_path / "b1", first=101)
    snap_rev = manifest["revisions"]["remote_mvc.model"]
    assert snap_rev >= 20 and manifest["audit_last_accepted_revision"] >= snap_rev
    assert oct((tmp_path / "b1").stat().st_mode & 0o777) == "0o700"

    # a quiet backup: the revision the restored model must resume at
    final = rm.snapshot()
    quiet = create_backup(model.settings, tmp_path / "b2")
    assert quiet["revisions"]["remote_mvc.model"] == final["revision"] == quiet["audit_last_accepted_revision"]
    history = rm.history(0)

    fresh = Stack(tmp_path / "fresh").start()
    try:
        settings = fresh.settings.replace(service="model")
        restore_backup(settings, tmp_path / "b2")
        restored = fresh.model()
        rm2 = fresh.client()
        snap = rm2.snapshot()
        assert (snap["revision"], snap["values"]) == (final["revision"], final["values"])
        assert rm2.history(0) == history
        assert rm2.modify({"value": -1}) == final["revision"] + 1  # resumes right after it
        records = read_audit(settings.audit_file())
        assert [r for r in records if r.get("result") == "accepted"][-1]["revision"] == final["revision"] + 1
        restored.stop()
    finally:
        fresh.close()


def test_restoring_a_backup_taken_under_load_rolls_forward_to_the_log(mvc_stack, tmp_path):
    """A backup taken while changes flow: the restored model resumes at the copied log's last
    accepted revision (never behind the snapshot), with a gap-free history."""
    model = mvc_stack.model()
    rm = mvc_stack.client()
    rm.modify({"value": 0})
    manifest = backup_while_writing(rm, model.settings, tmp_path / "b", first=1)
    fresh = Stack(tmp_path / "fresh").start()
    try:
        restore_backup(fresh.settings.replace(service="model"), tmp_path / "b")
        fresh.model()
        snap = fresh.client().snapshot()
        last = manifest["audit_last_accepted_revision"]
        assert snap["revision"] == last >= manifest["revisions"]["remote_mvc.model"]
        assert [e["revision"] for e in fresh.client().history(0)] == list(range(1, last + 1))
    finally:
        fresh.close()


def test_a_tampered_or_missing_backup_is_refused_and_the_cli_says_so(mvc_stack, tmp_path):
    model = mvc_stack.model()
    mvc_stack.client().modify({"value": 1})
    create_backup(model.settings, tmp_path / "b")
    audit = tmp_path / "b" / "audit.jsonl"
    audit.write_text(audit.read_text().replace('"value"', '"VALUE"'))
    env = mvc_stack.env("model", state_dir=str(tmp_path / "target"))
    out = subprocess.run([sys.executable, "-m", "remote_mvc.backup", "restore", str(tmp_path / "b")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "does not match its checksum" in out.stderr
    assert not (tmp_path / "target" / "model.sqlite3").exists()
    out = subprocess.run([sys.executable, "-m", "remote_mvc.backup", "restore", str(tmp_path / "nothing")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "not a remote-mvc backup" in out.stderr
    out = subprocess.run([sys.executable, "-m", "remote_mvc.backup", "create", str(tmp_path / "c")],
                         env=mvc_stack.env("model"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["revisions"] == {"remote_mvc.model": 1}
    out = subprocess.run([sys.executable, "-m", "remote_mvc.backup", "create", str(tmp_path / "c")],
                         env=mvc_stack.env("model"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1  # never overwrites an existing backup
    out = subprocess.run([sys.executable, "-m", "remote_mvc.backup", "bogus"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
