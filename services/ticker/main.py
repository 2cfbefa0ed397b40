"""remote-mvc-ticker: a model that changes on a steady clock (MVC_TICKER_INTERVAL)."""

import sys

from remote_mvc import TickerService

from .._run import run


def main() -> int:
    return run("ticker", TickerService)


if __name__ == "__main__":
    sys.exit(main())
