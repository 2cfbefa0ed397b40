"""SQLite persistence of a model's values, revision and recent change events.

A change is written (state row and event row) in one transaction, in WAL mode.
A durable commit (``synchronous=FULL``) is fsynced before :meth:`Store.commit`
returns. An audited change is committed without an fsync (``synchronous=NORMAL``:
crash-safe, but a power loss may take the last transactions) because its audit
record was fsynced first and is replayed at start-up (:meth:`AuditLog.unapplied`):
one fsync per change. Either way nothing is acknowledged before it is durable.
Events older than the history limit are pruned in the same transaction.
A commit touches as few B-trees as it can: the events table is ``WITHOUT ROWID``
(its primary key is the table, no separate index) and the state row is updated in
place (an upsert, not a delete and an insert); state files made before keep their
schema and work unchanged with the same statements.

The WAL is checkpointed into the database file by a thread of the store's own,
never by a commit: SQLite's automatic checkpoint runs inside the commit that
crosses its threshold and syncs the database file there, a 5–20 ms stall of one
change in every few hundred. Every ``checkpoint_every`` commits it runs a PASSIVE
checkpoint (never blocks a writer, never shrinks the file); when the WAL file has
grown past ``wal_limit`` bytes it runs a TRUNCATE checkpoint, which empties the
file, holding the store's lock meanwhile (commits wait for it, a few ms, rather than
starve it).

A full disk must not wedge the store. A WAL that is never emptied eats any space
freed after a disk-full episode (each retried commit appends to it while the
checkpoint that would empty it needs the database file to grow first), and the
store would stay full for good, even across a restart. So after a commit is
refused for a full disk, the next commit first runs a TRUNCATE checkpoint itself
and is refused (naming the full disk) until that checkpoint succeeds: freed space
goes to emptying the WAL first, and changes go through again without a restart.

The checkpointer thread starts in :meth:`Store.start` (or at the first commit, whichever comes
first), never in the constructor: a store only read (a backup, a tool) runs no thread. The
store is a context manager (``with Store(path) as store:`` starts it and closes it).

The checkpointer survives any error: logged,
counted (``remote_mvc_loop_errors_total{loop="checkpointer"}``), tried again at
the next round.

The database file is created mode 0600 (its directory 0700) before SQLite opens
it; SQLite gives its -wal and -shm files the database file's mode.
"""

from __future__ import annotations

import errno
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._files import create_private
from .errors import PersistenceError
from .logs import log_event, log_exception

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("remote_mvc.store")

