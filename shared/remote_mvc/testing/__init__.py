"""The testing kit for remote-mvc and for its users' own tests.

Installed as a pytest plugin (entry point ``remote_mvc``), it offers the fixtures

* ``mvc_stack``: a started :class:`Stack`, a real name server on an ephemeral port of
  127.0.0.1, with factories for model services, tickers, viewer hosts, web gateways, clients and
  service *processes* (:class:`ServiceProcess`), all stopped at teardown;
* ``mvc_settings``: the :class:`~remote_mvc.Settings` the stack's parts share;

and, for unit tests of code that reacts to a model (an ``on_change`` handler), in-memory fakes
with no daemon, socket or thread: :class:`FakeModel` and :class:`FakeViewerHost` (see
:mod:`remote_mvc.testing.fakes`). :func:`wait_until` polls a condition with a deadline.

Documented test seams (public, meant for tests): :meth:`Stack.model_uri` (the URI to speak to
the model server with a proxy or raw bytes of one's own), ``AuthProxy.metadata()`` and
``AuthProxy.socket`` (what a daemon told a proxy, the socket it connected), ``ModelClient.proxy()``
(the calling thread's ``AuthProxy``), ``SQLiteStore.pragma()``
and ``SQLiteStore.checkpointing``, ``ModelServer.pipeline`` (its queue, store, audit log and commit), and
:class:`SocketPairs` (a fan-out ``connect`` over socket pairs, to drive its real loop in a test).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..config import Settings
from ..pyro.setup import setup
from .fakes import FakeModel, FakeViewerHost
from .stack import ServiceProcess, SocketPairs, Stack, wait_until

__all__ = ["Stack", "ServiceProcess", "SocketPairs", "wait_until", "FakeModel", "FakeViewerHost", "mvc_settings",
           "mvc_stack"]


def pytest_configure(config: pytest.Config) -> None:
    """Configure Pyro5 for remote-mvc once, as every program using it does (``remote_mvc.setup``)."""
    setup(Settings())


@pytest.fixture
def mvc_stack(tmp_path: Path) -> Iterator[Stack]:
    """A running name server on an ephemeral port; start more with the stack's methods."""
    with Stack(tmp_path) as stack:
        yield stack


@pytest.fixture
def mvc_settings(mvc_stack: Stack) -> Settings:
    """The settings of the ``mvc_stack`` fixture."""
    return mvc_stack.settings
