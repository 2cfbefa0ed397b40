"""What every service main does: settings, JSON logs, run until SIGTERM."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from remote_mvc import ConfigError, Service, ServiceUnavailable, Settings, configure_logging, log_event, setup


def run(default_service: str, build: Callable[[Settings], Service]) -> int:
    try:
        settings = Settings.from_env()
        if settings.service == Settings.service:
            settings = settings.replace(service=default_service)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.service, settings.log_level)
    setup(settings)  # Pyro5's process-wide configuration, once
    try:
        service = build(settings)
    except ServiceUnavailable as exc:  # cluster mode: etcd unreachable at start-up; the supervisor retries
        log_event(logging.getLogger("remote_mvc.service"), "start_failed", f"cannot start: {exc}",
                  level=logging.ERROR, error=str(exc))
        return 3
    service.run()
    return 0
