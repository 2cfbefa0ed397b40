"""Runs inside a controller container of the stack (``python -c <this file> COMMAND ...``).

The image has the library but not the tests, so the chaos tests send this file's source.
Everything it prints is one JSON object per line on stdout.

  load   one controller: modifies the model at a steady rate until --count attempts, --duration
         seconds or SIGTERM. Every attempt has a unique marker, used as request id and as the
         ``name`` it sets, so each one can be found again in the history, the audit log and the
         viewers' logs. One line per attempt: marker, type, start/end time, and the revision
         acknowledged or the error. Optional refused attempts: --invalid-every K (a value out
         of range: ValidationError), --conflict-every K (a stale expected revision: ConflictError).
  state  the model's snapshot, its complete history (from --since), the ticker's snapshot, the
         subscribed viewers and the name server's registrations, as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time


def out(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def load(a: argparse.Namespace) -> int:
    from remote_mvc import ModelClient, Settings, setup

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    settings = Settings.from_env()
    setup(settings)  # a program of its own: it configures Pyro5 once, as every one does
    rm = ModelClient(settings=settings, retry_seconds=a.retry)
    period = 1.0 / a.rate
    started = time.monotonic()
    due = started
    out({"kind": "start", "prefix": a.prefix, "time": time.time()})
    i = 0
    while not stop.is_set():
        if (a.count and i >= a.count) or (a.duration and time.monotonic() - started >= a.duration):
            break
        i += 1
        marker = f"{a.prefix}-{i}"
        changes = {"name": marker, "value": i}
        expected = None
        kind = "valid"
        if a.invalid_every and i % a.invalid_every == 0:
            kind, changes["value"] = "invalid", 2**60  # outside the field's range
        elif a.conflict_every and i % a.conflict_every == 0:
            kind, expected = "conflict", -1  # never the model's revision
        rec = {"kind": "attempt", "i": i, "marker": marker, "type": kind, "value": changes["value"],
               "t0": time.time()}
        try:
            # what ModelClient.modify does, with a request id we know: retried on lost
            # connections for up to --retry seconds, applied at most once by the server
            rec["revision"] = rm.call("modify", changes, expected, request_id=marker)
        except Exception as exc:  # noqa: BLE001 - every outcome is reported
            rec["error"] = type(exc).__name__
            rec["message"] = str(exc)[:500]
        rec["t1"] = time.time()
        out(rec)
        due += period
        now = time.monotonic()
        if due < now:
            due = now  # late: no burst to catch up
        stop.wait(due - now)
    out({"kind": "done", "attempts": i, "time": time.time()})
    rm.close()
    return 0


def state(a: argparse.Namespace) -> int:
    from remote_mvc import ModelClient, Settings, setup
    from remote_mvc.errors import HistoryCompacted
    from remote_mvc.pyro.naming import locate_ns

    settings = Settings.from_env()
    setup(settings)
    rm = ModelClient(settings=settings, retry_seconds=a.retry)
    snapshot = rm.snapshot()
    history: list[dict] = []
    since = a.since
    compacted_at = None
    while since < snapshot["revision"]:
        try:
            batch = rm.history(since, 1000)
        except HistoryCompacted as exc:
            compacted_at = since = max(since, exc.first_revision - 1)
            continue
        if not batch:
            break
        history.extend(batch)
        since = batch[-1]["revision"]
    result = {"snapshot": snapshot, "history": history, "history_compacted_before": compacted_at,
              "viewers": rm.viewers()}
    rm.close()
    if a.ticker:
        ticker = ModelClient(settings.ticker_name, settings, retry_seconds=a.retry)
        result["ticker"] = ticker.snapshot()
        ticker.close()
    ns = locate_ns(settings)
    result["names"] = {name: str(uri) for name, uri in ns.list().items()}
    ns._pyroRelease()
    out(result)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="inside")
    sub = p.add_subparsers(dest="command", required=True)
    lp = sub.add_parser("load")
    lp.add_argument("--prefix", required=True)
    lp.add_argument("--rate", type=float, default=5.0, help="attempts per second")
    lp.add_argument("--count", type=int, default=0)
    lp.add_argument("--duration", type=float, default=0.0)
    lp.add_argument("--retry", type=float, default=60.0, help="seconds to retry a lost connection")
    lp.add_argument("--invalid-every", type=int, default=0)
    lp.add_argument("--conflict-every", type=int, default=0)
    sp = sub.add_parser("state")
    sp.add_argument("--since", type=int, default=0)
    sp.add_argument("--retry", type=float, default=20.0)
    sp.add_argument("--ticker", action="store_true")
    a = p.parse_args(argv)
    return load(a) if a.command == "load" else state(a)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
