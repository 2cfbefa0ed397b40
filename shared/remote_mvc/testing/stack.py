"""Real daemons on 127.0.0.1, ephemeral ports, cleaned up afterwards: :class:`Stack` (a name
server plus factories for model services, tickers, viewer hosts, gateways, clients and service
processes) and :class:`ServiceProcess` (a service as a real subprocess, for SIGKILL and SIGSTOP
tests, its JSON log lines collected so a test can wait on them).

Like any program using remote-mvc, a test process calls ``remote_mvc.setup()``: the pytest
plugin does so once at start (default settings), and a :class:`Stack` again for its own settings
when it starts (a TLS stack turns TLS on; ``setup(Settings())`` turns it off).
:class:`SocketPairs` lets a test drive the fan-out's real loop over socket pairs.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..client import ModelClient, resolve
from ..config import Settings
from ..metrics import Metrics
from ..nameserver import NameServer
from ..pyro.setup import setup
from ..server import ModelService
from ..service import Service
from ..ticker import TickerService
from ..viewer import Viewer, ViewerHost

__all__ = ["Stack", "ServiceProcess", "SocketPairs", "wait_until"]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class ServiceProcess:
    """A service in its own process, its stdout JSON lines collected as they come.

    :meth:`start` runs the process and its reader thread (the constructor only records what to
    run); :meth:`stop` ends both. It is a context manager too.
    """

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.env = env
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> ServiceProcess:
        """Run the process and start collecting its output (once)."""
        if self._proc is None:
            self._proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, bufsize=1)
            self._reader = threading.Thread(target=self._read, name="service-process-reader", daemon=True)
            self._reader.start()
        return self

    @property
    def proc(self) -> subprocess.Popen[str]:
        """The running process (after :meth:`start`)."""
        if self._proc is None:
            raise RuntimeError(f"{self.argv} was not started: call start()")
        return self._proc

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.raw.append(line.rstrip("\n"))
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    pass
                self._cond.notify_all()

    def wait_for_log(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0,
                     start: int = 0) -> dict[str, Any]:
        """The first JSON line (from index ``start``) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if predicate(line):
                        return line
                left = deadline - time.monotonic()
                reading = self._reader is not None and self._reader.is_alive()
                if left <= 0 or (self.proc.poll() is not None and not reading):
                    tail = "\n".join(self.raw[-20:])
                    raise AssertionError(f"no matching log line within {timeout}s from {self.argv}:\n{tail}")
                self._cond.wait(min(left, 0.1))

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines of event ``name`` seen so far."""
        with self._cond:
            return [line for line in self.lines if line.get("event") == name]

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def signal(self, sig: int) -> None:
        """Send the process ``sig``."""
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """Kill the process (SIGKILL) unless it has ended."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (resuming a stopped process first), then SIGKILL if it hangs; its exit status
        (None when it was never started)."""
        if self._proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        return self.proc.returncode


class _RecordingSocket(socket.socket):
    """A socket that reports every non-empty send (to tell the order of sends across sockets)."""

    def __init__(self, sock: socket.socket, on_send: Callable[[socket.socket], None]) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self._on_send = on_send

    def send(self, data: Any, flags: int = 0) -> int:
        """Report, then send."""
        if data:
            self._on_send(self)
        return super().send(data, flags)


class _PairConnection:
    """One end of a socket pair, as a fan-out connection (see ``remote_mvc.fanout.loop.Connection``)."""

    def __init__(self, sock: socket.socket, object_id: str) -> None:
        self.sock = sock
        self.object_id = object_id

    def claim(self) -> None:
        """Nothing to claim: no proxy."""

    def close(self) -> None:
        """Close our end."""
        self.sock.close()


class SocketPairs:
    """A fan-out ``connect`` for tests: each viewer's connection is one end of a socket pair.

    ``Fanout(..., connect=pairs)`` drives its real loop over them; the test holds
    the other ends (:meth:`peer`, by the viewer's object id, non-blocking) and
    speaks the viewer's side of the notify protocol. ``on_send(object_id)`` is
    told of every write the loop makes, in order.
    """

    def __init__(self, on_send: Callable[[str], None] | None = None) -> None:
        self._peers: dict[str, socket.socket] = {}
        self._cond = threading.Condition()
        self._on_send = on_send

    def __call__(self, uri: str, timeout: float) -> _PairConnection:
        """Connect the viewer at ``uri`` (``PYRO:<object id>@<host>:<port>``)."""
        object_id = uri.partition(":")[2].rpartition("@")[0]
        ours, peer = socket.socketpair()
        if self._on_send is not None:
            on_send = self._on_send
            ours = _RecordingSocket(ours, lambda _sock: on_send(object_id))
        ours.setblocking(False)
        peer.setblocking(False)
        with self._cond:
            self._peers[object_id] = peer
            self._cond.notify_all()
        return _PairConnection(ours, object_id)

    def peer(self, object_id: str, timeout: float = 10.0) -> socket.socket:
        """The viewer's end of the connection to ``object_id``, once made."""
        with self._cond:
            if not self._cond.wait_for(lambda: object_id in self._peers, timeout):
                raise AssertionError(f"no connection to {object_id} within {timeout}s")
            return self._peers[object_id]

    def close(self) -> None:
        """Close the viewers' ends."""
        with self._cond:
            for peer in self._peers.values():
                peer.close()


class Stack:
    """A name server plus whatever a test starts; everything stops at :meth:`close`.

    :meth:`start` starts the name server (the constructor only prepares secrets and settings);
    ``with Stack(path) as stack:`` starts and closes it.
    """

    def __init__(self, state_dir: Path, **overrides: Any) -> None:
        self.state_dir = Path(state_dir)
        self.controller_secret = secrets.token_hex(16)
        self.admin_secret = secrets.token_hex(16)
        self.service_secret = secrets.token_hex(16)
        self.gateway_secret = secrets.token_hex(16)
        self.credentials = (f"controller:controller:{self.controller_secret},"
                            f"admin:admin:{self.admin_secret},service:service:{self.service_secret},"
                            f"gateway:gateway:{self.gateway_secret}")
        # services prove the service identity, so the name server is protected as in production
        base = {"state_dir": str(self.state_dir), "ns_port": 0, "port": 0, "metrics_port": -1, "identity": "service",
                "lease_seconds": 2.0, "call_timeout": 1.0, "register_interval": 0.5,
                "credentials": self.credentials, **overrides}
        self.settings = Settings(service="nameserver", **base)  # its ns_port is set by start()
        self.nameserver: NameServer | None = None
        self._services: list[Service] = []
        self._processes: list[ServiceProcess] = []
        self._clients: list[ModelClient] = []

    def start(self) -> Stack:
        """Start the name server on an ephemeral port (once); the stack's settings point at it."""
        if self.nameserver is None:
            setup(self.settings)  # Pyro5's process-wide configuration, for this stack's settings (TLS or not)
            self.nameserver = NameServer(self.settings).start()
            self.settings = self.settings.replace(ns_port=self.nameserver.port)
        return self

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def adopt(self, service: Service) -> Service:
        """Stop ``service`` (one a test built and starts itself) when the stack closes."""
        self._services.append(service)
        return service

    def _track(self, service: Service, timeout: float = 10.0) -> Any:
        self._services.append(service)
        service.start()
        if not service.wait_registered(timeout):
            raise AssertionError(f"{service} did not register with the name server")
        return service

    def model(self, service: str = "model", **overrides: Any) -> ModelService:
        """Start a model service in this process."""
        return self._track(ModelService(self.settings.replace(service=service, **overrides)))

    def ticker(self, interval: float = 0.1, **overrides: Any) -> TickerService:
        """Start a ticker service in this process."""
        return self._track(TickerService(self.settings.replace(service="ticker", ticker_interval=interval,
                                                               **overrides)))

    def viewers(self, count: int = 1, model: str | None = None, prefix: str = "viewer",
                metrics: Metrics | None = None, **overrides: Any) -> tuple[ViewerHost, list[Viewer]]:
        """A viewer host with ``count`` recording viewers; returns once they are subscribed and each
        holds the model's state (its first snapshot arrives after the subscribe call returns)."""
        host = ViewerHost(self.settings.replace(service="viewer", **overrides), metrics)
        model = model or self.settings.model_name
        views = [host.add(Viewer(f"{prefix}-{i}", model, metrics=host.metrics, record=True, log_values=False))
                 for i in range(count)]
        self._services.append(host)
        host.start()
        wait_until(lambda: host.wait_subscribed(0.05) and all(v.synced for v in views), 10,
                   message="viewers to subscribe and hold the model's state")
        return host, views

    def gateway(self, **overrides: Any) -> Any:
        """Start a web gateway (``remote_mvc.gateway.Gateway``) on an ephemeral HTTP port, in this
        process; returns once it is healthy (subscribed, every feed holding its model's state);
        needs the ``gateway`` extra."""
        from ..gateway import Gateway

        gw = Gateway(self.settings.replace(service="gateway", identity="gateway", gateway_port=0, **overrides))
        self._services.append(gw)
        gw.start()
        wait_until(gw.healthy, 10, message="the gateway to subscribe and hold every model's state")
        return gw

    def client(self, identity: str | None = "controller", model: str | None = None,
               retry_seconds: float = 5.0, **overrides: Any) -> ModelClient:
        """A client of the model as ``identity`` (None: no credentials, read-only)."""
        settings = self.settings.replace(identity=identity or "", **overrides)
        if identity is None:
            settings = settings.replace(credentials="")
        c = ModelClient(model, settings, retry_seconds=retry_seconds)
        self._clients.append(c)
        return c

    def model_uri(self, model: str | None = None) -> Any:
        """The Pyro5 URI the name server gives for ``model`` (default: the model): for tests that
        speak to the model server with a proxy or bytes of their own."""
        return resolve(model or self.settings.model_name, self.settings)

    def env(self, service: str, **overrides: Any) -> dict[str, str]:
        """Environment for a service subprocess sharing this stack's settings."""
        s = self.settings.replace(service=service, **overrides)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MVC_")}
        env.update({f"MVC_{k.upper()}": str(v) for k, v in vars(s).items()})
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def process(self, service: str, **overrides: Any) -> ServiceProcess:
        """Run ``remote-mvc-<service>`` as a subprocess (``viewer``, ``model``, ``ticker``)."""
        module = f"remote_mvc_services.{service}.main"
        name = overrides.pop("name", service)
        p = ServiceProcess([sys.executable, "-m", module], self.env(name, **overrides))
        self._processes.append(p)
        return p.start()

    def close(self) -> None:
        """Close this stack's clients, then stop its processes and services, latest first."""
        for c in self._clients:
            c.close()
        for p in reversed(self._processes):
            p.stop()
        for s in reversed(self._services):
            s.stop()
        if self.nameserver is not None:
            self.nameserver.stop()
