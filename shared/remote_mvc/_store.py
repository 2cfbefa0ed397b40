"""SQLite persistence of a model's values, revision and recent change events.

A change is written (state row and event row) in one transaction, in WAL mode.
A durable commit (``synchronous=FULL``) is fsynced before :meth:`Store.commit`
returns. An audited change is committed without an fsync (``synchronous=NORMAL``:
crash-safe, but a power loss may take the last transactions) because its audit
record was fsynced first and is replayed at start-up (:meth:`AuditLog.unapplied`):
one fsync per change. Either way nothing is acknowledged before it is durable.
Events older than the history limit are pruned in the same transaction.

The WAL is checkpointed into the database file by a thread of the store's own,
never by a commit: SQLite's automatic checkpoint runs inside the commit that
crosses its threshold and syncs the database file there, a 5–20 ms stall of one
change in every few hundred. The checkpointer survives any error: logged,
counted (``remote_mvc_loop_errors_total{loop="checkpointer"}``), tried again at
the next round.

The database file is created mode 0600 (its directory 0700) before SQLite opens
it; SQLite gives its -wal and -shm files the database file's mode.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._files import create_private
from .errors import PersistenceError
from .logs import log_exception

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("remote_mvc.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    model TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    vals TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    model TEXT NOT NULL,
    revision INTEGER NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (model, revision)
);
"""


class Store:
    """Durable values, revision and history of one or more models in one file."""

    def __init__(self, path: str | Path, history_limit: int = 10000, checkpoint_every: int = 200,
                 metrics: Metrics | None = None) -> None:
        self.path = Path(path)
        self._loop_errors = metrics.loop_errors.labels("checkpointer") if metrics is not None else None
        self.history_limit = history_limit
        self.checkpoint_every = checkpoint_every  # commits between two checkpoints of the WAL
        self.checkpoints = 0  # checkpoints run (tests, tools)
        self._lock = threading.Lock()
        self._uncheckpointed = 0
        self._checkpoint_due = threading.Condition()
        self._closing = False
        try:
            if str(self.path) != ":memory:":
                create_private(self.path)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._synchronous = "FULL"
            self._db.executescript(_SCHEMA)
            self._db.execute("PRAGMA wal_autocheckpoint=0")  # see the checkpointer thread
        except (sqlite3.Error, OSError) as exc:
            raise PersistenceError(f"cannot open state file {self.path}: {exc}") from exc
        self._checkpointer = None
        if str(self.path) != ":memory:":
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="store-checkpointer",
                                                  daemon=True)
            self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database file when enough commits have gathered, off the commit path
        (a PASSIVE checkpoint: it never blocks a writer)."""
        db = sqlite3.connect(str(self.path), isolation_level=None)
        try:
            while True:
                with self._checkpoint_due:
                    self._checkpoint_due.wait_for(
                        lambda: self._closing or self._uncheckpointed >= self.checkpoint_every)
                    if self._closing:
                        return
                    self._uncheckpointed = 0
                try:
                    self.checkpoint(db)
                except sqlite3.Error:
                    pass  # busy or disk full: the next round tries again, the WAL keeps everything meanwhile
                except Exception as exc:  # noqa: BLE001 - the checkpointer outlives any one round
                    if self._loop_errors is not None:
                        self._loop_errors.inc()
                    log_exception(log, "loop_error", "unexpected error in the WAL checkpointer; it goes on", exc,
                                  loop="checkpointer", path=str(self.path))
                with self._checkpoint_due:
                    self.checkpoints += 1
                    self._checkpoint_due.notify_all()
        finally:
            db.close()

    def checkpoint(self, db: sqlite3.Connection) -> None:
        """Copy the WAL into the database file on the checkpointer's connection ``db`` (PASSIVE)."""
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def wait_checkpoints(self, count: int, timeout: float) -> bool:
        """Block until ``count`` checkpoints have run (tests)."""
        with self._checkpoint_due:
            return self._checkpoint_due.wait_for(lambda: self.checkpoints >= count, timeout)

    def load(self, model: str) -> tuple[int, dict[str, Any] | None]:
        """The stored (revision, values) of a model; (0, None) when it was never stored."""
        with self._lock:
            row = self._db.execute("SELECT revision, vals FROM state WHERE model=?", (model,)).fetchone()
        return (0, None) if row is None else (row[0], json.loads(row[1]))

    def commit(self, model: str, event: dict[str, Any], fsync: bool = True) -> None:
        """Record a change event and the values it produced; with ``fsync=False`` only for a change
        already made durable elsewhere (its fsynced audit record)."""
        self.commit_many(model, [event], fsync)

    def commit_many(self, model: str, events: list[dict[str, Any]], fsync: bool = True) -> None:
        """Record consecutive change events in one transaction (a group commit), the state at the
        last of them; all of them or, on PersistenceError, none."""
        first, last = events[0]["revision"], events[-1]["revision"]
        synchronous = "FULL" if fsync else "NORMAL"
        try:
            with self._lock:
                db = self._db
                if synchronous != self._synchronous:  # a FULL commit also syncs the NORMAL ones before it
                    db.execute(f"PRAGMA synchronous={synchronous}")
                    self._synchronous = synchronous
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.execute("INSERT OR REPLACE INTO state(model, revision, vals) VALUES (?,?,?)",
                               (model, last, json.dumps(events[-1]["values"])))
                    db.executemany("INSERT INTO events(model, revision, event) VALUES (?,?,?)",
                                   [(model, e["revision"], json.dumps(e)) for e in events])
                    if (first - 1) // 100 != last // 100:  # a multiple of 100 among them: prune
                        db.execute("DELETE FROM events WHERE model=? AND revision<=?",
                                   (model, last - self.history_limit))
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:  # SQLite already rolled back by itself on "disk full"
                        db.execute("ROLLBACK")
                    raise
        except (sqlite3.Error, OSError) as exc:
            what = f"revision {last}" if first == last else f"revisions {first}-{last}"
            raise PersistenceError(f"could not commit {what}: {exc}") from exc
        if self._checkpointer is not None:
            self._committed(len(events))

    def _committed(self, count: int = 1) -> None:
        with self._checkpoint_due:
            self._uncheckpointed += count
            if self._uncheckpointed >= self.checkpoint_every:
                self._checkpoint_due.notify_all()

    def events(self, model: str, since_revision: int, limit: int) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT event FROM events WHERE model=? AND revision>? ORDER BY revision LIMIT ?",
                (model, since_revision, limit)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def first_revision(self, model: str) -> int | None:
        """The oldest revision still in the history, or None when it is empty."""
        with self._lock:
            row = self._db.execute("SELECT MIN(revision) FROM events WHERE model=?", (model,)).fetchone()
        return row[0]

    def close(self) -> None:
        if self._checkpointer is not None:
            with self._checkpoint_due:
                self._closing = True
                self._checkpoint_due.notify_all()
            self._checkpointer.join(timeout=10)
        with self._lock:
            self._db.close()  # the last connection to close checkpoints what is left
