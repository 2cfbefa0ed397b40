"""remote-mvc-model: the example model (name: str, value: int), served by name."""

import sys

from remote_mvc import ExampleModel, ModelService

from .._run import run


def main() -> int:
    return run("model", lambda settings: ModelService(settings, ExampleModel))


if __name__ == "__main__":
    sys.exit(main())
