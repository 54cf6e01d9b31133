"""Gaussian noise drawn reproducibly: per sample, on the generator's device, then moved.

Drawing on the generator's device (the CPU unless the caller passes a CUDA generator) makes a seed give
the same noise on CPU and GPU; drawing each sample separately makes image i of a batch equal to the same
seed alone when one generator per sample is given.
"""
from __future__ import annotations

from typing import Sequence

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
        gens = list(generator)
    else:
        gens = [generator] * batch
    samples = [torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32,
                           device=g.device if g is not None else "cpu") for g in gens]
    return torch.cat(samples).to(device=device, dtype=dtype)
