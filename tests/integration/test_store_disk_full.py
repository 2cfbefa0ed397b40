"""The state store on a real, small file system that fills up (issue 14): a tmpfs of 4 MiB mounted in
a private mount namespace (``unshare --user --map-root-user --mount``: no root, nothing visible
outside the child), where a child process drives a :class:`Store` through a disk-full episode.

Before the fix the WAL, grown to 2.5 MB by 150 commits and never emptied, ate any space freed
afterwards: 15 changes after freeing 256 KiB, then none, and none after a restart either. (The
events table is WITHOUT ROWID since: a commit writes one page fewer, so 190 commits warm it up.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent('''
    import json, os, sys
    from remote_mvc._store import Store
    from remote_mvc.errors import PersistenceError

    d = sys.argv[1]
    path = f"{d}/m.sqlite3"
    rev = 0

    def event(r):
        return {"model": "m", "revision": r, "time": 0.0, "identity": "c", "changes": {},
                "values": {"name": "x" * 200, "value": r}}

    def commits(store, n):
        global rev
        ok = refused = 0
        messages = set()
        for _ in range(n):
            try:
                store.commit("m", event(rev + 1))
                rev += 1
                ok += 1
            except PersistenceError as exc:
                refused += 1
                messages.add(str(exc).split(": ", 1)[1][:60])
        return {"ok": ok, "refused": refused, "messages": sorted(messages)}

    def fill():
        """Write zeros until the file system refuses, in 64 KiB and then 512-byte blocks."""
        for name, block in (("fill", 65536), ("fill-tail", 512)):
            try:
                with open(f"{d}/{name}", "wb", buffering=0) as f:
                    while True:
                        f.write(b"\\0" * block)
            except OSError:
                pass

    def free(nbytes):
        if os.path.exists(f"{d}/fill-tail"):
            os.remove(f"{d}/fill-tail")
        os.truncate(f"{d}/fill", max(0, os.path.getsize(f"{d}/fill") - nbytes))

    out = {}
    store = Store(path, wal_limit=int(sys.argv[2]))
    out["warm"] = commits(store, 190)  # past 2 MB of WAL, short of the 200 that trigger a checkpoint
    if sys.argv[3] == "wait":  # let the checkpointer act on the last size trigger (commits are fast here)
        for _ in range(3):
            if store.wal_size() < store.wal_limit:
                break
            store.wait_checkpoints(store.checkpoints + 1, 10.0)
        out["checkpointed"] = store.truncations > 0
    out["wal_after_warm"] = store.wal_size()
    if sys.argv[3] == "wait":
        # One of the last warm-up commits may have asked for another TRUNCATE: run while the file
        # system fills, it would free WAL pages afterwards, room for a change or two. Closing stops
        # the checkpointer (and empties the WAL); the disk then fills under a quiet, reopened store.
        store.close()
        store = Store(path, wal_limit=int(sys.argv[2]))
    fill()
    out["full"] = commits(store, 20)
    free(256 * 1024)
    out["freed_256k"] = commits(store, 100)
    out["truncations"] = store.truncations
    free(10 ** 9)
    out["freed_all"] = commits(store, 50)
    store.close()
    store = Store(path, wal_limit=int(sys.argv[2]))
    out["reopened_revision"] = store.load("m")[0]
    out["after_restart"] = commits(store, 20)
    store.close()
    out["revision"] = rev
    print(json.dumps(out))
''')


def _run_in_a_small_file_system(tmp_path: Path, wal_limit: int, wait: bool = False) -> dict:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed") if os.environ.get("CI") == "true" else pytest.skip("no unshare")
    mount = tmp_path / "fs"
    mount.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    shell = (f"mount -t tmpfs -o size=4m tmpfs {mount} && exec {sys.executable} {script} {mount} {wal_limit} {'wait' if wait else 'no'}")
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO / "shared")})
    if out.returncode != 0 and not out.stdout and out.stderr.startswith(("unshare:", "mount:")):
        msg = f"cannot mount a tmpfs in a private namespace here: {out.stderr.strip()}"
        pytest.fail(msg) if os.environ.get("CI") == "true" else pytest.skip(msg)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_space_lets_changes_through_without_a_restart(tmp_path):
    r = _run_in_a_small_file_system(tmp_path, wal_limit=4 * 1024 * 1024)
    assert r["warm"]["ok"] == 190 and r["wal_after_warm"] > 2_000_000  # the WAL grew, under its limit
    assert r["full"]["ok"] == 0 and r["full"]["refused"] == 20
    assert all("full" in m for m in r["full"]["messages"]), r["full"]["messages"]
    # 256 KiB freed: the next commit empties the WAL first, and far more than 256 KiB worth of
    # changes fit afterwards (without the fix: 15, then refusals for good)
    assert r["freed_256k"]["ok"] >= 60, r
    assert r["truncations"] >= 1
    assert r["freed_all"] == {"ok": 50, "refused": 0, "messages": []}, r
    # a graceful restart afterwards: every acknowledged change is there, and changes go on
    assert r["reopened_revision"] == r["revision"] - r["after_restart"]["ok"]
    assert r["after_restart"]["ok"] == 20


def test_the_wal_stays_under_its_size_limit_and_the_store_recovers(tmp_path):
    """Past MVC_WAL_LIMIT_BYTES the checkpointer empties the WAL even while commits keep coming (it
    holds the store's lock for the TRUNCATE: a stream of commits cannot starve it); the disk-full
    episode then ends as soon as space is freed."""
    r = _run_in_a_small_file_system(tmp_path, wal_limit=512 * 1024, wait=True)
    assert r["warm"]["ok"] == 190 and r["checkpointed"] and r["wal_after_warm"] < 512 * 1024
    assert r["full"]["ok"] == 0 and r["freed_256k"]["ok"] > 0
    assert r["freed_all"] == {"ok": 50, "refused": 0, "messages": []}, r
    assert r["reopened_revision"] == r["revision"] - r["after_restart"]["ok"]
    assert r["after_restart"]["ok"] == 20
