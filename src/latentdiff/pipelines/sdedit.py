"""Starting the reverse process part-way: the `strength` of image-to-image and inpainting.

SDEdit (Meng et al. 2022, "Guided image synthesis and editing with stochastic differential
equations"): noise the image latent z_0 to an intermediate time t_0 with the forward process,

    x_{t0} = sqrt(abar_{t0}) z_0 + sqrt(1 - abar_{t0}) eps,                  (Ho et al. 2020, eq. 4)

then run the reverse process from t_0 instead of T. With the N-step plan t_1 > ... > t_N of a sampler,
`strength` s in [0, 1] keeps the last int(N s) steps (diffusers' `get_timesteps`, so the same
arguments visit the same timesteps): s = 1 runs every step, small s changes the image little.

Every sampler starts part-way (`check_sampler`, from `diffusion.samplers`, refuses an object that cannot):
`sampler.noise_to_start` noises the latent so that the sampler's state starts
where the forward process puts it (x_{t0} above for DDIM / DDPM / PLMS; z_0 + sigma eps for the sigma-space
samplers, diffusers' Euler-family `add_noise`), and `sampler.sample(..., start_step=)` runs the tail of its
plan, so a pipeline never asks which sampler it has.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import is_real
from ..diffusion.noise_scheduler import NoiseScheduler
from ..diffusion.samplers import Denoiser, Generator, SamplerProtocol, StepCallback, check_sampler
from ..errors import InputError


def check_strength(strength: Any) -> None:
    if not is_real(strength) or not 0.0 <= float(strength) <= 1.0:
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


def sample_from_step(sampler: SamplerProtocol, denoise: Denoiser, x: torch.Tensor, noise_scheduler: NoiseScheduler,
                     num_inference_steps: int, *, first: int, generator: Generator = None,
                     callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
    """Run steps first .. N-1 of the sampler's N-step plan from x (B, C, h, w), made by the sampler's
    `noise_to_start(x0, noise, noise_scheduler, N, first)`, to x_0.

    `first` = 0 is a plain `sampler.sample` call (any sampler object); otherwise `sample(..., start_step=first)`,
    which every latentdiff sampler takes. Callback indices start at 0; a tensor the callback returns replaces x.
    """
    if first == 0:
        return sampler.sample(denoise, x, noise_scheduler, num_inference_steps, generator=generator,
                              callback=callback, progress=progress)
    check_sampler(sampler)
    return sampler.sample(denoise, x, noise_scheduler, num_inference_steps, start_step=first, generator=generator,
                          callback=callback, progress=progress)
