"""TCD, the sampler of trajectory-consistency-distilled models (Zheng et al. 2024, "Trajectory Consistency
Distillation", sec. 4.4 "strategic stochastic sampling"): its pure loop on alphas_cumprod and `TCDSampler`.

    sampler = TCDSampler(eta=0.3)                 # gamma of the paper; 0: deterministic, 1: LCM-like
    x_0 = sampler.sample(denoise, x_T, noise_scheduler, 4, generator=torch.Generator().manual_seed(0))

A TCD model (a TCD-LoRA, or an LCM) predicts, from x_t, a point of the probability-flow trajectory at any earlier
time s, not only x0. Each step goes from t to the next timestep t' in two moves: the model's prediction carried to
s = floor((1 - gamma) t') by the forward-process form x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps (the x0 and eps
of one model output: the deterministic DDIM move from t to s), then fresh noise from s forward to t',
x_t' = sqrt(abar_t' / abar_s) x_s + sqrt(1 - abar_t' / abar_s) z (the forward process between two noise levels).
gamma = 0 makes s = t' (DDIM on the distilled grid), gamma = 1 makes s = 0 (x0, then noise: a consistency model's
multistep sampling). The last step returns x_s, with s = 0: no noise is added.

The timesteps are the distillation grid's (`grids.consistency_timesteps`, as diffusers' TCDScheduler and
LCMScheduler select them): `timestep_spacing` and `steps_offset` (kept for `from_config`) do not move them.
Started part-way (`start_step`), the sampler runs the tail of its N-step plan, as every latentdiff sampler;
diffusers' TCD img2img instead shortens the distillation grid by its `strength` first.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ...errors import ConfigError, InputError, describe
from ...registry import SAMPLERS
from ..noise_scheduler import NoiseScheduler
from ..schedules import model_output_to_x0_eps
from .base import (
    Denoiser,
    Generator,
    NoiseSampler,
    SamplerSettings,
    StepCallback,
    after_step,
    as_step_callback,
    check_sample_call,
    check_start_step,
    noise_sampler_from,
    progress_range,
)
from .discrete import SamplingPlan
from .grids import consistency_timesteps


def tcd_step(x0_pred: torch.Tensor, eps: torch.Tensor, abar_s: float, abar_next: float, *,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """One TCD step from the model's (x0_pred, eps) at t: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps, then (with
    `noise`) forward to t': sqrt(abar_next / abar_s) x_s + sqrt(1 - abar_next / abar_s) z (Zheng et al. 2024,
    eq. 20 / Algorithm 4). x0_pred, eps, noise: (B, C, H, W)."""
    x_s = abar_s**0.5 * x0_pred + (1 - abar_s) ** 0.5 * eps
    if noise is None:
        return x_s
    ratio = abar_next / abar_s
    return ratio**0.5 * x_s + max(1 - ratio, 0.0) ** 0.5 * noise


def sample_tcd(denoise: Denoiser, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: Sequence[float],
               s_alphas_cumprod: Sequence[float], *, prediction_type: str = "epsilon", eta: float = 0.3,
               noise_sampler: NoiseSampler | None = None, callback: StepCallback | None = None,
               progress: bool = False) -> torch.Tensor:
    """TCD sampling from x = x_T (B, C, H, W): `timesteps` t_1 > ... > t_N, `alphas_cumprod` abar(t_1) .. abar(t_N)
    and abar(0) (N + 1), `s_alphas_cumprod` abar(s_i), s_i = floor((1 - eta) t_{i+1}) (N). Noise z from
    `noise_sampler(x)` at every step but the last when eta > 0. callback(i, t_i, x, denoised) as `sample_ddim`'s."""
    if len(timesteps) < 1 or len(alphas_cumprod) != len(timesteps) + 1 or len(s_alphas_cumprod) != len(timesteps):
        raise InputError("a TCD plan needs N timesteps, N + 1 alphas_cumprod and N s_alphas_cumprod values",
                         where="alphas_cumprod", expected=f"{len(timesteps) + 1} and {len(timesteps)} values",
                         found=f"{len(alphas_cumprod)} and {len(s_alphas_cumprod)}")
    callback = as_step_callback(callback)
    sample_noise: NoiseSampler = noise_sampler or torch.randn_like
    ts = torch.tensor(list(timesteps), dtype=torch.long, device=x.device)
    last = len(timesteps) - 1
    for i in progress_range(len(timesteps), progress):
        x0_pred, eps = model_output_to_x0_eps(denoise(x, ts[i]), x, alphas_cumprod[i], prediction_type)
        noise = sample_noise(x) if eta > 0 and i < last else None
        x = tcd_step(x0_pred, eps, s_alphas_cumprod[i], alphas_cumprod[i + 1], noise=noise)
        x = after_step(callback, x, i, int(timesteps[i]), x0_pred)
    return x


