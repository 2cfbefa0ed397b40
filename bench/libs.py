"""Build patched copies of the library: the snapshot a run measures, a git ref, the prototype.

* ``snapshot``: ``shared/remote_mvc`` copied at the start of a run, so one run
  measures one version even while the working tree changes under it;
* ``from_ref``: the library as committed at a git ref (``--ref``, e.g. the
  version before a change), extracted with ``git archive``;
* ``build``: the prototype (``remote-mvc-proto``): a snapshot with a proposed
  change applied (the run records which): viewer hosts serve callbacks from one
  multiplexing thread. (The one-thread dispatcher fan-out prototyped here first
  is now the library's own, in ``shared/remote_mvc/_fanout.py``.)

The library itself is never touched; a copy is put first on PYTHONPATH of the
server and viewer processes of the system that uses it.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LIBRARY = ROOT / "shared" / "remote_mvc"

MULTIPLEX_OLD = "        daemon = TrackedDaemon(host=s.host, port=s.port, nathost=s.advertised_host(), natport=0)\n"
MULTIPLEX_NEW = (
    "        from Pyro5 import config as pyro_config\n"
    "        previous, pyro_config.SERVERTYPE = pyro_config.SERVERTYPE, \"multiplex\"  # PROTOTYPE: one thread\n"
    "        try:\n"
    "            daemon = TrackedDaemon(host=s.host, port=s.port, nathost=s.advertised_host(), natport=0)\n"
    "        finally:\n"
    "            pyro_config.SERVERTYPE = previous\n")


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


def build(dest: Path, source: Path = LIBRARY) -> tuple[Path, list[str]]:
    """The prototype: a copy of ``source`` with the proposals that apply; returns (path, parts applied)."""
    snapshot(dest, source)
    target = dest / "remote_mvc"
    parts = []
    viewer = target / "viewer.py"
    text = viewer.read_text()
    if text.count(MULTIPLEX_OLD) == 1:
        viewer.write_text(text.replace(MULTIPLEX_OLD, MULTIPLEX_NEW))
        parts.append("viewer hosts serve all callbacks from one multiplexing thread (Pyro5 SERVERTYPE multiplex)")
    if not parts:
        raise RuntimeError("no prototype change applies to this library version")
    return dest, parts


if __name__ == "__main__":
    path, applied = build(Path(sys.argv[1]))
    print(path, *applied, sep="\n")
