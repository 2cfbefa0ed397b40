"""Bits shared by the harness processes: Pyro5 settings for the baselines, the channel name."""

from __future__ import annotations

import json
import sys
from typing import Any

CHANNEL = "bench.changes"
NAIVE_OBJECT = "bench.naive"
CALL_TIMEOUT = 3.0  # remote-mvc's default MVC_CALL_TIMEOUT; the naive servers use the same


def configure_naive_pyro() -> None:
    """The Pyro5 settings remote-mvc uses (thread server, serpent, no Nagle), for the baselines."""
    from Pyro5 import config

    config.SERVERTYPE = "thread"
    config.THREADPOOL_SIZE = 1200
    config.THREADPOOL_SIZE_MIN = 4
    config.SERIALIZER = "serpent"
    config.SOCK_NODELAY = True
    config.MAX_RETRIES = 0
    config.DETAILED_TRACEBACK = False


def reply(obj: dict[str, Any]) -> None:
    """One JSON line to the orchestrator (our stdout is its pipe)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def setup_library(settings: Any) -> None:
    """``remote_mvc.setup(settings)``, the process-wide Pyro5 configuration every program using the
    library makes once; a library at an older ``--ref`` has none (it configured Pyro5 by itself)."""
    import remote_mvc

    setup = getattr(remote_mvc, "setup", None)
    if setup is not None:
        setup(settings)
