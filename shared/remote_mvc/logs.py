"""JSON logging: one object a line, with timestamp, level, service, logger, event.

Call :func:`configure_logging` once per process, after Pyro5 is imported (Pyro5
configures its own logger at import and would otherwise stay silent). Log with
:func:`log_event` so every line carries a machine-readable ``event`` name next to
the human message, plus whatever fields matter (viewer_id, revision, identity).
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import IO, Any

import Pyro5.api  # noqa: F401  (imported first on purpose, see the module docstring)

try:  # python-json-logger >= 3
    from pythonjsonlogger.json import JsonFormatter
except ImportError:  # pragma: no cover - older python-json-logger
    from pythonjsonlogger.jsonlogger import JsonFormatter

__all__ = ["configure_logging", "log_event", "log_exception", "get_logger"]

_HANDLER_MARK = "_remote_mvc_handler"


def configure_logging(service: str, level: str = "INFO", stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record of the process to ``stream`` (stdout) as JSON lines."""
    formatter = JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        static_fields={"service": service},
        timestamp=True,
        json_ensure_ascii=True,  # one object a line whatever the values hold (U+2028, U+0085...)
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Pyro5 is chatty at DEBUG; keep it at WARNING unless asked for more.
    logging.getLogger("Pyro5").setLevel(max(logging.WARNING, root.level))
    return handler


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` (a child of ``remote_mvc``'s)."""
    return logging.getLogger(name)


_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def log_event(logger: logging.Logger, event: str, message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``message`` with ``event`` and extra fields as JSON keys.

    A field named like a LogRecord attribute (``name``, ``args``...) gets a
    trailing underscore instead of crashing the logging call.
    """
    if logger.isEnabledFor(level):
        extra = {(k + "_" if k in _RESERVED else k): v for k, v in fields.items()}
        logger.log(level, message, extra={"event": event, **extra})


def log_exception(logger: logging.Logger, event: str, message: str, exc: BaseException, **fields: Any) -> None:
    """Log an unexpected error at ERROR with its type, message and traceback as fields."""
    log_event(logger, event, message, level=logging.ERROR, error=f"{type(exc).__name__}: {exc}",
              traceback="".join(traceback.format_exception(exc)), **fields)
