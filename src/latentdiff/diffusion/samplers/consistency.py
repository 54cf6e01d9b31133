"""Latent consistency models (Luo et al. 2023, "Latent Consistency Models"): the multistep consistency sampler and
the pieces its distillation (`training.lcm_trainer`) shares with it.

A consistency model f(x_t, t) maps any point of a probability-flow ODE trajectory to its origin. LCM parametrises
it over a diffusion UNet so that f(x, 0) = x holds by construction (the boundary condition, their eq. 9):

    f(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred(x_t, t)
    c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2),   c_out(t) = s t / sqrt((s t)^2 + sigma_data^2)

with sigma_data = 0.5 and s = `timestep_scaling` (10 in the LCM code: c_skip is ~0 already at t = 19, so f is
the model's x0 prediction everywhere but at the boundary). The model is distilled on the "skipping-step" grid
t = k - 1, 2k - 1, ..., T - 1 (k = T // original_inference_steps, 50 steps: 19, 39, ..., 999); the sampler walks
N of those timesteps, evenly spaced in index from T - 1 (N = 4: 999, 759, 499, 259), and between steps noises the
denoised estimate forward to the next timestep with fresh noise (their Algorithm 3):

    x_{i+1} = sqrt(abar_{t_{i+1}}) f(x_i, t_i) + sqrt(1 - abar_{t_{i+1}}) z,   z ~ N(0, I)

The last step returns f itself. diffusers: LCMScheduler (original_inference_steps, timestep_scaling).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ...errors import ConfigError, InputError
from ...registry import SAMPLERS
from ..noise_scheduler import NoiseScheduler
from ..schedules import model_output_to_x0_eps
from .base import (
    Denoiser,
    Generator,
    NoiseSampler,
    StepCallback,
    after_step,
    as_step_callback,
    check_sample_call,
    check_start_step,
    noise_sampler_from,
    progress_range,
)
from .discrete import Sampler, SamplingPlan
from .discrete_loops import check_plan
from .grids import consistency_timesteps

SIGMA_DATA = 0.5          # the data's standard deviation the boundary scalings assume (LCM, after EDM)


def skipping_timesteps(num_train_timesteps: int, original_inference_steps: int) -> list[int]:
    """The distillation grid, ascending: k - 1, 2k - 1, ..., with k = T // original_steps (the skipping step of
    LCM, sec. 4.3): T = 1000, 50 steps -> 19, 39, ..., 999."""
    if not 1 <= original_inference_steps <= num_train_timesteps:
        raise ConfigError("original_inference_steps must lie in [1, num_train_timesteps]",
                          where="original_inference_steps", expected=f"1 .. {num_train_timesteps}",
                          found=original_inference_steps)
    k = num_train_timesteps // original_inference_steps
    return [i * k - 1 for i in range(1, original_inference_steps + 1)]


def lcm_timesteps(num_train_timesteps: int, num_inference_steps: int, original_inference_steps: int) -> list[int]:
    """N timesteps of the skipping grid, descending: `grids.consistency_timesteps` (LCM's and TCD's one grid)."""
    return consistency_timesteps(num_train_timesteps, num_inference_steps,
                                 original_inference_steps=original_inference_steps).tolist()


def consistency_scalings(t: float | torch.Tensor, *, timestep_scaling: float = 10.0,
                         sigma_data: float = SIGMA_DATA) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """(c_skip, c_out) of the boundary condition at timestep t (a number, or a tensor of per-sample timesteps)."""
    scaled = t * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_denoised(model_output: torch.Tensor, x_t: torch.Tensor, t: float | torch.Tensor,
                         abar_t: float | torch.Tensor, prediction_type: str, *,
                         timestep_scaling: float = 10.0) -> torch.Tensor:
    """f(x_t, t) = c_skip x_t + c_out x0_pred: the consistency function over a UNet's raw prediction (eq. 9).
    t, abar_t: numbers, or tensors broadcastable to x_t (B, 1, 1, 1) for per-sample timesteps."""
    x0_pred, _ = model_output_to_x0_eps(model_output, x_t, abar_t, prediction_type)
    c_skip, c_out = consistency_scalings(t, timestep_scaling=timestep_scaling)
    return c_skip * x_t + c_out * x0_pred


def sample_lcm(denoise: Denoiser, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: Sequence[float], *,
               prediction_type: str = "epsilon", timestep_scaling: float = 10.0,
               clip_sample_range: float | None = None, noise_sampler: NoiseSampler | None = None,
               callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
    """Multistep consistency sampling (Luo et al. 2023, Algorithm 3) from x = x_T (B, C, H, W).

    timesteps: t_1 > ... > t_N; alphas_cumprod: abar(t_1) .. abar(t_N) and one more (unused: the last step returns
    the denoised sample). Between steps, fresh noise from `noise_sampler(x)` (default: the global RNG).
    `clip_sample_range` clamps x0_pred before the boundary condition, as diffusers' clip_sample does.
    """
    check_plan(timesteps, alphas_cumprod)
    callback = as_step_callback(callback)
    sample_noise: NoiseSampler = noise_sampler or torch.randn_like
    ts = torch.tensor(list(timesteps), dtype=torch.long, device=x.device)
    last = len(timesteps) - 1
    for i in progress_range(len(timesteps), progress):
        t, abar_t = int(timesteps[i]), alphas_cumprod[i]
        x0_pred, _ = model_output_to_x0_eps(denoise(x, ts[i]), x, abar_t, prediction_type)
        if clip_sample_range is not None:
            x0_pred = x0_pred.clamp(-clip_sample_range, clip_sample_range)
        c_skip, c_out = consistency_scalings(float(t), timestep_scaling=timestep_scaling)
        denoised = c_out * x0_pred + c_skip * x
        if i < last:
            abar_next = alphas_cumprod[i + 1]
            x = abar_next**0.5 * denoised + (1 - abar_next) ** 0.5 * sample_noise(x)
        else:
            x = denoised
        x = after_step(callback, x, i, t, denoised)
    return x


@SAMPLERS.register("lcm")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LCMSampler(Sampler):
    """The LCM multistep sampler (diffusers' LCMScheduler): a consistency-distilled model (an LCM, or a model with
    an LCM-LoRA) in 2-8 steps, without guidance (guidance_scale 1: one UNet pass per step). timestep_spacing and
    steps_offset are kept for the scheduler files that carry them and not used: the grid is LCM's own."""

    original_inference_steps: int = 50     # the distillation grid's size (the skipping step k = T // this)
    timestep_scaling: float = 10.0         # s of the boundary scalings c_skip, c_out

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.original_inference_steps, int) or self.original_inference_steps < 1:
            raise ConfigError("original_inference_steps must be a positive int", where="original_inference_steps",
                              expected=">= 1", found=self.original_inference_steps)
        if not self.timestep_scaling > 0 or self.timestep_scaling == float("inf"):
            raise ConfigError("timestep_scaling must be a finite number > 0", where="timestep_scaling",
                              expected="> 0", found=self.timestep_scaling)

    def plan(self, noise_scheduler: NoiseScheduler, num_inference_steps: int, *,
             start_step: int = 0) -> SamplingPlan:
        """The LCM timesteps and their abar, started at `start_step` of the N-step plan; the last abar entry is
        abar_0 (the state after the last step is the clean sample's neighbourhood; `sample` returns f there)."""
        if not isinstance(noise_scheduler, NoiseScheduler):
            raise InputError("a NoiseScheduler is needed", where="noise_scheduler", expected="NoiseScheduler",
                             found=type(noise_scheduler).__name__)
        timesteps = lcm_timesteps(noise_scheduler.num_train_timesteps, num_inference_steps,
                                  self.original_inference_steps)
        s = check_start_step(start_step, len(timesteps))
        abar = noise_scheduler.alphas_cumprod[timesteps[s:]].tolist()
        return SamplingPlan(timesteps[s:], abar + [1.0], s)

    def sample(self, denoise: Denoiser, x_T: torch.Tensor, noise_scheduler: NoiseScheduler,
               num_inference_steps: int, *, start_step: int = 0, generator: Generator = None,
               callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
        """x_T (B, C, H, W) -> x_0 in `num_inference_steps` consistency steps; arguments as DDIMSampler.sample.
        The noise between steps is drawn per sample from `generator` (one, or one per sample), as diffusers'."""
        check_sample_call(denoise, x_T, generator, callback)
        plan = self.plan(noise_scheduler, num_inference_steps, start_step=start_step)
        return sample_lcm(denoise, x_T, plan.timesteps, plan.alphas_cumprod,
                          prediction_type=noise_scheduler.config.prediction_type,
                          timestep_scaling=self.timestep_scaling, clip_sample_range=self._clip,
                          noise_sampler=noise_sampler_from(generator), callback=callback, progress=progress)


__all__ = ["LCMSampler", "sample_lcm", "lcm_timesteps", "skipping_timesteps", "consistency_scalings",
           "consistency_denoised", "SIGMA_DATA"]
