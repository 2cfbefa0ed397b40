"""The facts of the machine a run was made on, recorded next to its numbers."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _redis_server() -> str | None:
    binary = shutil.which("redis-server")
    if not binary:
        return None
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.split(" v=")[1].split()[0] if " v=" in out else out.strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _fsync_us(directory: Path, rounds: int = 200) -> float:
    """Median time of a small append + fsync in the directory the state files live in."""
    path = directory / "fsync-probe"
    times = []
    with open(path, "ab") as f:
        for _ in range(rounds):
            t = time.perf_counter()
            f.write(b"x" * 200 + b"\n")
            f.flush()
            os.fsync(f.fileno())
            times.append(time.perf_counter() - t)
    path.unlink()
    times.sort()
    return round(times[len(times) // 2] * 1e6, 1)


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_dirty(root: Path) -> bool | None:
    """Whether the library's sources differ from the commit (a run of uncommitted code)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "shared/remote_mvc"],
                             capture_output=True, text=True, timeout=10)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_facts(workdir: Path) -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu_model": _cpu_model(),
        "cpus": usable,
        "memory_gb": _memory_gb(),
        "kernel": platform.release(),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "pyro5": _version("Pyro5"),
        "serpent": _version("serpent"),
        "redis_py": _version("redis"),
        "hiredis": _version("hiredis"),
        "redis_server": _redis_server(),
        "fsync_p50_us": _fsync_us(workdir),
        "git_commit": _git_commit(Path(__file__).resolve().parent.parent),
        "git_dirty": _git_dirty(Path(__file__).resolve().parent.parent),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
