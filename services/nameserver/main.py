"""remote-mvc-nameserver: Pyro5's name server with durable registrations."""

import sys

from remote_mvc import NameServer

from .._run import run


def main() -> int:
    return run("nameserver", NameServer)


if __name__ == "__main__":
    sys.exit(main())
