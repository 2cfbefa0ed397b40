"""Fixtures for the end-to-end tests: real images, a real compose stack.

* No Docker engine (or no compose v2 plugin, or no testcontainers): every test here is
  skipped with the reason -- except under ``CI=true``, where that is a failure.
* ``e2e_images`` (session): fills build/wheelhouse, picks the base image
  (docker/base-image.sh: python:3.11-slim or the local debootstrap base) and builds the
  images once, tagged ``:e2e`` so a developer's ``make up`` images are left alone.
  ``E2E_REUSE_IMAGES=1`` skips the build when the ``:e2e`` images exist.
* ``stack`` (session): one compose project with a unique name and 3 viewer replicas,
  shared by the tests in their file order; torn down completely afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Ryuk (testcontainers' reaper container) needs a registry image; teardown is explicit instead.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

from e2e_stack import REPO, Stack, clean_env, log, once_per_session, sh  # noqa: E402

# E2E_TAG lets several checkouts test side by side on one engine without sharing images
E2E_TAG = os.environ.get("E2E_TAG", "e2e")
REMOTE_MVC_IMAGE = f"remote-mvc:{E2E_TAG}"
PROMETHEUS_IMAGE = f"remote-mvc/prometheus:{E2E_TAG}"
ALERTMANAGER_IMAGE = f"remote-mvc/alertmanager:{E2E_TAG}"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _docker_problem() -> str | None:
    try:
        import testcontainers.compose  # noqa: F401
    except ImportError as exc:
        return f"the testcontainers package is not installed ({exc})"
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return "`docker info` timed out"
    if info.returncode != 0 or not info.stdout.strip():
        return f"no Docker engine reachable ({(info.stderr or info.stdout).strip()[:300]})"
    comp = subprocess.run(
        ["docker", "compose", "version", "--short"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    if comp.returncode != 0:
        return "the docker compose v2 plugin is missing"
    return None


@pytest.fixture(scope="session", autouse=True)
def docker_engine() -> None:
    problem = _docker_problem()
    if problem:
        msg = f"e2e tests need Docker with compose v2: {problem}. Run `make docker-engine` (.ci/install-docker.sh)."
        if _in_ci():
            pytest.fail(f"{msg} [CI=true: failing instead of skipping]", pytrace=False)
        pytest.skip(msg)


def _image_exists(ref: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
@once_per_session  # shared with tests/chaos: one build per pytest run
def e2e_images(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Build the images once per session; returns the compose variables that select them."""
    variables = {
        "REMOTE_MVC_IMAGE": REMOTE_MVC_IMAGE,
        "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
        "ALERTMANAGER_IMAGE": ALERTMANAGER_IMAGE,
        # every project its own free host port: stacks of several checkouts run side by side
        "ALERTMANAGER_PORT": "",
        "ALERTMANAGER_BIND": "127.0.0.1",
    }
    reuse = (
        os.environ.get("E2E_REUSE_IMAGES") == "1"
        and _image_exists(REMOTE_MVC_IMAGE)
        and _image_exists(PROMETHEUS_IMAGE)
        and _image_exists(ALERTMANAGER_IMAGE)
    )
    started = time.monotonic()
    if reuse:
        variables["BASE_IMAGE"] = "unused"
        log("E2E_REUSE_IMAGES=1: using the existing :e2e images")
        return variables
    log("filling build/wheelhouse")
    sh(
        ["bash", "docker/wheelhouse.sh", "build/wheelhouse"],
        env=clean_env({"PYTHON": sys.executable}),
        timeout=600,
    )
    log("choosing/building the base image (first run: debootstrap, ~1-3 min)")
    base = sh(["bash", "docker/base-image.sh"], timeout=1200).stdout.strip().splitlines()[-1]
    variables["BASE_IMAGE"] = base
    log(f"building images on {base}")
    builder = Stack(f"mvce2ebuild{uuid.uuid4().hex[:6]}", variables, tmp_path_factory.mktemp("env"))
    builder.compose("build", timeout=1200)
    builder.env_file.unlink(missing_ok=True)
    log(f"images ready in {time.monotonic() - started:.0f}s")
    return variables


@pytest.fixture(scope="session")
def stack(e2e_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """The whole stack: nameserver, model, ticker, 3 viewers, Prometheus (ephemeral host port)."""
    variables = {
        **e2e_images,
        "VIEWERS": "3",
        "PROMETHEUS_PORT": "",
        "PROMETHEUS_BIND": "127.0.0.1",
        "GATEWAY_PORT": "",  # an ephemeral host port for the web gateway
        "GATEWAY_BIND": "127.0.0.1",
        "MVC_LEASE_SECONDS": "6",
        "MVC_TICKER_INTERVAL": "0.5",
    }
    s = Stack(f"mvce2e{uuid.uuid4().hex[:8]}", variables, tmp_path_factory.mktemp("env"))
    try:
        with s.running():
            yield s
    finally:
        left = s.leftovers()
        if any(left.values()):
            print(f"WARNING: left behind by {s.project}: {left}", file=sys.stderr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """On a failing e2e test, attach the stack's recent logs to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "stack" in getattr(item, "funcargs", {}):
        try:
            report.sections.append(("compose logs (tail)", item.funcargs["stack"].dump_logs(40)))
        except Exception as exc:  # noqa: BLE001
            report.sections.append(("compose logs", f"unavailable: {exc}"))


__all__ = ["REPO"]
