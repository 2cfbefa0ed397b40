"""Backups of a model server's state and audit log, taken while it runs; restores into a stopped one.

``remote-mvc-backup create DIR`` (``make backup``) copies the state database with SQLite's online
backup API (a consistent snapshot, even while the model commits: never a file copy of a live
database, which can tear a page or miss the WAL) and then the audit log up to its last complete
line. The order matters: the audit log is the model's write-ahead log, so a copy taken after the
snapshot holds every change the snapshot holds, and a restored model rolls forward whatever the
log has beyond it (it resumes at the log's last accepted revision, exactly the snapshot's when
nothing changed in between). ``manifest.json`` records the revisions and checksums.

``remote-mvc-backup restore DIR`` (``make restore``) checks the manifest and the database's
integrity, then writes the state (backup API again, through SQLite, so a stale WAL of the old file
is replaced too) and the audit log (a temporary file renamed over it) into the paths the settings
name. The model server must be stopped (the file is locked otherwise).

Exit codes: 0 ok, 1 failed, 2 usage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from .config import Settings
from .errors import ConfigError, PersistenceError

__all__ = ["create_backup", "restore_backup", "main"]

STATE_NAME = "state.sqlite3"
AUDIT_NAME = "audit.jsonl"
MANIFEST_NAME = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _revisions(db: sqlite3.Connection) -> dict[str, int]:
    try:
        return {model: rev for model, rev in db.execute("SELECT model, revision FROM state ORDER BY model")}
    except sqlite3.Error:
        return {}  # a state file that was never written to


def _copy_complete_lines(src: Path, dst: Path) -> tuple[int, int]:
    """Copy ``src`` up to its last newline (a record being appended right now is left out); returns
    (records, the last accepted revision seen)."""
    records = last = 0
    with open(src, "rb") as f:
        data = f.read()
    data = data[: data.rfind(b"\n") + 1]
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a record torn by a crash, already in the log as a line of its own
        records += 1
        if rec.get("result") == "accepted" and isinstance(rec.get("revision"), int):
            last = max(last, rec["revision"])
    with open(dst, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return records, last


def create_backup(settings: Settings, dest: str | Path) -> dict[str, Any]:
    """Back up the state file and the audit log that ``settings`` name into the new directory ``dest``."""
    dest = Path(dest)
    state, audit = settings.state_file(), settings.audit_file()
    if not state.exists():
        raise PersistenceError(f"no state file at {state}")
    dest.mkdir(parents=True, exist_ok=False)
    os.chmod(dest, 0o700)  # the audit log names identities and clients
    src = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    dst = sqlite3.connect(dest / STATE_NAME)
    try:
        src.backup(dst)  # the online backup API: one consistent snapshot
        revisions = _revisions(dst)
    except sqlite3.Error as exc:
        raise PersistenceError(f"backup of {state} failed: {exc}") from exc
    finally:
        dst.close()
        src.close()
    records, audit_last = (0, 0)
    if audit.exists():
        records, audit_last = _copy_complete_lines(audit, dest / AUDIT_NAME)
    manifest = {
        "created": time.time(),
        "state_file": str(state),
        "audit_file": str(audit) if audit.exists() else None,
        "revisions": revisions,
        "audit_records": records,
        "audit_last_accepted_revision": audit_last,
        "sha256": {name: _sha256(dest / name) for name in (STATE_NAME, AUDIT_NAME) if (dest / name).exists()},
    }
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for name in (STATE_NAME, AUDIT_NAME, MANIFEST_NAME):
        if (dest / name).exists():
            os.chmod(dest / name, 0o600)
    return manifest


def restore_backup(settings: Settings, src: str | Path) -> dict[str, Any]:
    """Restore ``src`` (made by :func:`create_backup`) into the paths ``settings`` name; the model
    server must not be running."""
    src = Path(src)
    try:
        manifest = json.loads((src / MANIFEST_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise PersistenceError(f"{src} is not a remote-mvc backup: {exc}") from exc
    for name, digest in manifest.get("sha256", {}).items():
        if _sha256(src / name) != digest:
            raise PersistenceError(f"{src / name} does not match its checksum in the manifest")
    backup_db = sqlite3.connect(f"file:{src / STATE_NAME}?mode=ro", uri=True)
    try:
        if backup_db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise PersistenceError(f"{src / STATE_NAME} fails SQLite's integrity check")
        state = settings.state_file()
        state.parent.mkdir(parents=True, exist_ok=True)
        target = sqlite3.connect(state, timeout=0.5)
        try:
            target.execute("PRAGMA journal_mode=WAL")
            backup_db.backup(target)
            target.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError as exc:
            raise PersistenceError(f"cannot restore into {state} (is the model server still running?): {exc}") \
                from exc
        finally:
            target.close()
    finally:
        backup_db.close()
    audit = settings.audit_file()
    if (src / AUDIT_NAME).exists():
        audit.parent.mkdir(parents=True, exist_ok=True)
        tmp = audit.with_name(audit.name + ".restoring")
        tmp.write_bytes((src / AUDIT_NAME).read_bytes())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, audit)
    elif audit.exists():
        audit.unlink()  # the restored state must not be rolled forward by another history's log
    return manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="remote-mvc-backup", description=__doc__.split("\n\n")[0],
                                epilog="Paths come from MVC_STATE_DIR / MVC_STATE_PATH / MVC_AUDIT_PATH / "
                                       "MVC_SERVICE, as for the model server. Exit codes: 0 ok, 1 failed, 2 usage.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="back up the running model's state and audit log into a new directory")
    c.add_argument("dest")
    r = sub.add_parser("restore", help="restore a backup into the (stopped) model's paths")
    r.add_argument("src")
    return p


def main(argv: list[str] | None = None) -> int:
    """``remote-mvc-backup``: parse ``argv`` and run the command; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if settings.service == Settings.service:
            settings = settings.replace(service="model")
        if args.command == "create":
            manifest = create_backup(settings, args.dest)
            print(json.dumps({"backup": args.dest, **manifest}, sort_keys=True))
        else:
            manifest = restore_backup(settings, args.src)
            print(json.dumps({"restored": args.src, "revisions": manifest.get("revisions"),
                              "audit_last_accepted_revision": manifest.get("audit_last_accepted_revision")},
                             sort_keys=True))
        return 0
    except ConfigError as exc:
        print(f"error: ConfigError: {exc}", file=sys.stderr)
        return 2
    except (PersistenceError, OSError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
