"""Summarize a py-spy ``--format raw`` profile (collapsed stacks): where the GIL time goes.

``python -m bench.profile_summary FILE.txt [...]`` prints the top functions by self
and by inclusive samples, and the share of a few categories that matter for fan-out.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

# category: substrings of a frame ("func (path:line)"); the first category found in a stack, leaf first, wins
# a thread whose innermost frame is one of these is waiting, not working (py-spy's own idle detection
# misses futex waits on some kernels): left out of a CPU breakdown
WAITS = ("Condition.wait (", "Event.wait (", "EpollSelector.select (", "PollSelector.select (",
         "SelectSelector.select (", "receive_data (", "sleep (", "accept (", "AuditLog.record_many (",
         # a change's thread waiting for the commit lock (or the server's lock) held by another batch
         "GroupCommit.commit (", "ModelServer._modify (")

CATEGORIES = [
    ("sqlite commit", ("(remote_mvc/_store.py", "_store.py:")),
    ("audit write + fsync", ("audit.py",)),
    ("serpent (de)serialize", ("serpent.py", "SerpentSerializer")),
    ("json (de)serialize", ("json/", "JsonSerializer", "recreate_classes")),
    ("socket send/recv/select", ("socketutil.py", "selectors.py", "protocol.py")),
    ("logging (JSON log lines)", ("logging/__init__.py", "pythonjsonlogger", "logs.py")),
    ("prometheus metrics", ("prometheus_client",)),
    ("thread wakeups (Condition/Event)", ("Condition.notify", "Condition.wait", "Event.wait", "Event.set")),
    ("validation", ("model.py",)),
    ("Pyro5 call machinery", ("Pyro5/server.py", "Pyro5/client.py", "svr_threads.py", "svr_multiplex.py")),
]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3", "shared/", "bench/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def load(path: str | Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        try:
            stacks.append((stack.split(";"), int(count)))
        except ValueError:
            continue
    return stacks


def category(frames: list[str]) -> str:
    """The category of one stack (root first): the innermost frame that matches one wins."""
    for frame in reversed(frames):
        hit = next((name for name, keys in CATEGORIES if any(k in frame for k in keys)), None)
        if hit:
            return hit
    return "other"


def waiting(frames: list[str]) -> bool:
    """Whether a stack is a thread blocked in a wait: a lock, a select, a recv, or the audit log's
    write + fsync (the innermost Python frame of the C calls ``write`` and ``fsync``)."""
    leaf = _short(frames[-1]) if frames else ""
    return any(leaf.startswith(w) for w in WAITS)


def breakdown(path: str | Path, busy: bool = True) -> dict[str, float]:
    """Each category's share of a profile's samples (0..1, summing to 1), largest first; with ``busy``
    only the samples of threads at work (see :func:`waiting`)."""
    cats: Counter[str] = Counter()
    for frames, count in load(path):
        if busy and waiting(frames):
            continue
        cats[category(frames)] += count
    total = sum(cats.values())
    return {name: c / total for name, c in cats.most_common()} if total else {}


def summarize(path: str | Path, top: int = 20) -> str:
    stacks = load(path)
    total = sum(c for _, c in stacks)
    if not total:
        return f"{path}: no samples"
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for frames, count in stacks:
        frames = [f for f in frames if not f.startswith(("process ", "thread "))] or frames
        self_c[_short(frames[-1])] += count
        for f in set(_short(f) for f in frames):
            incl[f] += count
        root = next((f for f in frames if "_run (" in f or "worker" in f or "requestLoop" in f), frames[0])
        threads[_short(root)] += count
        cats[category(frames)] += count
    out = [f"== {Path(path).name}: {total} samples", "", "category share (innermost match):"]
    out += [f"  {100 * c / total:5.1f}%  {name}" for name, c in cats.most_common()]
    out += ["", f"top {top} self:"]
    out += [f"  {100 * c / total:5.1f}%  {name}" for name, c in self_c.most_common(top)]
    out += ["", f"top {top} inclusive:"]
    out += [f"  {100 * c / total:5.1f}%  {name}" for name, c in incl.most_common(top)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summarize(arg))
