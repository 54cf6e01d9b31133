"""Starting the reverse process part-way: the `strength` of image-to-image and inpainting.

SDEdit (Meng et al. 2022, "Guided image synthesis and editing with stochastic differential
equations"): noise the image latent z_0 to an intermediate time t_0 with the forward process,

    x_{t0} = sqrt(abar_{t0}) z_0 + sqrt(1 - abar_{t0}) eps,                  (Ho et al. 2020, eq. 4)

then run the reverse process from t_0 instead of T. With the N-step plan t_1 > ... > t_N of a sampler,
`strength` s in [0, 1] keeps the last int(N s) steps (diffusers' `get_timesteps`, so the same
arguments visit the same timesteps): s = 1 runs every step, small s changes the image little.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable

import torch

from ..diffusion.noise_scheduler import NoiseScheduler
from ..diffusion.samplers import DDIMSampler, DDPMSampler
from ..diffusion.sampling import (Denoiser, Generator, check_generator, noise_sampler_from, sample_ddim,
                                  sample_ddpm)
from ..errors import InputError


def check_strength(strength: Any) -> None:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= float(strength) <= 1.0:
        raise InputError("strength must be a number in [0, 1]", where="strength", expected="0 <= strength <= 1",
                         found=repr(strength))


def start_step(num_inference_steps: int, strength: float) -> int:
    """Index of the first step run: N - min(int(N * strength), N). At least one step must remain."""
    check_strength(strength)
    kept = min(int(num_inference_steps * strength), num_inference_steps)
    if kept < 1:
        raise InputError(f"strength {strength} with {num_inference_steps} steps leaves no denoising step to run",
                         where="strength",
                         expected=f"strength >= 1 / num_inference_steps = {1 / num_inference_steps:.3g}",
                         found=strength)
    return num_inference_steps - kept


# Samplers whose loops `sample_from_step` can start part-way (their plan is a list of integer timesteps).
PARTIAL_SAMPLERS = (DDIMSampler, DDPMSampler)


def check_sampler(sampler: Any, first: int) -> None:
    """An InputError, before any work, for a sampler that cannot start at step `first` of its plan."""
    if first > 0 and not isinstance(sampler, PARTIAL_SAMPLERS):
        raise InputError("this sampler cannot start part-way through its plan (strength < 1)", where="sampler",
                         expected=f"one of {[c.__name__ for c in PARTIAL_SAMPLERS]}, or strength=1.0",
                         found=type(sampler).__name__)


def start_timestep(sampler: Any, noise_scheduler: NoiseScheduler, num_inference_steps: int, first: int) -> int:
    """t_0: the training timestep of step `first` of the sampler's N-step plan, where the run starts."""
    t = float(sampler.plan(noise_scheduler, num_inference_steps).timesteps[first])
    if not t.is_integer():  # e.g. a Karras sigma grid: the forward process is defined at trained timesteps only
        raise InputError("this sampler's grid starts between trained timesteps, so the image cannot be noised to it",
                         where="sampler", expected="a sampler whose first timestep is an integer",
                         found=f"{type(sampler).__name__} starting at t = {t}")
    return int(t)


def sample_from_step(sampler: Any, denoise: Denoiser, x: torch.Tensor, noise_scheduler: NoiseScheduler,
                     num_inference_steps: int, *, first: int, generator: Generator = None,
                     callback: Callable[[int, int, torch.Tensor], None] | None = None,
                     progress: bool = False) -> torch.Tensor:
    """Run steps first .. N-1 of the sampler's N-step plan from x = x_{t_first} (B, C, h, w) to x_0.

    `first` = 0 is `sampler.sample` itself (any sampler). Otherwise the sampler's pure loop runs over the
    tail of its plan; the DDIM and DDPM samplers are supported (callback indices start at 0).
    """
    if first == 0:
        return sampler.sample(denoise, x, noise_scheduler, num_inference_steps, generator=generator,
                              callback=callback, progress=progress)
    check_sampler(sampler, first)
    plan = sampler.plan(noise_scheduler, num_inference_steps)
    timesteps, abar = plan.timesteps[first:], plan.alphas_cumprod[first:]
    check_generator(generator, x.shape[0])
    common = dict(prediction_type=noise_scheduler.config.prediction_type,
                  clip_sample_range=sampler.clip_sample_range if sampler.clip_sample else None,
                  noise_sampler=noise_sampler_from(generator), callback=callback, progress=progress)
    if isinstance(sampler, DDIMSampler):
        return sample_ddim(denoise, x, timesteps, abar, eta=sampler.eta, **common)
    return sample_ddpm(denoise, x, timesteps, abar, variance_type=sampler.variance_type, **common)
