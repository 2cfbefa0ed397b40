"""SQLite persistence of a model's values, revision and recent change events.

A change is written (state row and event row) in one transaction and committed
with ``synchronous=FULL`` in WAL mode before :meth:`Store.commit` returns, so a
change is never acknowledged before it is durable. Events older than the history
limit are pruned in the same transaction.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from .errors import PersistenceError

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

    def __init__(self, path: str | Path, history_limit: int = 10000) -> None:
        self.path = Path(path)
        self.history_limit = history_limit
        self._lock = threading.Lock()
        try:
            if str(self.path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise PersistenceError(f"cannot open state file {self.path}: {exc}") from exc

    def load(self, model: str) -> tuple[int, dict[str, Any] | None]:
        """The stored (revision, values) of a model; (0, None) when it was never stored."""
        with self._lock:
            row = self._db.execute("SELECT revision, vals FROM state WHERE model=?", (model,)).fetchone()
        return (0, None) if row is None else (row[0], json.loads(row[1]))

    def commit(self, model: str, event: dict[str, Any]) -> None:
        """Durably record a change event and the values it produced."""
        revision = event["revision"]
        try:
            with self._lock:
                db = self._db
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.execute("INSERT OR REPLACE INTO state(model, revision, vals) VALUES (?,?,?)",
                               (model, revision, json.dumps(event["values"])))
                    db.execute("INSERT INTO events(model, revision, event) VALUES (?,?,?)",
                               (model, revision, json.dumps(event)))
                    if revision % 100 == 0:
                        db.execute("DELETE FROM events WHERE model=? AND revision<=?",
                                   (model, revision - self.history_limit))
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:  # SQLite already rolled back by itself on "disk full"
                        db.execute("ROLLBACK")
                    raise
        except (sqlite3.Error, OSError) as exc:
            raise PersistenceError(f"could not commit revision {revision}: {exc}") from exc

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
        with self._lock:
            self._db.close()
