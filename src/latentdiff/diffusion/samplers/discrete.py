"""The discrete-time samplers (DDIM, DDPM, PLMS) as thin, immutable holders of settings over the pure loops in
`discrete_loops.py`.

    sampler = DDIMSampler(eta=0.0, timestep_spacing="leading", steps_offset=1)
    x_0 = sampler.sample(denoise, x_T, noise_scheduler, 50, generator=torch.Generator().manual_seed(0))

A sampler is a frozen dataclass (an unknown keyword is a TypeError, a bad value a ConfigError) with
no state between calls: two threads can share one, with different step counts. The noise schedule
comes from the NoiseScheduler passed to each call, so one sampler serves any model.

Step i goes from timesteps[i] to timesteps[i + 1], the next entry of the timestep list, and the last
step to the "final" abar. diffusers 0.42's DDIMScheduler.step instead takes prev_t = t - T // N. The
two agree for "leading" spacing (the grid's stride is T // N) and for "trailing" when N divides T.
They differ for "linspace" (N = 10: grid 999, 888, ..., 111, 0, diffusers steps 999 -> 899, 888 -> 788,
..., so each sample reaches a noise level 11 steps below the t the model is next called with) and
for "trailing" otherwise (N = 7: grid 999, 856, ..., 285, 142; diffusers steps 999 -> 857, ...,
285 -> 143, and 142 -> 0, i.e. to abar_0 instead of the final abar). DDPMScheduler uses the list, as here.
PLMSSampler steps along the list too; diffusers' PNDMScheduler takes the same stride as its DDIMScheduler.

PLMS combines eps, as the PNDM paper (eq. 12) and the latent diffusion repository do: every prediction is
turned into eps at its own (x_t, t) first. diffusers' PNDMScheduler combines the raw model outputs and
converts the mixture at the current step: the same for epsilon prediction; for v_prediction it differs,
and is not exact even for an exact denoiser (tests/diffusion/test_k_samplers.py). PLMS also takes "sample" prediction.

Every sampler can start part-way (image-to-image, inpainting): `sample(..., start_step=s)` runs steps
s .. N-1 of its N-step plan from the sample at step s, which `noise_to_start(x0, noise, ...)` makes with the
forward process, and multistep methods (PLMS) start with an empty history there. A callback may return a
tensor that replaces the sample (see `base.after_step`).

The sigma-space samplers (Euler, Euler ancestral, Heun, LMS, DPM-Solver++) are in `sigma.py`, with the same
interface (`base.SamplerProtocol`).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal, NamedTuple

import torch

from ...errors import ConfigError, InputError, describe
from ...registry import SAMPLERS
from ..noise_scheduler import NoiseScheduler
from .base import (
    Denoiser,
    Generator,
    SamplerSettings,
    StepCallback,
    check_sample_call,
    check_start_step,
    noise_sampler_from,
)
from .discrete_loops import sample_ddim, sample_ddpm, sample_plms
from .grids import timestep_grid


class SamplingPlan(NamedTuple):
    """The steps of one run: timesteps t_1 > ... > t_N, and abar(t_1) .. abar(t_N), abar_final (N + 1 floats).

    A plan started part-way holds the tail of the N-step plan from index `start_step`."""

    timesteps: list[int]
    alphas_cumprod: list[float]
    start_step: int = 0

    @property
    def init_scale(self) -> float:
        """The scale `sample` applies to its x: 1, these loops run on x_t itself."""
        return 1.0

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, k: int) -> torch.Tensor:
        """The forward process at the start of step k of this plan (k = len(timesteps): after the last step),
        in the loop's own scale: x_t = sqrt(abar_k) x0 + sqrt(1 - abar_k) noise (Ho et al. 2020, eq. 4).
        x0, noise: (B, C, H, W)."""
        abar = self.alphas_cumprod[k]
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampler(SamplerSettings):
    """Settings shared by the discrete-time samplers (DDIM, DDPM, PLMS)."""

    clip_sample: bool = False          # clamp x0_pred to [-clip_sample_range, clip_sample_range] (pixel models)
    clip_sample_range: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not self.clip_sample_range > 0:
            raise ConfigError("clip_sample_range must be > 0", where="clip_sample_range", expected="> 0",
                              found=self.clip_sample_range)

    def timesteps(self, noise_scheduler: NoiseScheduler, num_inference_steps: int) -> torch.Tensor:
        """The N training timesteps visited, descending: (N,) int64 on the CPU."""
        return torch.tensor(self.plan(noise_scheduler, num_inference_steps).timesteps, dtype=torch.long)

    def plan(self, noise_scheduler: NoiseScheduler, num_inference_steps: int, *,
             start_step: int = 0) -> SamplingPlan:
        """Timesteps and the abar values of each step (for custom loops over `discrete_loops.sample_*`): steps
        start_step .. N-1 of the N-step plan (0 <= start_step < N)."""
        if not isinstance(noise_scheduler, NoiseScheduler):
            raise InputError("a NoiseScheduler is needed", where="noise_scheduler", expected="NoiseScheduler",
                             found=describe(noise_scheduler))
        timesteps = timestep_grid(noise_scheduler.num_train_timesteps, num_inference_steps, kind="discrete",
                                  spacing=self.timestep_spacing, steps_offset=self.steps_offset).tolist()
        s = check_start_step(start_step, len(timesteps))
        abar = noise_scheduler.alphas_cumprod[timesteps[s:]].tolist()   # CPU table: no device sync
        return SamplingPlan(timesteps[s:], abar + [self.final_alpha_cumprod(noise_scheduler)], s)

    def final_alpha_cumprod(self, noise_scheduler: NoiseScheduler) -> float:
        """abar after the last step: 1 (a clean sample) unless a sampler says otherwise."""
        return 1.0

    @property
    def _clip(self) -> float | None:
        return self.clip_sample_range if self.clip_sample else None


@SAMPLERS.register("ddim")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12): eta = 0 deterministic, eta = 1 matches DDPM's posterior variance."""

    eta: float = 0.0
    set_alpha_to_one: bool = False     # the final abar: 1, or abar_0 (diffusers' SD configs use abar_0)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError("eta must lie in [0, 1] (above 1 the DDIM direction term has a negative variance)",
                              where="eta", expected="0 <= eta <= 1", found=self.eta)

    def final_alpha_cumprod(self, noise_scheduler: NoiseScheduler) -> float:
        return 1.0 if self.set_alpha_to_one else float(noise_scheduler.alphas_cumprod[0])

    def sample(self, denoise: Denoiser, x_T: torch.Tensor, noise_scheduler: NoiseScheduler,
               num_inference_steps: int, *, start_step: int = 0, generator: Generator = None,
               callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
        """x_T (B, C, H, W) -> x_0 in `num_inference_steps` DDIM steps.

        start_step = s > 0 runs steps s .. N-1 only, x_T being the sample at step s (`noise_to_start`).
        denoise(x_t, t) -> the raw prediction (noise_scheduler.config.prediction_type), t a 0-d int64
        tensor on x_T's device. With eta > 0, the noise of each step is drawn per sample from
        `generator` (one, or a list of one per sample) on the generator's device, then moved.
        callback(i, t_i, x, denoised) runs after step i (i counted from 0 in the run, t_i a Python int, x the new
        sample, denoised its x0 prediction; a tensor it returns replaces x; see `base.StepCallback`); progress
        shows tqdm.
        """
        check_sample_call(denoise, x_T, generator, callback)
        plan = self.plan(noise_scheduler, num_inference_steps, start_step=start_step)
        return sample_ddim(denoise, x_T, plan.timesteps, plan.alphas_cumprod,
                           prediction_type=noise_scheduler.config.prediction_type, eta=self.eta,
                           clip_sample_range=self._clip, noise_sampler=noise_sampler_from(generator),
                           callback=callback, progress=progress)


@SAMPLERS.register("ddpm")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2), strided over the selected timesteps."""

    variance_type: Literal["fixed_small", "fixed_large"] = "fixed_small"   # beta-tilde_t, or beta_t

    def sample(self, denoise: Denoiser, x_T: torch.Tensor, noise_scheduler: NoiseScheduler,
               num_inference_steps: int, *, start_step: int = 0, generator: Generator = None,
               callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
        """x_T (B, C, H, W) -> x_0; arguments as DDIMSampler.sample. Noise is drawn at every step but the last."""
        check_sample_call(denoise, x_T, generator, callback)
        plan = self.plan(noise_scheduler, num_inference_steps, start_step=start_step)
        return sample_ddpm(denoise, x_T, plan.timesteps, plan.alphas_cumprod,
                           prediction_type=noise_scheduler.config.prediction_type, variance_type=self.variance_type,
                           clip_sample_range=self._clip, noise_sampler=noise_sampler_from(generator),
                           callback=callback, progress=progress)


@SAMPLERS.register("plms")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PLMSSampler(Sampler):
    """PLMS (Liu et al. 2022, sec. 3.3), the sampler of the latent diffusion paper's text-to-image results:
    a fourth-order linear multistep method on eps with DDIM's transfer, one model call per step after a
    pseudo improved-Euler first step (two calls). diffusers: PNDMScheduler(skip_prk_steps=True)."""

    set_alpha_to_one: bool = False     # the final abar: 1, or abar_0 (PNDMScheduler's default)
    # PNDM never clips x0 (it works on eps): class constants replace the two inherited fields, so they cannot be
    # set; mypy does not allow a field to become a ClassVar, which here is the point.
    clip_sample: ClassVar[bool] = False  # type: ignore[misc]
    clip_sample_range: ClassVar[float] = 1.0  # type: ignore[misc]

    def final_alpha_cumprod(self, noise_scheduler: NoiseScheduler) -> float:
        return 1.0 if self.set_alpha_to_one else float(noise_scheduler.alphas_cumprod[0])

    def plan(self, noise_scheduler: NoiseScheduler, num_inference_steps: int, *,
             start_step: int = 0) -> SamplingPlan:
        plan = super().plan(noise_scheduler, num_inference_steps, start_step=start_step)
        if 0.0 in plan.alphas_cumprod[:-1]:
            raise InputError("PLMS cannot start at a zero-SNR timestep (abar_t = 0): its eps-to-x0 transfer divides "
                             "by sqrt(abar_t); use 'leading' spacing or another sampler", where="timestep_spacing",
                             expected="timesteps with abar_t > 0", found=repr(self.timestep_spacing))
        return plan

    def sample(self, denoise: Denoiser, x_T: torch.Tensor, noise_scheduler: NoiseScheduler,
               num_inference_steps: int, *, start_step: int = 0, generator: Generator = None,
               callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
        """x_T (B, C, H, W) -> x_0 in N - start_step steps (one more model call: the first step's warm-up, also
        when started part-way); arguments as DDIMSampler.sample (deterministic: `generator` is checked, not used)."""
        check_sample_call(denoise, x_T, generator, callback)
        plan = self.plan(noise_scheduler, num_inference_steps, start_step=start_step)
        return sample_plms(denoise, x_T, plan.timesteps, plan.alphas_cumprod,
                           prediction_type=noise_scheduler.config.prediction_type, callback=callback,
                           progress=progress)
