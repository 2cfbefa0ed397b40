"""Fixtures for the chaos tests: real faults injected into the running compose stack.

* Reuses tests/e2e: its ``Stack`` (via chaos_kit.ChaosStack), its ``docker_engine`` check
  (no Docker: skip, except under ``CI=true``: fail) and its ``e2e_images`` fixture, which
  builds the images once per pytest run however many suites use it (``E2E_REUSE_IMAGES=1``
  reuses existing ``:e2e`` images).
* ``figures``: a dict a test fills with what it measured; at the end of the run the results
  go to tests/chaos/results.json and docs/reliability.md (tests/chaos/reliability.py), and a
  summary is printed.
* Markers: ``chaos`` (every test here), ``soak`` (the soak), plus ``e2e`` and ``slow``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
E2E = HERE.parent / "e2e"
for _path in (str(E2E), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")


def _e2e_conftest() -> Any:
    """tests/e2e/conftest.py as a module of its own (pytest imports it as `conftest` only when
    it collects tests/e2e)."""
    name = "remote_mvc_e2e_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, E2E / "conftest.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_e2e = _e2e_conftest()
docker_engine = _e2e.docker_engine  # autouse: no Docker -> skip, or fail under CI=true
e2e_images = _e2e.e2e_images  # once per pytest run, shared with tests/e2e

import reliability  # noqa: E402

FIGURES = pytest.StashKey[dict]()
RESULTS = pytest.StashKey[dict]()
SPAN = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: fault injection into the running compose stack (tests/chaos)")
    config.addinivalue_line("markers", "soak: the bounded soak (SOAK_SECONDS, default 150)")
    config.stash[RESULTS] = {}
    config.stash[SPAN] = []


@pytest.fixture(scope="session")
def chaos_env_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chaos-env")


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    """What the test measured; goes into docs/reliability.md, passed or failed."""
    found: dict[str, Any] = {}
    request.node.stash[FIGURES] = found
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = (yield).get_result()
    if item.get_closest_marker("chaos") is None:
        return
    item.config.stash[SPAN].extend([call.start, call.stop])
    if report.when == "call":
        if report.failed:
            for value in getattr(item, "funcargs", {}).values():
                if hasattr(value, "dump_logs"):
                    try:
                        report.sections.append(("compose logs (tail)", value.dump_logs(40)))
                    except Exception as exc:  # noqa: BLE001
                        report.sections.append(("compose logs", f"unavailable: {exc}"))
                    break
        xfailed = getattr(report, "wasxfail", None)
        if report.skipped and not xfailed:
            return
        failure = None
        if report.failed:
            failure = str(getattr(call.excinfo, "value", "") or report.longreprtext.splitlines()[-1:])
        result = "passed" if report.passed else "failed"
        if xfailed is not None and report.skipped:
            result, failure = "xfailed (known library defect)", str(xfailed or call.excinfo.value)
        item.config.stash[RESULTS][item.name] = {
            "outcome": result,
            "duration_s": round(call.stop - call.start, 1),
            "failure": failure,
            "figures": item.stash.get(FIGURES, {}),
        }


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    results = session.config.stash.get(RESULTS, {})
    span = session.config.stash.get(SPAN, [])
    if not results:
        return
    wall = (max(span) - min(span)) if span else 0.0
    reliability.update(results, wall)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(RESULTS, {})
    if not results:
        return
    span = config.stash.get(SPAN, [])
    tr = terminalreporter
    tr.section("remote-mvc chaos figures (also in docs/reliability.md)")
    for name, res in results.items():
        tr.write_line(f"{name}: {res['outcome']} in {res['duration_s']} s")
        for key, value in reliability.figure_rows(res.get("figures") or {}):
            tr.write_line(f"    {key}: {value}")
    if span:
        tr.write_line(f"chaos wall time (stacks included): {max(span) - min(span):.0f} s")
    from chaos_kit import DOCKER_QUIRKS

    for quirk in DOCKER_QUIRKS:
        tr.write_line(f"Docker quirk (not a test failure): {quirk}")
