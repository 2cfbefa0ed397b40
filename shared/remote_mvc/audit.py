"""The audit log: one JSON line per state-changing attempt, flushed and fsynced.

A modify attempt is recorded before it is applied; a refused attempt (bad
credentials, wrong role, invalid change, revision conflict) is recorded too. If
the record cannot be written, the change is refused: nothing unrecorded is ever
applied.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import PersistenceError
from .metrics import Metrics

__all__ = ["AuditLog", "read_audit"]


class AuditLog:
    """Append-only JSON-lines file of who tried to change what, and the result."""

    def __init__(self, path: str | Path, metrics: Metrics | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.path = Path(path)
        self.metrics = metrics
        self.clock = clock or time.time
        self._lock = threading.Lock()
        self._file = None

    def _open(self):
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open on purpose
        return self._file

    def record(self, action: str, identity: str, client: str | None, result: str, **fields: Any) -> dict:
        """Append one record durably; raise PersistenceError if it cannot be written."""
        now = self.clock()
        entry = {
            "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="microseconds"),
            "action": action,
            "identity": identity,
            "client": client,
            "result": result,
            **fields,
        }
        # ASCII-escaped, so no character in untrusted input can split a record in two
        line = json.dumps(entry, default=repr, ensure_ascii=True) + "\n"
        pos = None
        try:
            with self._lock:
                f = self._open()
                pos = f.tell()
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, ValueError) as exc:
            with self._lock:
                self._reset()
                if pos is not None:  # never leave half a record behind
                    try:
                        os.truncate(self.path, pos)
                    except OSError:
                        pass
            if self.metrics:
                self.metrics.audit_write_failures.inc()
            raise PersistenceError(f"audit log {self.path} not writable: {exc}") from exc
        return entry

    def reconcile(self, model: str, revision: int) -> dict | None:
        """After a crash: an ``accepted`` record past the committed revision never took effect.

        The server writes the record, then commits; a crash between the two leaves
        a record for a change that was neither applied nor acknowledged. Append the
        matching ``failed`` record so the log tells the truth (called at start-up).
        """
        for record in reversed(self._tail()):
            if record.get("model") == model and record.get("action") == "modify" and "revision" in record:
                if record["result"] == "accepted" and record["revision"] > revision:
                    return self.record("modify", record["identity"], record.get("client"), "failed", model=model,
                                       revision=record["revision"], request=record.get("request"),
                                       error="not committed: the server stopped before the commit")
                return None
        return None

    def _tail(self, size: int = 256 * 1024) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                start = max(0, f.seek(0, os.SEEK_END) - size)
                f.seek(start)
                lines = f.read().split(b"\n")
        except OSError:
            return []
        if start:
            lines = lines[1:]  # the first line may be cut
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def _reset(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def close(self) -> None:
        with self._lock:
            self._reset()


def read_audit(path: str | Path) -> list[dict]:
    """All records of an audit log (for tools and tests)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").split("\n") if line.strip()]
