"""remote-mvc-viewer: one viewer with its own daemon, subscribed to MVC_WATCH."""

import sys

from remote_mvc import Settings, Viewer, ViewerHost

from .._run import run


def build(settings: Settings) -> ViewerHost:
    host = ViewerHost(settings)
    host.add(Viewer(settings.default_viewer_id(), settings.watched_name, metrics=host.metrics))
    return host


def main() -> int:
    return run("viewer", build)


if __name__ == "__main__":
    sys.exit(main())
