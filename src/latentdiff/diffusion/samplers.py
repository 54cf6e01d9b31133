"""Samplers as thin, immutable holders of settings over the pure loops in `sampling.py`.

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
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Literal, NamedTuple

import torch

from ..config import ComponentConfig
from ..errors import ConfigError, InputError
from ..registry import SAMPLERS
from .noise_scheduler import NoiseScheduler
from .sampling import (Callback, Denoiser, Generator, check_generator, noise_sampler_from, sample_ddim, sample_ddpm,
                       select_timesteps)


class SamplingPlan(NamedTuple):
    """The steps of one run: timesteps t_1 > ... > t_N, and abar(t_1) .. abar(t_N), abar_final (N + 1 floats)."""

    timesteps: list[int]
    alphas_cumprod: list[float]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampler(ComponentConfig):
    """Settings shared by the discrete-time samplers (DDIM, DDPM)."""

    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"
    steps_offset: int = 0              # added to "leading" timesteps (Stable Diffusion v1/v2 use 1)
    clip_sample: bool = False          # clamp x0_pred to [-clip_sample_range, clip_sample_range] (pixel models)
    clip_sample_range: float = 1.0

    init_noise_sigma: ClassVar[float] = 1.0   # x_T ~ N(0, I): the initial noise is not scaled
    registry_name: ClassVar[str]

    def validate(self) -> None:
        if self.steps_offset < 0:
            raise ConfigError("steps_offset must be >= 0", where="steps_offset", expected=">= 0",
                              found=self.steps_offset)
        if not self.clip_sample_range > 0:
            raise ConfigError("clip_sample_range must be > 0", where="clip_sample_range", expected="> 0",
                              found=self.clip_sample_range)

    def with_options(self, **changes: Any) -> "Sampler":
        """A copy with some settings changed; an unknown name is a TypeError, a bad value a ConfigError."""
        return dataclasses.replace(self, **changes)

    def timesteps(self, noise_scheduler: NoiseScheduler, num_inference_steps: int) -> torch.Tensor:
        """The N training timesteps visited, descending: (N,) int64 on the CPU."""
        return torch.tensor(self.plan(noise_scheduler, num_inference_steps).timesteps, dtype=torch.long)

    def plan(self, noise_scheduler: NoiseScheduler, num_inference_steps: int) -> SamplingPlan:
        """Timesteps and the abar values of each step (for custom loops over `sampling.sample_*`)."""
        if not isinstance(noise_scheduler, NoiseScheduler):
            raise InputError("a NoiseScheduler is needed", where="noise_scheduler", expected="NoiseScheduler",
                             found=type(noise_scheduler).__name__)
        timesteps = select_timesteps(noise_scheduler.num_train_timesteps, num_inference_steps,
                                     spacing=self.timestep_spacing, steps_offset=self.steps_offset)
        abar = noise_scheduler.alphas_cumprod[timesteps].tolist()   # CPU table: no device sync
        return SamplingPlan(timesteps, abar + [self.final_alpha_cumprod(noise_scheduler)])

    def final_alpha_cumprod(self, noise_scheduler: NoiseScheduler) -> float:
        """abar after the last step: 1 (a clean sample) unless a sampler says otherwise."""
        return 1.0

    @property
    def _clip(self) -> float | None:
        return self.clip_sample_range if self.clip_sample else None

    def _check_call(self, denoise: Callable, x_T: torch.Tensor, generator: Generator,
                    callback: Callable | None) -> None:
        if not callable(denoise):
            raise InputError("denoise must be a callable denoise(x_t, t) -> model_output", where="denoise",
                             expected="a callable", found=type(denoise).__name__)
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.ndim < 1:
            raise InputError("x_T must be a floating-point tensor (B, C, H, W)", where="x_T",
                             expected="a float tensor", found=getattr(x_T, "dtype", type(x_T).__name__))
        if callback is not None and not callable(callback):
            raise InputError("callback must be callable", where="callback", expected="callback(i, t, x_t)",
                             found=type(callback).__name__)
        check_generator(generator, x_T.shape[0])


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
               num_inference_steps: int, *, generator: Generator = None, callback: Callback | None = None,
               progress: bool = False) -> torch.Tensor:
        """x_T (B, C, H, W) -> x_0 in `num_inference_steps` DDIM steps.

        denoise(x_t, t) -> the raw prediction (noise_scheduler.config.prediction_type), t a 0-d int64
        tensor on x_T's device. With eta > 0, the noise of each step is drawn per sample from
        `generator` (one, or a list of one per sample) on the generator's device, then moved.
        callback(i, t_i, x) runs after step i (t_i a Python int, x the new sample); progress shows tqdm.
        """
        self._check_call(denoise, x_T, generator, callback)
        plan = self.plan(noise_scheduler, num_inference_steps)
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
               num_inference_steps: int, *, generator: Generator = None, callback: Callback | None = None,
               progress: bool = False) -> torch.Tensor:
        """x_T (B, C, H, W) -> x_0; arguments as DDIMSampler.sample. Noise is drawn at every step but the last."""
        self._check_call(denoise, x_T, generator, callback)
        plan = self.plan(noise_scheduler, num_inference_steps)
        return sample_ddpm(denoise, x_T, plan.timesteps, plan.alphas_cumprod,
                           prediction_type=noise_scheduler.config.prediction_type, variance_type=self.variance_type,
                           clip_sample_range=self._clip, noise_sampler=noise_sampler_from(generator),
                           callback=callback, progress=progress)