@SAMPLERS.register("tcd")
@dataclasses.dataclass(frozen=True, kw_only=True)
class TCDSampler(SamplerSettings):
    """TCD (Zheng et al. 2024) for TCD- or LCM-distilled models. diffusers: TCDScheduler (its `step(eta=0.3)`)."""

    eta: float = 0.3                       # gamma: the stochasticity of each step (0 deterministic, 1 LCM-like)
    original_inference_steps: int = 50     # the distillation grid's number of timesteps

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError("eta (gamma) must lie in [0, 1]", where="eta", expected="0 <= eta <= 1", found=self.eta)
        if self.original_inference_steps < 1:
            raise ConfigError("original_inference_steps must be >= 1", where="original_inference_steps",
                              expected=">= 1", found=self.original_inference_steps)

    def timesteps(self, noise_scheduler: NoiseScheduler, num_inference_steps: int) -> torch.Tensor:
        """The N timesteps visited, descending: (N,) int64 on the CPU."""
        return torch.tensor(self.plan(noise_scheduler, num_inference_steps).timesteps, dtype=torch.long)

    def plan(self, noise_scheduler: NoiseScheduler, num_inference_steps: int, *,
             start_step: int = 0) -> SamplingPlan:
        """Timesteps and abar values (the last: abar(0), where TCD ends) of steps start_step .. N-1."""
        if not isinstance(noise_scheduler, NoiseScheduler):
            raise InputError("a NoiseScheduler is needed", where="noise_scheduler", expected="NoiseScheduler",
                             found=describe(noise_scheduler))
        timesteps = consistency_timesteps(noise_scheduler.num_train_timesteps, num_inference_steps,
                                          original_inference_steps=self.original_inference_steps).tolist()
        s = check_start_step(start_step, len(timesteps))
        abar = noise_scheduler.alphas_cumprod[timesteps[s:] + [0]].tolist()
        return SamplingPlan(timesteps[s:], abar, s)

    def s_alphas_cumprod(self, noise_scheduler: NoiseScheduler, plan: SamplingPlan) -> list[float]:
        """abar(s_i), s_i = floor((1 - eta) t_{i+1}) (t_{N+1} = 0), in float32 as diffusers computes s."""
        following = torch.tensor(plan.timesteps[1:] + [0], dtype=torch.long)
        s = torch.floor((1 - self.eta) * following).to(torch.long)
        return noise_scheduler.alphas_cumprod[s].tolist()

    def sample(self, denoise: Denoiser, x_T: torch.Tensor, noise_scheduler: NoiseScheduler,
               num_inference_steps: int, *, start_step: int = 0, generator: Generator = None,
               callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
        """x_T (B, C, H, W) -> x_0 in N - start_step TCD steps; arguments as DDIMSampler.sample (noise per sample
        from `generator` when eta > 0)."""
        check_sample_call(denoise, x_T, generator, callback)
        plan = self.plan(noise_scheduler, num_inference_steps, start_step=start_step)
        return sample_tcd(denoise, x_T, plan.timesteps, plan.alphas_cumprod,
                          self.s_alphas_cumprod(noise_scheduler, plan),
                          prediction_type=noise_scheduler.config.prediction_type, eta=self.eta,
                          noise_sampler=noise_sampler_from(generator), callback=callback, progress=progress)
