"""Baseline: the naive Pyro5 publisher, a loop over subscriber proxies.

``publish`` calls ``notify`` on every subscriber in turn from the controller's
own request thread and returns when the loop is done. With ``--oneway`` the
viewers' ``notify`` is a Pyro5 ``@oneway`` method, so the loop does not wait
for the handlers (Pyro5 runs each oneway call in a new thread at the viewer).
A subscriber whose call fails or times out is dropped, as in Pyro5's examples.
Nothing is persisted: this is the in-memory best case of the pattern.

Prints ``{"uri": ...}`` on stdout once serving; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

import Pyro5.api
from Pyro5.errors import CommunicationError, PyroError

from bench.common import CALL_TIMEOUT, NAIVE_OBJECT, configure_naive_pyro, reply


@Pyro5.api.expose
class NaiveServer:
    def __init__(self) -> None:
        self._uris: list[str] = []
        self._proxies: dict[str, Pyro5.api.Proxy] = {}
        self._lock = threading.Lock()  # one publish at a time: proxies are not shared between threads
        self.dropped = 0

    def subscribe(self, uri: str) -> int:
        with self._lock:
            self._uris.append(uri)
            return len(self._uris)

    def count(self) -> int:
        return len(self._uris)

    def publish(self, change: dict[str, Any]) -> int:
        with self._lock:
            for uri in list(self._uris):
                proxy = self._proxies.get(uri)
                if proxy is None:
                    proxy = Pyro5.api.Proxy(uri)
                    proxy._pyroTimeout = CALL_TIMEOUT
                    proxy._pyroMaxRetries = 0
                    self._proxies[uri] = proxy
                proxy._pyroClaimOwnership()
                try:
                    proxy.notify(change)
                except (CommunicationError, PyroError, OSError):
                    self._uris.remove(uri)
                    self._proxies.pop(uri)._pyroRelease()
                    self.dropped += 1
            return change["seq"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--oneway", action="store_true", help="label only: the viewers decide oneway-ness")
    parser.parse_args()
    configure_naive_pyro()
    daemon = Pyro5.api.Daemon(host="127.0.0.1")
    uri = daemon.register(NaiveServer(), objectId=NAIVE_OBJECT)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=daemon.requestLoop, args=(lambda: not stop.is_set(),), daemon=True).start()
    reply({"uri": str(uri)})
    while not stop.wait(0.5):
        pass
    daemon.shutdown()


if __name__ == "__main__":
    main()
