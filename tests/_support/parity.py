"""The parity measure of the tests (the max relative error against a reference implementation), and the random
weights that let a parity test fail."""
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


def randomize(model: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Give zero-initialised parameters (diffusers zero-inits some output layers) random values, so
    a parity test compares real computations and can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random and non-zero (diffusers inits some biases to 0), at a scale that keeps
    activations O(1): weights ~ U with variance 1/fan_in, norm scales ~ 1 + U(-0.1, 0.1), biases ~ U(-0.1, 0.1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(-0.1, 0.1)
                if name.endswith("weight"):
                    p.add_(1.0)
            else:
                bound = (3.0 / p[0].numel()) ** 0.5
                p.uniform_(-bound, bound)
    return model
