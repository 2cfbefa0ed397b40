"""Drive the real docker-compose.yml stack from tests.

:class:`Stack` is one compose project with a unique name, built on
testcontainers' :class:`~testcontainers.compose.DockerCompose` (its ``ps``
parsing, ``exec`` and ``logs``), plus what these tests need: an isolated
interpolation environment (never the developer's ``.env``), ``run`` of the
controller, JSON-lines logs per container, Prometheus queries, and a complete
teardown (containers incl. one-off ``run`` containers, networks, volumes).

Nothing here imports testcontainers at module import time, so conftest can
report a missing package as a skip (or a failure under ``CI=true``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
WHEELHOUSE = REPO / "build" / "wheelhouse"
SERVICES = ("nameserver", "model", "ticker", "viewer", "prometheus", "alertmanager")
MODEL = "remote_mvc.model"
TICKER = "remote_mvc.ticker"

# Variables of the caller's environment that would change how compose interpolates the file.
_FOREIGN = ("MVC_", "COMPOSE_", "PROMETHEUS_")
_FOREIGN_NAMES = {"VIEWERS", "BASE_IMAGE", "REMOTE_MVC_IMAGE", "DOCKER_DEFAULT_PLATFORM"}

T = TypeVar("T")


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN) and k not in _FOREIGN_NAMES}
    env.update(extra or {})
    return env


def sh(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    check: bool = True,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output; on failure raise with both streams shown."""
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def wait_until(probe: Callable[[], T], *, timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll ``probe`` until it returns something truthy; fail with the last value at the deadline.

    Exceptions raised by the probe count as "not yet" (the last one is reported).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - a probe may fail while things come up
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


_SESSION_MEMO: dict[str, Any] = {}


def once_per_session(fixture_body: Callable[..., T]) -> Callable[..., T]:
    """Run a (non-generator) session fixture's body at most once per process.

    The e2e and chaos suites each define ``e2e_images`` (from the same code); with this
    decorator the images are built once per pytest run however many conftests use it.
    """

    @functools.wraps(fixture_body)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        key = fixture_body.__name__
        if key not in _SESSION_MEMO:
            _SESSION_MEMO[key] = fixture_body(*args, **kwargs)
        return _SESSION_MEMO[key]

    return wrapper


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records


class Stack:
    """One compose project of docker-compose.yml (plus override files, if given)."""

    def __init__(self, project: str, variables: dict[str, str], env_dir: Path,
                 overrides: Iterable[Path] = ()) -> None:
        from testcontainers.compose import DockerCompose

        self.project = project
        self.variables = dict(variables)
        self.env_file = env_dir / f"{project}.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in self.variables.items()), encoding="utf-8")
        self.env_file.chmod(0o600)
        self.env = clean_env(self.variables)
        base = [
            "docker",
            "compose",
            "-p",
            project,
            "--project-directory",
            str(REPO),
            "-f",
            str(COMPOSE_FILE),
            *[arg for path in overrides for arg in ("-f", str(path))],
            "--env-file",
            str(self.env_file),
        ]
        self.compose_argv = base  # the `docker compose` command line of this stack (-p, -f, --env-file)
        stack = self

        class _Compose(DockerCompose):
            @property
            def compose_command_property(self) -> list[str]:  # type: ignore[override]
                return list(base)

            def _run_command(self, cmd, context=None):  # type: ignore[override]
                return subprocess.run(
                    cmd, cwd=str(REPO), env=stack.env, capture_output=True, check=True, timeout=300
                )

        self.tc = _Compose(context=str(REPO))

    # plumbing --------------------------------------------------------------
    def compose(
        self, *args: str, timeout: float = 180, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return sh([*self.compose_argv, *args], env=self.env, timeout=timeout, check=check)

    def up(self, *args: str, timeout: float = 300) -> None:
        self.compose(
            "up",
            "-d",
            "--wait",
            "--wait-timeout",
            str(int(timeout - 10)),
            "--no-build",
            *args,
            timeout=timeout,
        )

    @contextlib.contextmanager
    def running(self, *up_args: str) -> Iterator[Stack]:
        """Up until healthy, yield, and always remove it; on a failure print its recent logs."""
        started = time.monotonic()
        log(f"starting compose project {self.project}")
        try:
            self.up(*up_args)
            self.started_in = time.monotonic() - started
            log(f"{self.project} healthy in {self.started_in:.0f}s")
            yield self
        except BaseException:
            print(self.dump_logs(), file=sys.stderr)
            raise
        finally:
            log(f"removing compose project {self.project}")
            self.down()

    def down(self) -> None:
        """Remove everything of this project: containers (also `run` ones), networks, volumes."""
        self.compose(
            "--profile",
            "*",
            "down",
            "--volumes",
            "--remove-orphans",
            "--timeout",
            "10",
            timeout=180,
            check=False,
        )
        label = f"label=com.docker.compose.project={self.project}"
        leftovers = sh(["docker", "ps", "-aq", "--filter", label], check=False).stdout.split()
        if leftovers:
            sh(["docker", "rm", "-f", "-v", *leftovers], check=False)
        for kind in ("network", "volume"):
            names = sh(["docker", kind, "ls", "-q", "--filter", label], check=False).stdout.split()
            if names:
                sh(["docker", kind, "rm", *names], check=False)
        self.env_file.unlink(missing_ok=True)

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": sh(["docker", "ps", "-aq", "--filter", label], check=False).stdout.split(),
            "networks": sh(["docker", "network", "ls", "-q", "--filter", label], check=False).stdout.split(),
            "volumes": sh(["docker", "volume", "ls", "-q", "--filter", label], check=False).stdout.split(),
        }

    # containers ------------------------------------------------------------
    def containers(self, service: str, include_stopped: bool = False) -> list[str]:
        """Full ids of the service's containers (running ones unless include_stopped)."""
        found = [c for c in self.tc.get_containers(include_all=include_stopped) if c.Service == service]
        return sorted(c.ID for c in found)

    def inspect(self, container: str) -> dict[str, Any]:
        return json.loads(sh(["docker", "inspect", container]).stdout)[0]

    def health(self, container: str) -> str:
        state = self.inspect(container)["State"]
        return (state.get("Health") or {}).get("Status") or state.get("Status", "?")

    def wait_healthy(self, service: str, count: int | None = None, timeout: float = 120) -> list[str]:
        def probe() -> list[str] | None:
            ids = self.containers(service)
            if count is not None and len(ids) != count:
                return None
            return ids if ids and all(self.health(c) == "healthy" for c in ids) else None

        return wait_until(probe, timeout=timeout, what=f"{service} healthy ({count or 'all'} container(s))")

    def logs(self, container: str) -> list[dict[str, Any]]:
        """The container's JSON log records (stdout and stderr), oldest first."""
        proc = sh(["docker", "logs", container], check=False)
        return parse_json_lines(proc.stdout + "\n" + proc.stderr)

    def events(self, container: str, event: str, **match: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.logs(container)
            if r.get("event") == event and all(r.get(k) == v for k, v in match.items())
        ]

    def dump_logs(self, tail: int = 60) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), check=False).stdout

    # the controller --------------------------------------------------------
    def secret(self, identity: str) -> str:
        """``identity``'s secret, read from the credentials file the stack's init service wrote into
        the mvc-secrets volume (through the model container, which mounts it)."""
        model = self.containers("model")[0]
        table = json.loads(sh(["docker", "exec", model, "cat", "/run/secrets/remote-mvc/credentials.json"]).stdout)
        return table["identities"][identity]["secrets"][0]

    def ctl(
        self, *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 90
    ) -> subprocess.CompletedProcess[str]:
        """``docker compose run --rm controller remote-mvc-ctl ARGS`` (no TTY)."""
        flags = [item for k, v in (env or {}).items() for item in ("-e", f"{k}={v}")]
        return self.compose(
            # --no-deps: the stack is up; a health check flapping under load must not fail the call
            "run", "--rm", "-T", "--no-deps", *flags, "controller", "remote-mvc-ctl", *args, timeout=timeout,
            check=check,
        )

    def ctl_json(self, *args: str, **kw: Any) -> Any:
        proc = self.ctl("--json", *args, **kw)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith(("{", "["))]
        assert lines, f"no JSON from remote-mvc-ctl {' '.join(args)}: {proc.stdout!r} {proc.stderr!r}"
        return json.loads(lines[-1])

    def snapshot(self, model: str = "model") -> dict[str, Any]:
        return self.ctl_json("--model", model, "query")

    def set(self, **values: Any) -> int:
        reply = self.ctl_json("set", *(f"{k}={v}" for k, v in values.items()))
        return int(reply["revision"])

    # viewers ---------------------------------------------------------------
    def viewer_state(self, container: str, model: str = MODEL) -> dict[str, Any] | None:
        """The last values a viewer logged for ``model`` (revision, values), or None."""
        seen = [
            r for r in self.logs(container) if r.get("event") == "values" and r.get("model", model) == model
        ]
        return seen[-1] if seen else None

    def wait_viewers_at(
        self,
        revision: int,
        values: dict[str, Any],
        containers: Iterable[str] | None = None,
        timeout: float = 60,
    ) -> list[dict[str, Any]]:
        """Every (given or running) viewer has logged ``values`` at ``revision`` or later."""
        ids = list(containers) if containers is not None else self.containers("viewer")
        assert ids, "no viewer containers"

        def probe() -> list[dict[str, Any]] | None:
            states = []
            for cid in ids:
                state = self.viewer_state(cid)
                if state is None or state.get("revision", -1) < revision:
                    return None
                if state.get("revision") == revision and any(
                    state["values"].get(k) != v for k, v in values.items()
                ):
                    raise AssertionError(f"viewer {cid[:12]} at revision {revision} has {state['values']}")
                states.append(state)
            return states

        return wait_until(
            probe, timeout=timeout, what=f"{len(ids)} viewer(s) to log revision {revision} with {values}"
        )

    # prometheus ------------------------------------------------------------
    def prometheus_url(self) -> str:
        port = self.compose("port", "prometheus", "9090").stdout.strip().splitlines()[-1]
        host, _, number = port.rpartition(":")
        if host in ("0.0.0.0", "", "::", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{number}"

    def prom(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus_url()}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        assert body.get("status") == "success", body
        return body["data"]["result"]

    def prom_value(self, expr: str) -> float | None:
        result = self.prom(expr)
        return float(result[0]["value"][1]) if result else None
