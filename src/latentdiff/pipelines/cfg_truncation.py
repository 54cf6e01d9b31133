"""CFG truncation: classifier-free guidance for the first fraction of the steps only, then the conditional model
alone, one UNet pass of batch B per step instead of one of 2B.

    image = pipe("a red circle", guidance_scale=7.5, num_inference_steps=20, cfg_truncation=0.5).images[0]

The late steps of a run refine details the guidance has already decided; dropping the unconditional pass there
halves their cost (a trade measured in benchmarks/RESULTS.md). `cfg_truncation` is the fraction of the steps run
with guidance: step i of the N steps run (an image-to-image run counts its own steps, as control ranges do) is
guided when (i + 1) / N <= fraction, the rule of ControlNet's `control_guidance_end` (`control.in_range`): 0.5 of
25 steps guides 12. None or 1.0: every step guided (the default); 0.0: none. Without guidance (guidance_scale
<= 1: no unconditional context) every step is one conditional pass already and truncation changes nothing.

Which step is it: counted by the step callback, never read from t (samplers such as Heun evaluate the model
several times per step, at timesteps off the plan's grid): the wrapper is a `StepCounting`, whose
`counting(callback)` advances it, as `control.Controlled`'s does.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..config import is_real
from ..diffusion.samplers.base import Denoiser, StepCounting
from ..errors import InputError
from .control import in_range
from .prompt_encoding import PromptSchedule


def check_cfg_truncation(value: Any) -> float | None:
    """None, or a fraction in [0, 1] (an InputError naming cfg_truncation otherwise)."""
    if value is None:
        return None
    if not is_real(value) or not 0.0 <= float(value) <= 1.0:
        raise InputError("cfg_truncation must be a fraction of the steps in [0, 1], or None", where="cfg_truncation",
                         expected="0 <= cfg_truncation <= 1 (0.5: guidance for the first half of the steps)",
                         found=repr(value))
    return float(value)


class TruncatedGuidance(StepCounting):
    """denoise(x_t, t): `guided` at the steps of the run's first `fraction` (module docstring), `conditional`
    after. `step` is the 0-based step of the run the next call belongs to; `counting(callback)` wraps the
    sampler's step callback to advance it. The state of one run: build one per call."""

    def __init__(self, guided: Denoiser, conditional: Denoiser, *, steps: int, fraction: float):
        self.guided, self.conditional, self.steps, self.fraction = guided, conditional, steps, fraction
        self.step = 0

    def is_guided(self, step: int) -> bool:
        return in_range(step, self.steps, 0.0, self.fraction)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (self.guided if self.is_guided(self.step) else self.conditional)(x_t, t)


def conditional_of_schedule(model: Callable[..., torch.Tensor], schedule: PromptSchedule) -> Denoiser:
    """The conditional model of a `PromptSchedule` (A1111's per-step prompts) at its current step. Composable
    prompts (AND: several sub-prompts combined through the unconditional prediction) have no conditional-only
    form: an InputError, before sampling."""
    if any(len(conds) > 1 for conds in schedule.conds):
        raise InputError("cfg_truncation cannot drop the guidance of a prompt with AND (composable diffusion combines "
                         "its sub-prompts through the unconditional prediction)", where="cfg_truncation",
                         expected="cfg_truncation=None with AND in the prompt", found="a prompt with AND")

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r = schedule.range_of(schedule.step)
        return model(x_t, t, context=schedule.conds[r][0], **schedule.added(r, 0, guided=False))

    return denoise
