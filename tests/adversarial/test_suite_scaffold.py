"""The hardening suite's own tools: the bounded runner catches a runaway allocation and reports our errors."""
from __future__ import annotations

from tests._support.bounded import run_bounded


def test_suite_bounded_run_reports_a_latentdiff_error_and_its_peak_rss():
    result = run_bounded("from latentdiff.errors import InputError\nraise InputError('x', where='arg')")
    assert result.raised == "InputError" and result.is_latentdiff_error and "where: arg" in result.message
    assert 0 < result.peak_rss_mb < 500


def test_suite_bounded_run_stops_a_runaway_allocation():
    result = run_bounded("b = bytearray(3 * 1024**3)", address_space_gb=2)
    assert result.raised == "MemoryError" and not result.is_latentdiff_error
