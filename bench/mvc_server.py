"""remote-mvc's model service serving the benchmark model, configured from MVC_* like the real one.

The same code path as ``remote-mvc-model`` (``ModelService(settings, schema).run()``),
only the schema differs: a sequence number and the controller's call start time
travel inside every change, so viewers and snapshots carry them.
"""

from __future__ import annotations

import sys

from bench.common import setup_library
from remote_mvc import Field, Model, ModelService, Settings, between, configure_logging


class BenchModel(Model):
    seq = Field(int, 0, between(0, 2**53), doc="the controller's change number")
    t0 = Field(float, 0.0, doc="time.time() when the controller started the modify call")


def main() -> int:
    settings = Settings.from_env()
    setup_library(settings)
    configure_logging(settings.service, settings.log_level)
    ModelService(settings, BenchModel).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
