"""Test kit for cluster mode: real etcd members on loopback, real model-server replica processes,
controllers that keep their own records and viewers that record what they saw.

Nothing here fakes etcd: :class:`EtcdCluster` runs Debian's ``etcd`` binary (3.4+), one process per
member, each with its own data directory and free loopback ports, and can SIGKILL, SIGSTOP/SIGCONT,
restart or wipe them. Under ``CI=true`` a missing ``etcd`` binary fails the tests instead of skipping.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from remote_mvc import ModelClient, MVCError, ServiceUnavailable, Settings
from remote_mvc.etcd_testing import ETCD, EtcdCluster, EtcdMember, free_port  # noqa: F401 - the kit's API
from remote_mvc.testing import ServiceProcess


def require_etcd() -> None:
    """Skip without an etcd binary -- fail under CI=true (.ci/run installs it)."""
    if ETCD is None:
        message = "etcd is not installed (apt-get install etcd-server etcd-client)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def etcd_cluster(root: Path, size: int) -> EtcdCluster:
    """A started cluster of ``size`` members (fails or skips without etcd, see require_etcd)."""
    require_etcd()
    cluster = EtcdCluster(root, size)
    cluster.start()
    return cluster


class Replica:
    """A model-server replica process in cluster mode."""

    def __init__(self, name: str, env: dict[str, str], root: Path) -> None:
        self.name = name
        self.env = {**env, "MVC_REPLICA": name, "MVC_SERVICE": f"model-{name}",
                    "MVC_STATE_DIR": str(root / name)}
        self.proc: ServiceProcess | None = None

    def start(self, timeout: float = 30.0) -> Replica:
        self.proc = ServiceProcess([sys.executable, "-m", "remote_mvc_services.model.main"], self.env).start()
        self.proc.wait_for_log(lambda r: r.get("event") == "registered", timeout)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.proc.poll() is None:
            self.proc.proc.send_signal(signal.SIGKILL)
            self.proc.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.proc.poll() is None:
            self.proc.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def signal(self, sig: int) -> None:
        self.proc.proc.send_signal(sig)


class Controller(threading.Thread):
    """Writes ``value`` changes until stopped, retrying as documented (ModelClient: same request id),
    and records every change acknowledged to it: (revision, value)."""

    def __init__(self, index: int, settings: Settings, pace: float = 0.02) -> None:
        super().__init__(name=f"controller-{index}", daemon=True)
        self.index = index
        self.client = ModelClient(settings=settings, retry_seconds=30.0)
        self.pace = pace
        self.acked: list[tuple[int, int]] = []
        self.refused: list[str] = []  # errors that reached the controller (after its retries)
        self.stop_flag = threading.Event()
        self.counter = 0

    def run(self) -> None:
        rng = random.Random(self.index)
        while not self.stop_flag.is_set():
            self.counter += 1
            value = self.index * 1_000_000 + self.counter  # unique per change: tells duplicates apart
            try:
                revision = self.client.modify({"value": value})
                self.acked.append((revision, value))
            except (MVCError, OSError, Exception) as exc:  # noqa: B014 - recorded, judged by the test
                self.refused.append(f"{type(exc).__name__}: {exc}")
            self.stop_flag.wait(self.pace * rng.uniform(0.5, 1.5))

    def halt(self) -> None:
        self.stop_flag.set()
        self.join(60)
        self.client.close()


def check_history(events: list[dict[str, Any]], controllers: list[Controller]) -> dict[str, int]:
    """From the controllers' own records: nothing acknowledged lost, nothing applied twice."""
    by_revision = {e["revision"]: e for e in events}
    revisions = [e["revision"] for e in events]
    assert revisions == list(range(revisions[0], revisions[0] + len(revisions))), "history has a gap"
    acked = [(r, v) for c in controllers for r, v in c.acked]
    for revision, value in acked:
        assert revision in by_revision, f"acknowledged revision {revision} is not in the history"
        assert by_revision[revision]["values"]["value"] == value, \
            f"revision {revision} holds {by_revision[revision]['values']['value']}, {value} was acknowledged"
    values = [e["changes"]["value"]["new"] for e in events if "value" in e["changes"]]
    assert len(values) == len(set(values)), "a change was applied twice"
    return {"acked": len(acked), "events": len(events)}


def all_history(client: ModelClient, since: int = 0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        page = client.history(since, 1000)
        if not page:
            return out
        out.extend(page)
        since = page[-1]["revision"]


def retrying(fn, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except ServiceUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 in front of one address; :meth:`cut` makes it a black hole (open
    connections go silent, new ones are accepted and never answered) until :meth:`restore`: a
    network partition between one process and etcd, without touching etcd."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []

    def start(self) -> CuttableProxy:
        """Start accepting connections (the constructor only binds the port)."""
        threading.Thread(target=self._accept, name="cuttable-proxy", daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._socks.append(client)
            if self._cut.is_set():
                continue  # held open, never answered
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self._cut.is_set() and not self._closed.is_set():
                    time.sleep(0.05)  # a partition: the bytes go nowhere (held), nothing is answered
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self._cut.set()

    def restore(self) -> None:
        """Reconnect: connections held during the cut are closed (their peers reconnect)."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self.restore()
