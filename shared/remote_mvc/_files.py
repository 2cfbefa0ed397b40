"""Files with secrets in them, created private: state directory 0700, files 0600.

Every file remote-mvc creates holds something an outsider must not read (state,
audit records of who did what, credentials), so each is created with its final
mode by ``os.open`` (no window between a world-readable creation and a chmod),
and the state directory is created readable by its owner only. Existing files
and directories keep the modes their operator gave them: the library changes
nothing behind its user's back, and no process-wide umask is touched.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TextIO

__all__ = ["DIR_MODE", "FILE_MODE", "private_dir", "create_private", "open_private_append", "write_private"]

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and missing parents) mode 0700; an existing directory is left as it is."""
    p = Path(path)
    if not p.is_dir():
        for parent in reversed([q for q in (p, *p.parents) if not q.exists()]):
            try:
                os.mkdir(parent, DIR_MODE)
            except FileExistsError:
                pass  # made meanwhile by another process or thread
    return p


def create_private(path: str | Path) -> Path:
    """Make sure ``path`` exists, created mode 0600 when it did not (for files another library
    opens itself, such as SQLite's: it then keeps the mode, and gives its -wal/-shm files the same)."""
    p = Path(path)
    private_dir(p.parent)
    try:
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        pass
    return p


def open_private_append(path: str | Path) -> TextIO:
    """Open ``path`` for appending text (UTF-8), created mode 0600 when new."""
    p = Path(path)
    private_dir(p.parent)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    return os.fdopen(fd, "a", encoding="utf-8")


def write_private(path: str | Path, data: bytes) -> None:
    """Write a whole file mode 0600 from its creation on: a temporary file renamed over the old
    one, so there is no moment where it is readable by others, nor half written."""
    p = Path(path)
    private_dir(p.parent)
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
