"""Real etcd members on loopback, for tests and benchmarks of cluster mode.

:class:`EtcdCluster` runs the ``etcd`` binary (Debian's etcd-server, 3.4+), one process per member,
each with its own data directory and free loopback ports, and can SIGKILL, SIGSTOP/SIGCONT, restart
or wipe them. Nothing here fakes etcd.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import cast

__all__ = ["ETCD", "EtcdCluster", "EtcdMember", "free_port"]

ETCD = shutil.which("etcd")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a member about to bind it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdMember:
    """One etcd member on loopback: name, data directory, ports, process."""
    def __init__(self, name: str, data_dir: Path, scheme: str = "http") -> None:
        self.name = name
        self.scheme = scheme
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"{name}.log"

    @property
    def client_url(self) -> str:
        """The member's client URL."""
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        """The member's peer URL."""
        return f"http://127.0.0.1:{self.peer_port}"


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1 (one process each), started together. With ``tls``
    (``ca``, ``cert``, ``key`` paths) clients speak https and must present a certificate of that CA."""

    def __init__(self, root: Path, size: int = 3, tls: tuple[str, str, str] | None = None) -> None:
        if ETCD is None:
            raise RuntimeError("etcd is not installed (apt-get install etcd-server etcd-client)")
        self.root = root
        self.tls = tls
        self.token = uuid.uuid4().hex[:12]
        self.members = [EtcdMember(f"m{i}", root / f"m{i}.etcd", "https" if tls else "http")
                        for i in range(size)]
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL."""
        return [m.client_url for m in self.members]

    @property
    def store_setting(self) -> str:
        """The ``MVC_STORE`` value naming this cluster."""
        return ",".join(self.endpoints)

    def _argv(self, m: EtcdMember) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [str(ETCD), "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", initial, "--initial-cluster-token", self.token,
                "--initial-cluster-state", "new", "--heartbeat-interval", "50", "--election-timeout", "500",
                "--log-level", "warn", "--logger", "zap",
                *(["--trusted-ca-file", self.tls[0], "--cert-file", self.tls[1], "--key-file", self.tls[2],
                   "--client-cert-auth"] if self.tls else [])]

    def start(self, index: int | None = None) -> None:
        """Start member ``index``, or every member."""
        for m in self.members if index is None else [self.members[index]]:
            log = open(m.log_path, "ab")  # noqa: SIM115 - the child keeps it
            m.proc = subprocess.Popen(self._argv(m), stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
            log.close()
        self.wait_healthy(index)

    def healthy(self, index: int) -> bool:
        """True when member ``index`` answers its health check."""
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.tls[0])
            context.load_cert_chain(self.tls[1], self.tls[2])
        try:
            with urllib.request.urlopen(self.members[index].client_url + "/health", timeout=1,
                                        context=context) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def wait_healthy(self, index: int | None = None, timeout: float = 30.0) -> None:
        """Wait until member ``index`` (or every member) is healthy."""
        indexes = range(len(self.members)) if index is None else [index]
        deadline = time.monotonic() + timeout
        for i in indexes:
            while not self.healthy(i):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd member {i} not healthy within {timeout}s; see {self.members[i].log_path}")
                time.sleep(0.1)

    def kill(self, index: int) -> None:
        """Kill member ``index`` (SIGKILL)."""
        m = self.members[index]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(10)

    def pause(self, index: int) -> None:
        """Freeze member ``index`` (SIGSTOP)."""
        cast("subprocess.Popen", self.members[index].proc).send_signal(signal.SIGSTOP)

    def resume(self, index: int) -> None:
        """Let a frozen member ``index`` run again (SIGCONT)."""
        cast("subprocess.Popen", self.members[index].proc).send_signal(signal.SIGCONT)

    def wipe(self) -> None:
        """Kill every member, delete the data and start a brand new cluster on the same addresses."""
        for i in range(len(self.members)):
            self.kill(i)
        for m in self.members:
            shutil.rmtree(m.data_dir, ignore_errors=True)
        self.token = uuid.uuid4().hex[:12]
        self.start()

    def stop(self) -> None:
        """Stop every member."""
        for i, m in enumerate(self.members):
            if m.proc is not None and m.proc.poll() is None:
                try:
                    m.proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
                self.kill(i)
