"""Shared test utilities."""
from __future__ import annotations

import torch


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the parity measure used throughout the tests."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale)


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    err = max_rel_error(actual, expected)
    assert err <= tol, f"max relative error {err:.3e} > {tol:.0e}"