DEFAULT_WAL_LIMIT = 4 * 1024 * 1024

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
) WITHOUT ROWID;
"""


class Store:
    """Durable values, revision and history of one or more models in one file."""

    def __init__(self, path: str | Path, history_limit: int = 10000, checkpoint_every: int = 200,
                 metrics: Metrics | None = None, wal_limit: int = DEFAULT_WAL_LIMIT) -> None:
        self.path = Path(path)
        self._loop_errors = metrics.loop_errors.labels("checkpointer") if metrics is not None else None
        self.history_limit = history_limit
        self.checkpoint_every = checkpoint_every  # commits between two checkpoints of the WAL
        self.wal_limit = wal_limit  # WAL bytes that make the checkpointer empty the file (TRUNCATE)
        self.checkpoints = 0  # checkpoints run (tests, tools)
        self.truncations = 0  # TRUNCATE checkpoints that emptied the WAL (tests, tools)
        self._wal = Path(f"{self.path}-wal")
        self._lock = threading.Lock()
        self._uncheckpointed = 0
        self._truncate_due = False  # the WAL is over wal_limit: the checkpointer empties it
        self._disk_full = False  # a commit was refused for a full disk: empty the WAL before the next
        self._checkpoint_due = threading.Condition()
        self._closing = False
        self._in_memory = str(self.path) == ":memory:"
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
        self._checkpointer: threading.Thread | None = None

    def start(self) -> Store:
        """Start the WAL checkpointer (idempotent; an in-memory database has no WAL to checkpoint)."""
        with self._checkpoint_due:
            if self._checkpointer is None and not self._closing and not self._in_memory:
                self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="store-checkpointer",
                                                      daemon=True)
                self._checkpointer.start()
        return self

    @property
    def checkpointing(self) -> bool:
        """Whether the checkpointer thread runs (started and not closed)."""
        thread = self._checkpointer
        return thread is not None and thread.is_alive()

    def pragma(self, name: str) -> Any:
        """The value of SQLite's ``PRAGMA name`` on the store's own connection (diagnostics and tests:
        ``synchronous``, ``journal_mode``, ``wal_autocheckpoint`` are per connection)."""
        if not name.isidentifier():
            raise ValueError(f"not a pragma name: {name!r}")
        with self._lock:
            row = self._db.execute(f"PRAGMA {name}").fetchone()
        return None if row is None else row[0]

    def __enter__(self) -> Store:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database file when enough commits have gathered (PASSIVE: it never
        blocks a writer), or empty it when it grew past ``wal_limit`` (TRUNCATE), off the commit path."""
        # a short busy timeout: a TRUNCATE checkpoint runs while holding the store's lock (commits wait
        # for it instead of starving it) and must not hold that lock long for a reader elsewhere
        db = sqlite3.connect(str(self.path), isolation_level=None, timeout=0.2)
        try:
            while True:
                with self._checkpoint_due:
                    self._checkpoint_due.wait_for(
                        lambda: self._closing or self._truncate_due
                        or self._uncheckpointed >= self.checkpoint_every)
                    if self._closing:
                        return
                    truncate, self._truncate_due = self._truncate_due, False
                    self._uncheckpointed = 0
                emptied = False
                try:
                    emptied = self.checkpoint(db, truncate)
                except sqlite3.Error:
                    pass  # busy or disk full: the next round tries again, the WAL keeps everything meanwhile
                except Exception as exc:  # noqa: BLE001 - the checkpointer outlives any one round
                    if self._loop_errors is not None:
                        self._loop_errors.inc()
                    log_exception(log, "loop_error", "unexpected error in the WAL checkpointer; it goes on", exc,
                                  loop="checkpointer", path=str(self.path))
                with self._checkpoint_due:
                    self.checkpoints += 1
                    self.truncations += emptied
                    self._checkpoint_due.notify_all()
        finally:
            db.close()

    def checkpoint(self, db: sqlite3.Connection, truncate: bool = False) -> bool:
        """Copy the WAL into the database file on the checkpointer's connection ``db``: PASSIVE, or
        TRUNCATE (empties the file; holding the store's lock, so that a busy stream of commits cannot
        starve it); True when a TRUNCATE emptied it."""
        if not truncate:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            return False
        with self._lock:
            row = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return row is not None and row[0] == 0

    def wal_size(self) -> int:
        """Bytes in the write-ahead log file now (0 when there is none)."""
        try:
            return self._wal.stat().st_size
        except OSError:
            return 0

    def _empty_wal_locked(self, what: str) -> None:
        """After a disk-full refusal: checkpoint and empty the WAL before anything is appended to it
        again, or refuse (the caller holds ``_lock``)."""
        try:
            row = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            raise PersistenceError(f"could not commit {what}: database or disk is full (the write-ahead log "
                                   f"cannot be checkpointed yet: {exc})") from exc
        if row is not None and row[0] != 0:
            return  # another checkpoint is running: it frees the WAL too; try again at the next commit
        self._disk_full = False
        with self._checkpoint_due:
            self.truncations += 1
        log_event(log, "wal_truncated", "disk space again: the write-ahead log was checkpointed and emptied",
                  path=str(self.path))

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
        what = f"revision {last}" if first == last else f"revisions {first}-{last}"
        try:
            with self._lock:
                db = self._db
                if self._disk_full:
                    self._empty_wal_locked(what)
                if synchronous != self._synchronous:  # a FULL commit also syncs the NORMAL ones before it
                    db.execute(f"PRAGMA synchronous={synchronous}")
                    self._synchronous = synchronous
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.execute("INSERT INTO state(model, revision, vals) VALUES (?,?,?) ON CONFLICT(model) "
                               "DO UPDATE SET revision=excluded.revision, vals=excluded.vals",
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
            if _disk_full(exc) and str(self.path) != ":memory:":
                with self._lock:
                    if not self._disk_full:
                        log_event(log, "disk_full", "disk full: commits are refused until the write-ahead log "
                                  "can be emptied", level=logging.ERROR, path=str(self.path), error=str(exc))
                    self._disk_full = True
            raise PersistenceError(f"could not commit {what}: {exc}") from exc
        self._committed(len(events))

    def _committed(self, count: int = 1) -> None:
        if self._checkpointer is None:
            if self._in_memory:
                return  # no WAL to checkpoint
            self.start()  # the first commit: the owner is running (its start() recovers and commits)
        over = self.wal_size() >= self.wal_limit
        with self._checkpoint_due:
            self._uncheckpointed += count
            self._truncate_due = self._truncate_due or over
            if over or self._uncheckpointed >= self.checkpoint_every:
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
        """Stop the checkpointer and close the database (the last connection checkpoints the rest)."""
        with self._checkpoint_due:
            self._closing = True
            self._checkpoint_due.notify_all()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=10)
        with self._lock:
            self._db.close()  # the last connection to close checkpoints what is left


def _disk_full(exc: BaseException) -> bool:
    """Whether a write failed for want of space (SQLITE_FULL, ENOSPC, EDQUOT)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return getattr(exc, "sqlite_errorcode", None) == 13 or "disk is full" in str(exc)  # 13: SQLITE_FULL
