"""The audit log: one JSON line per state-changing attempt, flushed and fsynced.

A modify attempt is recorded before it is applied; a refused attempt (bad
credentials, wrong role, invalid change, revision conflict) is recorded too. If
the record cannot be written, the change is refused: nothing unrecorded is ever
applied.

Refusals are what an outsider can make the service write at will, so their
records are throttled per address (:meth:`AuditLog.refusal`): a token bucket of
``refusals_per_second`` (and a burst) per address; beyond it, refusals are
counted into one summary record per address and ``summary_interval`` (with
their count, actions and claimed identities), written with the next record or
by the owner's periodic :meth:`AuditLog.flush_summaries`: never silently
dropped. The file is created mode 0600 (its directory 0700).

The log is also the model's write-ahead log: an ``accepted`` record holds the
revision and the validated changes, and its fsync (``fdatasync`` where the OS has
one) is what makes the change durable (the state file's commit is not fsynced for
audited changes). At start-up the server rolls forward whatever the log holds past
the state file
(:meth:`AuditLog.unapplied`): one fsync per change instead of two.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from ._files import open_private_append
from .auth import host_of
from .errors import PersistenceError
from .metrics import Metrics

__all__ = ["AuditLog", "read_audit"]

# fdatasync where there is one: it makes the appended bytes and the file's new size durable, as a
# record needs, without also writing the inode's times (fsync's extra journal write on Linux)
_sync = getattr(os, "fdatasync", os.fsync)


class AuditLog:
    """Append-only JSON-lines file of who tried to change what, and the result."""

    def __init__(self, path: str | Path, metrics: Metrics | None = None,
                 clock: Callable[[], float] | None = None, *, refusals_per_second: float = 20.0,
                 refusal_burst: int = 100, summary_interval: float = 1.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.metrics = metrics
        self.clock = clock or time.time
        self.monotonic = monotonic
        self.refusals_per_second = refusals_per_second
        self.refusal_burst = refusal_burst
        self.summary_interval = summary_interval
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        self.syncs = 0  # fsyncs made (one per record, or per group of records)
        self._throttle_lock = threading.Lock()
        self._buckets: dict[str, list[float]] = {}  # address -> [tokens, last refill]
        self._held: dict[str, _Held] = {}  # address -> refusals counted, not yet in a summary

    def _open(self) -> TextIO:
        if self._file is None:
            self._file = open_private_append(self.path)
            if self._file.tell() and not self._ends_a_line():
                self._file.write("\n")  # a record torn by a crash stays a line of its own
        return self._file

    def _ends_a_line(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def record(self, action: str, identity: str, client: str | None, result: str, **fields: Any) -> dict:
        """Append one record durably; raise PersistenceError if it cannot be written."""
        return self.record_many([(action, identity, client, result, fields)])[0]

    def refusal(self, action: str, identity: str, client: str | None, result: str, **fields: Any) -> bool:
        """Record a refusal, throttled per address: True when written as a record of its own, False
        when counted into its address's next summary record (see the module's docstring)."""
        host = host_of(client) or "local"
        now = self.monotonic()
        with self._throttle_lock:
            bucket = self._buckets.get(host)
            if bucket is None:
                if len(self._buckets) >= 10000:
                    self._prune(now)
                bucket = self._buckets[host] = [float(self.refusal_burst), now]
            bucket[0] = min(float(self.refusal_burst), bucket[0] + (now - bucket[1]) * self.refusals_per_second)
            bucket[1] = now
            own = bucket[0] >= 1.0
            if own:
                bucket[0] -= 1.0
            else:
                held = self._held.get(host)
                if held is None:
                    held = self._held[host] = _Held(now, self.clock())
                held.add(action, result, identity)
        if own:
            self.record_many([(action, identity, client, result, fields)])
        elif self.metrics:
            self.metrics.audit_aggregated.inc()
        self.flush_summaries()
        return own

    def flush_summaries(self, force: bool = False) -> int:
        """Write the summary record of every address whose interval is over (all, with ``force``);
        return how many were written."""
        now = self.monotonic()
        with self._throttle_lock:
            due = [(host, held) for host, held in self._held.items()
                   if force or now - held.since >= self.summary_interval]
            for host, _ in due:
                del self._held[host]
        if due:
            self.record_many([("refusals_aggregated", "*", host, "refused", held.fields()) for host, held in due])
        return len(due)

    def tracked_addresses(self) -> int:
        """How many addresses the refusal throttle remembers (bounded: quiet ones are forgotten)."""
        with self._throttle_lock:
            return len(self._buckets)

    def _prune(self, now: float) -> None:
        """Forget addresses whose bucket is full again (throttle lock held)."""
        full = self.refusal_burst / self.refusals_per_second
        self._buckets = {h: b for h, b in self._buckets.items() if now - b[1] < full or h in self._held}

    def record_many(self, records: list[tuple[str, str, str | None, str, dict[str, Any]]]) -> list[dict]:
        """Append ``(action, identity, client, result, fields)`` records with one write and one fsync
        (the model server's group commit); all of them or, on PersistenceError, none."""
        now = self.clock()
        stamp = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="microseconds")
        entries = [{"time": stamp, "action": action, "identity": identity, "client": client, "result": result,
                    **fields} for action, identity, client, result, fields in records]
        # ASCII-escaped, so no character in untrusted input can split a record in two
        text = "".join(json.dumps(entry, default=repr, ensure_ascii=True) + "\n" for entry in entries)
        pos = None
        try:
            with self._lock:
                f = self._open()
                pos = f.tell()
                f.write(text)
                f.flush()
                _sync(f.fileno())
                self.syncs += 1
        except (OSError, ValueError) as exc:
            with self._lock:
                self._reset()
                if pos is not None:  # never leave half a record behind
                    try:
                        os.truncate(self.path, pos)
                    except OSError:
                        pass
            if self.metrics:
                self.metrics.audit_write_failures.inc(len(entries))
            raise PersistenceError(f"audit log {self.path} not writable: {exc}") from exc
        return entries

    def unapplied(self, model: str, revision: int) -> list[dict]:
        """The ``accepted`` modify records of ``model`` past ``revision``, to roll forward at start-up.

        An accepted record is fsynced before its change is committed, and the commit itself
        is not fsynced (see :mod:`remote_mvc._store`), so after a crash the log may hold
        changes the state file lacks: acknowledged ones (the state lost its unsynced tail)
        and ones the server was killed before committing. Either way the record is durable
        and the change is applied from it. The last record of a revision decides (``failed``
        cancels an ``accepted`` before it); records are returned in revision order, from
        ``revision + 1`` on, up to the first revision missing.
        """
        last: dict[int, dict] = {}
        for record in self.modifies_after(model, revision):
            last[record["revision"]] = record
        out: list[dict] = []
        while (nxt := last.get(revision + 1 + len(out))) is not None and nxt["result"] == "accepted":
            out.append(nxt)
        return out

    def modifies_after(self, model: str, revision: int, chunk: int = 1 << 20) -> list[dict]:
        """The model's modify records with a revision past ``revision``, oldest first: the file is
        read backwards, a chunk at a time, until a record at or before ``revision`` is found."""
        found: list[dict] = []
        try:
            with open(self.path, "rb") as f:
                end = f.seek(0, os.SEEK_END)
                rest = b""
                while end > 0:
                    start = max(0, end - chunk)
                    f.seek(start)
                    data = f.read(end - start) + rest
                    lines = data.split(b"\n")
                    rest = lines.pop(0) if start else b""  # may be cut: completed by the next chunk
                    done = False
                    for line in reversed(lines):
                        try:
                            record = json.loads(line)
                        except ValueError:
                            continue  # a blank or torn line
                        if record.get("model") != model or record.get("action") != "modify" \
                                or not isinstance(record.get("revision"), int):
                            continue
                        if record["revision"] <= revision:
                            done = True
                            break
                        found.append(record)
                    if done or not start:
                        break
                    end = start
        except OSError:
            return []
        found.reverse()
        return found

    def _reset(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def close(self) -> None:
        """Close the log file (a later write opens it again)."""
        try:
            self.flush_summaries(force=True)
        except PersistenceError:
            pass  # counted in the metric
        with self._lock:
            self._reset()


class _Held:
    """Refusals from one address folded into its next summary record."""

    __slots__ = ("since", "started", "count", "actions", "identities")

    def __init__(self, since: float, started: float) -> None:
        self.since = since  # monotonic, for the interval
        self.started = started  # wall clock, for the record
        self.count = 0
        self.actions: collections.Counter[str] = collections.Counter()
        self.identities: set[str] = set()

    def add(self, action: str, result: str, identity: str) -> None:
        self.count += 1
        key = f"{action}:{result}"
        if key in self.actions or len(self.actions) < 20:
            self.actions[key] += 1
        if len(self.identities) < 10:
            self.identities.add(str(identity)[:100])

    def fields(self) -> dict[str, Any]:
        return {"count": self.count, "actions": dict(self.actions), "identities": sorted(self.identities),
                "since": datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="microseconds")}


def read_audit(path: str | Path) -> list[dict]:
    """All records of an audit log (for tools and tests)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").split("\n") if line.strip()]
