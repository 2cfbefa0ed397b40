"""remote-mvc-gateway: the models over HTTP (JSON API, event streams, the live page at /)."""

import sys

from remote_mvc import Settings
from remote_mvc.gateway import Gateway

from .._run import run


def build(settings: Settings) -> Gateway:
    return Gateway(settings)


def main() -> int:
    return run("gateway", build)


if __name__ == "__main__":
    sys.exit(main())
