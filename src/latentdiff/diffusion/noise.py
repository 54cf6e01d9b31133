"""Gaussian noise drawn reproducibly: per sample, on the generator's device, then moved.

Drawing on the generator's device (the CPU unless the caller passes a CUDA generator) makes a seed give
the same noise on CPU and GPU; with one generator per sample, each sample is drawn from its own, so image i
of a batch equals the same seed alone. With a single generator the whole batch is one draw, as diffusers
draws it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch

from ..errors import InputError


def randn(shape: Sequence[int], *, generator: torch.Generator | Sequence[torch.Generator] | None = None,
          dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise of `shape` (B, ...). `generator`: one, one per sample, or None (global RNG)."""
    shape = tuple(shape)
    batch = shape[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise InputError("one generator per sample is needed", where="generator",
                             expected=f"a list of {batch} generators", found=f"a list of {len(generator)}")
        samples = [torch.randn((1, *shape[1:]), generator=g, dtype=dtype, device=g.device) for g in generator]
        return torch.cat(samples).to(device)
    # One generator: one draw for the whole batch (as diffusers draws it, so the same seed gives the same image).
    one = cast("torch.Generator | None", generator)    # not a list or tuple: one generator, or None
    source = one.device if one is not None else "cpu"
    return torch.randn(shape, generator=one, dtype=dtype, device=source).to(device)
