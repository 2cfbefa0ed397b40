"""One viewer process: hosts many viewers of one system and records what each one gets.

Every viewer object has its own subscription. remote-mvc's viewers are
``Viewer`` objects added to one ``ViewerHost`` per process, with the library's
defaults (the host may share one stream per model among them); the naive
Pyro5 viewers have their own connection from the server each; the Redis viewers
their own connection and thread each (redis-py with hiredis).

A viewer's handler records ``(seq, time.time() at handler entry, kind)``,
kind 0 for a change, 1 for a snapshot. The orchestrator drives the process
with JSON lines on stdin and reads JSON lines from stdout:

* ``{"cmd": "reset"}``: forget what was recorded;
* ``{"cmd": "sleep", "seconds": s}``: every handler of this process sleeps ``s``;
* ``{"cmd": "collect", "final": F, "timeout": T, "path": P}``: wait until every
  viewer has reached seq F (or T seconds), write the records to P;
* ``{"cmd": "quit"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.common import CHANNEL, configure_naive_pyro, reply, setup_library


class Rec:
    """One viewer's deliveries, in arrival order."""

    __slots__ = ("vid", "seqs", "times", "kinds", "last", "sleep")

    def __init__(self, vid: str) -> None:
        self.vid = vid
        self.sleep = 0.0
        self.reset()

    def reset(self) -> None:
        self.seqs: list[int] = []
        self.times: list[float] = []
        self.kinds: list[int] = []
        self.last = -1

    def add(self, seq: int, t: float, kind: int) -> None:
        self.seqs.append(seq)
        self.times.append(t)
        self.kinds.append(kind)
        if seq > self.last:
            self.last = seq
        if self.sleep:
            time.sleep(self.sleep)


# remote-mvc ------------------------------------------------------------------

def start_mvc(recs: list[Rec], args: argparse.Namespace) -> Callable[[], None]:
    from remote_mvc import Settings, Viewer, ViewerHost

    settings = Settings.from_env()
    setup_library(settings)
    host = ViewerHost(settings)
    viewers = []
    for rec in recs:
        def on_change(viewer: Viewer, event: dict[str, Any] | None, rec: Rec = rec) -> None:
            t = time.time()
            if event is None:  # a snapshot: the viewer fell behind (or just subscribed)
                rec.add(viewer.revision, t, 1)
            else:
                rec.add(event["revision"], t, 0)

        viewers.append(host.add(Viewer(rec.vid, settings.watched_name, on_change=on_change,
                                       metrics=host.metrics, log_values=False, record=False)))
    host.start()
    deadline = time.monotonic() + 120
    while not (host.subscribed() == len(viewers) and all(v.synced for v in viewers)):
        if time.monotonic() > deadline:
            raise SystemExit(f"viewers not subscribed: {host.subscribed()}/{len(viewers)}")
        time.sleep(0.02)
    return host.stop


# naive Pyro5 -----------------------------------------------------------------

def start_naive(recs: list[Rec], args: argparse.Namespace) -> Callable[[], None]:
    import Pyro5.api

    configure_naive_pyro()

    @Pyro5.api.expose
    class NaiveViewer:
        def __init__(self, rec: Rec) -> None:
            self.rec = rec

        def notify(self, change: dict[str, Any]) -> None:
            self.rec.add(change["seq"], time.time(), 0)

    @Pyro5.api.expose
    class NaiveOnewayViewer(NaiveViewer):
        @Pyro5.api.oneway
        def notify(self, change: dict[str, Any]) -> None:
            self.rec.add(change["seq"], time.time(), 0)

    cls = NaiveOnewayViewer if args.system == "naive-oneway" else NaiveViewer
    daemon = Pyro5.api.Daemon(host="127.0.0.1")
    uris = [daemon.register(cls(rec), objectId=f"viewer.{rec.vid}") for rec in recs]
    threading.Thread(target=daemon.requestLoop, daemon=True).start()
    server = Pyro5.api.Proxy(args.connect)
    for uri in uris:
        server.subscribe(str(uri))
    server._pyroRelease()
    return lambda: None  # the process exits right after: no need to wind the daemon's threads down


# Redis pub/sub ---------------------------------------------------------------

