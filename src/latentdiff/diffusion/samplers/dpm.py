"""The DPM-Solver samplers of k-diffusion beyond 2M as thin immutable classes over `dpm_loops` (the interface and
conventions of `samplers.sigma`: the Euler-family grid of diffusers, x_T standard normal, callback(i, t_i, x,
denoised)).

    DPM2Sampler                  "dpm_2"               A1111 "DPM2"         diffusers KDPM2DiscreteScheduler
    DPM2AncestralSampler         "dpm_2_ancestral"     A1111 "DPM2 a"       diffusers KDPM2AncestralDiscreteScheduler
    DPMPP2SAncestralSampler      "dpmpp_2s_ancestral"  A1111 "DPM++ 2S a"   (k-diffusion only)
    DPMSolverSDESampler          "dpmpp_sde"           A1111 "DPM++ SDE"    diffusers DPMSolverSDEScheduler
    DPMPP3MSDESampler            "dpmpp_3m_sde"        A1111 "DPM++ 3M SDE" (k-diffusion only)

Noise: the ancestral samplers draw fresh Gaussian noise per step from the generator (as diffusers, and k-diffusion's
default for them); DPM++ SDE and 3M SDE take a Brownian tree's increments (`samplers.brownian`), as k-diffusion,
A1111 and ComfyUI do: one tree per sample, its entropy drawn from that sample's generator, so image i of a batch is
the image its seed gives alone. `noise_type` switches either way. DPMSolverSDESampler's `noise_sampler_seed`
(diffusers' setting of that name) instead seeds one tree over the whole batch with that entropy, which is what
diffusers' DPMSolverSDEScheduler and ComfyUI (seed = the workflow's seed) do: their images can be reproduced.

Grid: the Euler family's (diffusers'); `discard_next_to_last_sigma=True` builds it for N + 1 steps and drops the
smallest positive sigma, as A1111 does for its "DPM2", "DPM2 a" and "DPM++ 3M SDE" labels (`names.py` sets it there).

The midpoint model calls (DPM2, DPM++ SDE) get the fractional timestep of their sigma, as diffusers computes it.
Differences from diffusers 0.42: "sample" prediction is accepted (diffusers raises NotImplementedError for these
three classes); a run started part-way builds its tree over the noise levels it runs through.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Literal

import numpy as np

from ...errors import ConfigError, InputError
from ...registry import SAMPLERS
from . import brownian, dpm_loops
from .base import check_num_inference_steps
from .sigma import _ScheduledSigmaSampler

NoiseType = Literal["gaussian", "brownian"]


def off_grid(model: Any) -> Any:
    """The network adapter's form for the intermediate noise levels of a step: always their fractional timestep
    (`sigma_loops.discrete_time_denoiser`, on_grid=False)."""
    return functools.partial(model, on_grid=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _DPMGridSampler(_ScheduledSigmaSampler):
    """The grid of the samplers here: the Euler family's, or A1111's with its next-to-last sigma dropped."""

    # A1111's `discard_next_to_last_sigma` (its "DPM2", "DPM2 a" and "DPM++ 3M SDE" labels set it): the sigmas of
    # N + 1 steps without the smallest positive one, so the last step goes from the one before it straight to 0
    discard_next_to_last_sigma: bool = False
    round_karras: ClassVar[bool] = False      # diffusers' KDPM2 schedulers round karras timesteps to integers

    def _grid(self, noise_scheduler, table, n):
        if not self.discard_next_to_last_sigma:
            return self._euler_family_grid(noise_scheduler, table, n, round_karras=self.round_karras)
        T = noise_scheduler.num_train_timesteps
        if check_num_inference_steps(n, T) == T:      # the grid of N + 1 steps does not fit: say so of N itself
            raise InputError("with discard_next_to_last_sigma the grid is built for one step more, which the "
                             "trained timesteps do not hold", where="num_inference_steps",
                             expected=f"1 <= N <= {T - 1} (num_train_timesteps - 1)", found=n)
        timesteps, sigmas = self._euler_family_grid(noise_scheduler, table, n + 1, round_karras=self.round_karras)
        return timesteps[:-1], np.delete(sigmas, -2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _StochasticDPMSampler(_DPMGridSampler):
    """The noise settings of the stochastic samplers here."""

    noise_type: NoiseType = "gaussian"

    def validate(self) -> None:
        super().validate()
        brownian.check_noise_type(self.noise_type)

    def _noise(self, generator, x, plan, dtype):
        """k-diffusion's interval noise(sigma, sigma_next): a Brownian tree's, or fresh Gaussian noise."""
        if self.noise_type == "brownian":
            # in the state's dtype (float32 for a half-precision x_T), as k-diffusion's trees take x's
            return brownian.brownian_noise_from(generator, x, plan.sigmas,
                                                entropy=getattr(self, "noise_sampler_seed", None))
        return dpm_loops.gaussian_interval_noise(super()._noise(generator, x, plan, dtype), x)


@SAMPLERS.register("dpm_2")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DPM2Sampler(_DPMGridSampler):
    """DPM2: DPM-Solver-2 midpoint steps in log sigma, 2N - 1 model calls. diffusers: KDPM2DiscreteScheduler."""

    round_karras: ClassVar[bool] = True

    def _run(self, model, x, plan, noise, callback, progress):
        return dpm_loops.sample_dpm_2(model, x, plan.sigmas, midpoint_model=off_grid(model),
                                      callback=callback, progress=progress)


@SAMPLERS.register("dpm_2_ancestral")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DPM2AncestralSampler(_StochasticDPMSampler):
    """DPM2 a: DPM2 steps to sigma_down plus noise of std sigma_up. diffusers: KDPM2AncestralDiscreteScheduler."""

    round_karras: ClassVar[bool] = True

    def _run(self, model, x, plan, noise, callback, progress):
        return dpm_loops.sample_dpm_2_ancestral(model, x, plan.sigmas, midpoint_model=off_grid(model),
                                                noise_sampler=noise, callback=callback, progress=progress)


@SAMPLERS.register("dpmpp_2s_ancestral")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DPMPP2SAncestralSampler(_StochasticDPMSampler):
    """DPM++ 2S a: DPM-Solver++(2S) steps to sigma_down plus noise of std sigma_up (k-diffusion
    `sample_dpmpp_2s_ancestral`); no diffusers class."""

    def _run(self, model, x, plan, noise, callback, progress):
        return dpm_loops.sample_dpmpp_2s_ancestral(model, x, plan.sigmas, midpoint_model=off_grid(model),
                                                   noise_sampler=noise, callback=callback, progress=progress)


@SAMPLERS.register("dpmpp_sde")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DPMSolverSDESampler(_StochasticDPMSampler):
    """DPM++ SDE: two stochastic DPM-Solver++ substeps per step on a Brownian tree (k-diffusion `sample_dpmpp_sde`,
    r = 1/2). diffusers: DPMSolverSDEScheduler."""

    noise_type: NoiseType = "brownian"
    noise_sampler_seed: int | None = None    # one tree over the batch with this entropy (diffusers, ComfyUI)

    def validate(self) -> None:
        super().validate()
        seed = self.noise_sampler_seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ConfigError("noise_sampler_seed must be a non-negative integer or None", where="noise_sampler_seed",
                              expected="int >= 0 | None", found=repr(seed))

    def _run(self, model, x, plan, noise, callback, progress):
        return dpm_loops.sample_dpmpp_sde(model, x, plan.sigmas, midpoint_model=off_grid(model),
                                          noise_sampler=noise, callback=callback, progress=progress)


@SAMPLERS.register("dpmpp_3m_sde")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DPMPP3MSDESampler(_StochasticDPMSampler):
    """DPM++ 3M SDE: third-order multistep SDE-DPM-Solver++ on a Brownian tree (k-diffusion `sample_dpmpp_3m_sde`);
    no diffusers class (DPMSolverMultistepScheduler's SDE variant stops at order 2)."""

    noise_type: NoiseType = "brownian"

    def _run(self, model, x, plan, noise, callback, progress):
        return dpm_loops.sample_dpmpp_3m_sde(model, x, plan.sigmas, noise_sampler=noise, callback=callback,
                                             progress=progress)
