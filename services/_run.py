"""What every service main does: settings, JSON logs, run until SIGTERM."""

from __future__ import annotations

import sys
from collections.abc import Callable

from remote_mvc import ConfigError, Service, Settings, configure_logging


def run(default_service: str, build: Callable[[Settings], Service]) -> int:
    try:
        settings = Settings.from_env()
        if settings.service == Settings.service:
            settings = settings.replace(service=default_service)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.service, settings.log_level)
    build(settings).run()
    return 0