def start_redis(recs: list[Rec], args: argparse.Namespace) -> Callable[[], None]:
    """One redis-py connection, subscription and thread per viewer, with the hiredis parser (C): what
    a Redis user who cares about latency runs (redis-py picks hiredis whenever it is installed; its
    pure-Python parser costs about twice the CPU per message). A thread per subscriber rather than one
    asyncio loop for all: each message is parsed and handled by its own blocking reader, nothing is
    multiplexed in Python, and it is the configuration the issue's independent harness measured."""
    import redis
    from redis.utils import HIREDIS_AVAILABLE

    if not HIREDIS_AVAILABLE:
        raise SystemExit("the Redis baseline needs hiredis (make bench-deps installs it)")
    loads = json.loads
    pubsubs = []
    for _ in recs:  # one connection and one subscription per viewer
        client = redis.Redis(host="127.0.0.1", port=int(args.connect))
        ps = client.pubsub(ignore_subscribe_messages=True)
        ps.subscribe(CHANNEL)
        ps.get_message(timeout=5.0)  # the subscribe confirmation: subscribed before "ready"
        pubsubs.append(ps)

    def listen(ps: Any, rec: Rec) -> None:
        try:
            for message in ps.listen():
                if message["type"] == "message":
                    t = time.time()
                    rec.add(loads(message["data"])["seq"], t, 0)
        except Exception:  # noqa: BLE001 - the connection closed at exit
            return

    for ps, rec in zip(pubsubs, recs, strict=True):
        threading.Thread(target=listen, args=(ps, rec), daemon=True).start()

    def stop() -> None:
        for ps in pubsubs:
            try:
                ps.close()
            except Exception:  # noqa: BLE001, S110 - closing at exit
                pass

    return stop


def complete(rec: Rec, first: int | None, final: int) -> bool:
    """Reached the final change, and (for systems that may reorder) got everything before it too."""
    if rec.last < final:
        return False
    if first is None:
        return True
    n = min(len(rec.seqs), len(rec.kinds))
    got = {s for s, k in zip(rec.seqs[:n], rec.kinds[:n], strict=True) if k == 0 and first <= s <= final}
    if len(got) >= final - first + 1:
        return True
    return any(k == 1 and s >= first for s, k in zip(rec.seqs[:n], rec.kinds[:n], strict=True))  # a snapshot


STARTERS = {"remote-mvc": start_mvc, "naive-twoway": start_naive, "naive-oneway": start_naive,
            "redis": start_redis}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", required=True, choices=sorted(STARTERS) + ["remote-mvc-ref"])
    parser.add_argument("--ids", required=True, help="first:count of the viewer ids this process hosts")
    parser.add_argument("--connect", default="", help="naive server URI, or the Redis port")
    args = parser.parse_args()
    if args.system.startswith("remote-mvc"):  # the library copy to run comes with PYTHONPATH
        args.system = "remote-mvc"
    first, count = (int(x) for x in args.ids.split(":"))
    recs = [Rec(f"v{i}") for i in range(first, first + count)]
    stop = STARTERS[args.system](recs, args)
    reply({"ready": True, "pid": os.getpid(), "viewers": len(recs)})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["cmd"]
        if op == "reset":
            for rec in recs:
                rec.reset()
            reply({"ok": True})
        elif op == "sleep":
            for rec in recs:
                rec.sleep = float(cmd["seconds"])
            reply({"ok": True})
        elif op == "collect":
            final, first = cmd["final"], cmd.get("first")
            deadline = time.monotonic() + cmd["timeout"]
            pending = list(recs)
            while pending and time.monotonic() < deadline:
                pending = [rec for rec in pending if not complete(rec, first, final)]
                if pending:
                    time.sleep(0.005)
            behind = [rec.vid for rec in recs if rec.last < final]
            data = {}
            for rec in recs:  # a handler may be appending right now: cut to what is complete
                n = min(len(rec.seqs), len(rec.times), len(rec.kinds))
                data[rec.vid] = {"seqs": rec.seqs[:n], "times": rec.times[:n], "kinds": rec.kinds[:n]}
            with open(cmd["path"], "w", encoding="utf-8") as f:
                json.dump(data, f)
            reply({"ok": True, "behind": behind})
        elif op == "quit":
            break
    for rec in recs:
        rec.sleep = 0.0
    try:
        stop()
    finally:
        reply({"bye": True})
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
