"""Shared test configuration: the remote_mvc testing kit is loaded as a pytest plugin.

One guard lives here: CPython 3.11 keeps the AST constructor's recursion depth in state shared by
every thread, so pytest parsing a test's source to show a failure, while a server thread in the
same process decodes a Pyro5 message (serpent is ``ast.literal_eval``), can raise ``SystemError:
AST constructor recursion depth mismatch`` (python/cpython#106905; seen in the cluster tests).
Unguarded, that turns one failing test into an INTERNALERROR that ends the whole session and hides
the failure. The guard formats the report again, and at worst reports the failure without its
traceback: the test still fails, and the others still run.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest
from _pytest.reports import TestReport


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, TestReport, TestReport]:
    try:
        return (yield)
    except SystemError as exc:
        error: SystemError = exc
    for _ in range(3):  # the race is momentary: formatting again almost always works
        try:
            return TestReport.from_item_and_call(item, call)
        except SystemError as exc:
            error = exc
    summary = call.excinfo.exconly() if call.excinfo is not None else "failed"
    return TestReport(item.nodeid, item.location, dict.fromkeys(item.keywords, 1), "failed",
                      f"{summary}\n(pytest could not format the traceback: {error})", call.when,
                      duration=call.duration, start=call.start, stop=call.stop)
