"""The systems under test, as the orchestrator drives them.

Each system starts its server process (so its CPU and RSS are its own), says how
viewer processes connect to it, and offers ``change(i, t0)``: one controller
call that returns the sequence number viewers will see for it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import CHANNEL, NAIVE_OBJECT, setup_library

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class System:
    name = ""
    label = ""
    durable = False
    proc: subprocess.Popen | None = None

    def __init__(self, workdir: Path, pythonpath: str = "") -> None:
        self.workdir = workdir
        self.pythonpath = pythonpath
        self.workdir.mkdir(parents=True, exist_ok=True)

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MVC_", "PYRO_"))}
        paths = [p for p in (self.pythonpath, str(ROOT), env.get("PYTHONPATH", "")) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> None:
        raise NotImplementedError

    def viewer_env(self) -> dict[str, str]:
        return self.base_env()

    def viewer_connect(self) -> str:
        return ""

    def change(self, i: int, t0: float) -> int:
        raise NotImplementedError

    @property
    def server_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class RemoteMVC(System):
    """remote-mvc: its name server in this process, the model service in its own process.

    ``viewer_server`` is how each viewer process's ViewerHost serves its viewers
    (``MVC_VIEWER_SERVER``); empty (the default) leaves the library's default, which is
    what the targets are measured with: what a user gets without a setting to discover.
    """

    name = "remote-mvc"
    label = "remote-mvc"
    durable = True
    viewer_server = ""

    def start(self) -> None:
        from remote_mvc import ModelClient, NameServer, Settings, resolve

        self.secret = secrets.token_hex(16)
        base = {"state_dir": str(self.workdir / "state"), "ns_port": 0, "port": 0, "metrics_port": -1,
                "register_interval": 2.0, "credentials": f"controller:controller:{self.secret}",
                "model_name": "bench.model", **({"viewer_server": self.viewer_server} if self.viewer_server else {})}
        setup_library(Settings(service="nameserver", **base))
        self.ns = NameServer(Settings(service="nameserver", **base)).start()
        self.settings = Settings(service="model", **{**base, "ns_port": self.ns.port})
        log = open(self.workdir / "model-server.log", "ab")  # noqa: SIM115 - the process keeps it
        model_settings = self.settings
        if hasattr(model_settings, "max_subscriptions_per_address"):  # the N = 1000 anonymous viewers of
            model_settings = model_settings.replace(max_subscriptions_per_address=100_000)  # one address
        env = {**self.base_env(), **self.mvc_env(model_settings)}
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.mvc_server"], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + 30
        while True:
            try:
                resolve(self.settings.model_name, self.settings)
                break
            except Exception:  # noqa: BLE001 - not registered yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"model server did not start; see {self.workdir}/model-server.log") from None
                time.sleep(0.05)
        self.client = ModelClient(self.settings.model_name, self.settings.replace(identity="controller"),
                                  retry_seconds=5.0)
        self.client.modify({"seq": 0, "t0": time.time()})  # connect and authenticate before measuring

    @staticmethod
    def mvc_env(settings: Any) -> dict[str, str]:
        """The settings that differ from the defaults, as MVC_* (a library at an older ref may not
        know a newer setting, and rejects unknown ones)."""
        defaults = vars(type(settings)())
        return {f"MVC_{k.upper()}": str(v) for k, v in vars(settings).items() if v != defaults.get(k)}

    def viewer_env(self) -> dict[str, str]:
        viewer = self.settings.replace(service="bench-viewer", credentials="", log_level="WARNING")
        return {**self.base_env(), **self.mvc_env(viewer)}

    def change(self, i: int, t0: float) -> int:
        return self.client.modify({"seq": i, "t0": t0})

    def stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        super().stop()
        ns = getattr(self, "ns", None)
        if ns is not None:
            ns.stop()


class RemoteMVCRef(RemoteMVC):
    """remote-mvc as committed at a git ref (``--ref``), e.g. before a change: same harness, same run."""

    name = "remote-mvc-ref"
    label = "remote-mvc @ ref"


class Naive(System):
    """A Pyro5 server looping over subscriber proxies; two-way or oneway callbacks."""

    def __init__(self, workdir: Path, pythonpath: str = "", oneway: bool = False) -> None:
        super().__init__(workdir, pythonpath)
        self.oneway = oneway
        self.name = "naive-oneway" if oneway else "naive-twoway"
        self.label = "naive Pyro5 oneway" if oneway else "naive Pyro5 two-way"

    def start(self) -> None:
        import Pyro5.api

        from bench.common import configure_naive_pyro

        configure_naive_pyro()
        argv = [sys.executable, "-m", "bench.naive_server"] + (["--oneway"] if self.oneway else [])
        self.proc = subprocess.Popen(argv, env=self.base_env(), stdout=subprocess.PIPE, text=True,
                                     stderr=open(self.workdir / "naive-server.log", "ab"))  # noqa: SIM115
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("naive server did not start")
        self.uri = json.loads(line)["uri"]
        assert self.uri.startswith(f"PYRO:{NAIVE_OBJECT}@")
        self.proxy = Pyro5.api.Proxy(self.uri)
        self.proxy._pyroBind()

    def viewer_connect(self) -> str:
        return self.uri

    def change(self, i: int, t0: float) -> int:
        return self.proxy.publish({"seq": i, "t0": t0})

    def stop(self) -> None:
        proxy = getattr(self, "proxy", None)
        if proxy is not None:
            proxy._pyroRelease()
        super().stop()


class Redis(System):
    """Debian's redis-server on loopback; redis-py publisher and subscribers."""

    name = "redis"
    label = "Redis pub/sub"

    def start(self) -> None:
        import redis

        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = free_port()
        # No persistence (pub/sub has none), and no output-buffer limit for subscribers so that a
        # subscriber that falls behind is buffered for, not disconnected (which would lose messages).
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.workdir), "--maxclients", "12000",
                "--client-output-buffer-limit", "pubsub 0 0 0", "--logfile", str(self.workdir / "redis.log")]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {self.workdir}/redis.log") from None
                time.sleep(0.05)

    def viewer_connect(self) -> str:
        return str(self.port)

    def subscribers(self) -> int:
        return int(self.client.pubsub_numsub(CHANNEL)[0][1])

    def change(self, i: int, t0: float) -> int:
        self.client.publish(CHANNEL, json.dumps({"seq": i, "t0": t0}))
        return i

    def stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        super().stop()


def make(name: str, workdir: Path, libs: dict[str, str], viewer_server: str = "") -> System:
    """``libs``: system name -> directory holding the remote_mvc package it runs (a snapshot or a copy)."""
    if name.startswith("remote-mvc"):
        cls = {"remote-mvc": RemoteMVC, "remote-mvc-ref": RemoteMVCRef}[name]
        system = cls(workdir, libs.get(name, ""))
        system.viewer_server = viewer_server
        if name == "remote-mvc-ref":
            system.label = f"remote-mvc @ {libs.get('ref', 'ref')}"
            config = Path(libs[name]) / "remote_mvc" / "config.py"
            if "viewer_server" not in config.read_text():  # older than the setting: its default only
                system.viewer_server = ""
        return system
    if name == "naive-twoway":
        return Naive(workdir)
    if name == "naive-oneway":
        return Naive(workdir, oneway=True)
    if name == "redis":
        return Redis(workdir)
    raise ValueError(f"unknown system {name!r}")
