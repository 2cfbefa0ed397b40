"""Copies of the library a benchmark run measures: the working tree's snapshot and a git ref.

* ``snapshot``: ``shared/remote_mvc`` copied at the start of a run, so one run
  measures one version even while the working tree changes under it;
* ``from_ref``: the library as committed at a git ref (``--ref``, e.g. the
  version before a change), extracted with ``git archive``;

The library itself is never touched; a copy is put first on PYTHONPATH of the
server and viewer processes of the system that uses it. (The prototype builder that
lived here, ``bench/proto``, is gone: its one proposal was folded into the library.)
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LIBRARY = ROOT / "shared" / "remote_mvc"


def fingerprint(package: Path) -> str:
    """A short hash of the package's Python sources (which library version a run measured)."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def snapshot(dest: Path, source: Path = LIBRARY) -> Path:
    target = dest / "remote_mvc"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def from_ref(ref: str, dest: Path) -> Path:
    data = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "shared/remote_mvc"],
                          capture_output=True, check=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    shutil.move(str(dest / "shared" / "remote_mvc"), str(dest / "remote_mvc"))
    shutil.rmtree(dest / "shared")
    return dest
