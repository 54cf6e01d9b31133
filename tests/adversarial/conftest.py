"""The hardening suite: what an attacker or a careless user does, one case per test.

Every case carries `@pytest.mark.outcome(kind)`: `"correct"` (the input is fine after all and the result is
right) or `"clear_error"` (a latentdiff exception naming the file / key / argument). The terminal summary of a
run counts the cases by outcome, plus the four classes that must stay at zero: a case whose test fails is counted
under the class its marker names as the failure (`fails_as=`: "unclear", "crash", "data_loss", "security").
"""
from __future__ import annotations

from collections import Counter

import pytest

KINDS = ("correct", "clear_error")
FAILURE_CLASSES = ("unclear", "crash", "data_loss", "security")
_counts: Counter[str] = Counter()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "outcome(kind, fails_as='unclear'): hardening case; kind 'correct' or 'clear_error'; fails_as "
        "is the class a failure of this case counts as (unclear, crash, data_loss, security)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/adversarial/" not in item.nodeid.replace("\\", "/") or item.name.startswith("test_suite_"):
            continue
        marker = item.get_closest_marker("outcome")
        if marker is None or marker.args[0] not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: every hardening case needs @pytest.mark.outcome(kind), kind "
                                    f"one of {KINDS}")
        fails_as = marker.kwargs.get("fails_as", "unclear")
        if fails_as not in FAILURE_CLASSES:
            raise pytest.UsageError(f"{item.nodeid}: fails_as must be one of {FAILURE_CLASSES}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("outcome")
    if marker is None or report.when != "call":
        return
    if report.passed:
        _counts[marker.args[0]] += 1
    elif report.failed:
        _counts[marker.kwargs.get("fails_as", "unclear")] += 1


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not _counts:
        return
    line = ", ".join(f"{kind} {_counts.get(kind, 0)}" for kind in (*KINDS, *FAILURE_CLASSES))
    terminalreporter.write_sep("-", "hardening cases by outcome")
    terminalreporter.write_line(line)
