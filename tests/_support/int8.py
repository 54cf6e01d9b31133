"""What int8-static calibration observes, written out in the tests: each candidate layer's input range over the
calibration prompts run one at a time as `cpu_paths.quantize(..., calibration_steps=2)` runs them."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from latentdiff.layers import int8


def observed_ranges(pipe: Any, prompts: Sequence[str], *, steps: int = 2, **extra: Any
                    ) -> dict[str, tuple[float, float]]:
    """The [min, max] of every int8 candidate layer's input of `pipe`'s UNet over `prompts` (each at seed 0,
    `steps` steps, latents out), with `extra` arguments in every call."""
    with int8.observe_input_ranges(int8.int8_candidates(pipe.unet)) as ranges:
        for prompt in prompts:
            pipe(prompt, num_inference_steps=steps, output_type="latent", progress=False,
                 generator=torch.Generator().manual_seed(0), **extra)
    return ranges
