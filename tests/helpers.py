"""Shared test utilities."""
from __future__ import annotations

from pathlib import Path

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


def make_hub_cache(cache_dir, repo_id: str, src_folder, *, commit: str = "0" * 40) -> Path:
    """Lay `src_folder` out as a huggingface_hub cache entry for `repo_id` (models--owner--name/...).

    Tests use it to prove that a Hub id loads from the local cache with HF_HUB_OFFLINE=1.
    """
    import shutil
    from pathlib import Path

    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(src_folder, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
