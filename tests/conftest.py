"""In CI (CI=true) a skipped test is a failed one: CI is where every test must run,
and a skip there (a service that did not start, a tool not installed) would pass the
run green without testing what it skipped. The helpers that skip elsewhere fail in
CI themselves (tests/storage/services.py: `unavailable`); this catches any other.
A strict xfail (a known departure, tests/unit/test_router_rules.py) is no skip."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.storage.services import in_ci


def _failed_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    _failed_in_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    _failed_in_ci(report)
    return report
