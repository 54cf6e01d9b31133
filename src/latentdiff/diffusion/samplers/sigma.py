"""Sigma-space samplers (Euler, Euler ancestral, Heun, LMS, DPM-Solver++) as thin immutable classes; UniPC and DEIS,
which share DPM-Solver's grid (`MultistepSigmaSampler`), are in `multistep.py`.

    sampler = EulerSampler(sigma_schedule="karras")
    x_0 = sampler.sample(denoise, x_T, noise_scheduler, 30, generator=torch.Generator().manual_seed(0))

The interface is DDIMSampler's: `denoise(x_t, t)` is the network (with its guidance) called exactly as
a diffusers UNet is called by the diffusers scheduler of the same name: on x_t = x / sqrt(sigma^2 + 1)
with the timestep of sigma (float32, fractional between trained timesteps; int64 for DPM-Solver),
returning eps / v / x0 per `noise_scheduler.config.prediction_type`. `sigma_loops.discrete_time_denoiser`
adapts it; the loops in `sigma_loops` stay pure. x_T is standard normal noise, as for DDIM: `sample`
scales it to the first noise level itself (by `plan(...).init_scale`: the init_noise_sigma of diffusers'
Euler / Heun / LMS scheduler, which depends on the grid; sqrt(sigma_0^2 + 1) for DPM-Solver, which
diffusers runs on x_t itself), so `init_noise_sigma` stays 1.0 for every sampler and a pipeline never
has to know which sampler it runs. The state between steps is the variance-exploding sample
x = x_t / sqrt(abar_t) (what diffusers' Euler-family schedulers hold); callback(i, t_i, x, denoised) sees it
with denoised = D(x; sigma_i), the step's x0 prediction, and a tensor it returns replaces it.

Started part-way (`sample(..., start_step=s)`: image-to-image, inpainting), a sampler runs the tail of its grid
from sigma_s, LMS and DPM-Solver with an empty history (k-diffusion's img2img convention). Its x is then
the sample x_t = (x0 + sigma_s n) / sqrt(sigma_s^2 + 1) on the network's scale, which `noise_to_start` makes:
the state starts at x0 + sigma_s n, as diffusers' img2img `add_noise` with `set_begin_index` puts it.

Differences from diffusers 0.42 (none changes a result on a grid diffusers builds as documented):
* "trailing" grids never get N + 1 steps (numpy's float arange gives them for some N, ending at t = -1,
  and diffusers then also spans its karras / exponential grid down to sigma(t = -1) = sigma(0)).
* A steps_offset that pushes a timestep past T - 1, or a DPM-Solver grid with repeated timesteps, is an
  InputError (diffusers calls the model at t = T and clamps sigma, or divides by a zero step).
* Where several sigmas map to one timestep (DPM-Solver karras on the cosine schedule), step i uses sigma_i;
  diffusers' step index starts at the second occurrence of the first timestep (its img2img rule).
* DPM-Solver++ runs in sigma form (k-diffusion's `sample_dpmpp_2m`), algebraically equal to diffusers'
  x_t form: x_t = x / sqrt(sigma^2 + 1), lambda = -log sigma.
* Euler ancestral also takes "sample" prediction (diffusers raises NotImplementedError).
* Euler's S_churn (a `step()` argument in diffusers, which adds the noise after the model call) is not offered.
* Started part-way, LMS takes min(steps run, 4) slopes with the coefficients of that order. diffusers'
  LMSDiscreteScheduler takes the order from its step index on the whole grid, min(s + i + 1, 4), and zips
  those coefficients with the fewer slopes it has, so its first steps after s > 0 do not sum to the step
  (huggingface/diffusers#5630 reports the leftover noise).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch

from ...errors import ConfigError, InputError, describe
from ...registry import SAMPLERS
from ..noise_scheduler import NoiseScheduler
from . import brownian, grids, sigma_loops
from .base import (
    Denoiser,
    Generator,
    SamplerSettings,
    StepCallback,
    TimestepSpacing,
    as_step_callback,
    check_num_inference_steps,
    check_sample_call,
    check_start_step,
    noise_sampler_from,
)

# "default": the spaced grid's own sigmas; the others replace them (grids.schedule_sigmas): karras (Karras et al.
# 2022, eq. 5, rho = 7), exponential (even in log sigma), and A1111 / ComfyUI's sgm_uniform, simple, beta and
# align_your_steps (NVIDIA's published table for `ays_model`)
SigmaSchedule = Literal["default", "karras", "exponential", "sgm_uniform", "simple", "beta", "align_your_steps"]
AYSModel = Literal["sd15", "sdxl"]
SigmaInterpolation = Literal["linear", "log"]


class SigmaPlan(NamedTuple):
    """One run: N timesteps, N + 1 sigmas, and the scales that map x_T to the first state and the last to x_0.
    A plan started part-way holds the tail of the N-step grid from index `start_step`."""

    timesteps: torch.Tensor      # (N,) CPU: the model's t at sigmas[i], float32 (int64 for DPM-Solver)
    sigmas: list[float]          # sigma_0 > ... > sigma_{N-1} > sigma_N >= 0 (float32 values)
    init_scale: float            # state x = x_T * init_scale before the first step (diffusers' init_noise_sigma;
                                 # sqrt(sigma_s^2 + 1) from a start_step s > 0)
    final_scale: float = 1.0     # x_0 = x_N * final_scale (DPM-Solver returns x_t, not x / sqrt(abar))
    start_step: int = 0

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, k: int) -> torch.Tensor:
        """The forward process at the start of step k of this plan (k = len(timesteps): after the last step), in
        the loops' variance-exploding scale: x = x0 + sigma_k noise (Karras et al. 2022, eq. 1; diffusers' Euler
        `add_noise`). x0, noise: (B, C, H, W)."""
        return x0 + noise * self.sigmas[k]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SigmaSampler(SamplerSettings):
    """Settings shared by the sigma-space samplers: which timesteps the grid starts from."""

    timestep_spacing: TimestepSpacing = "linspace"   # diffusers' default here
    # How the "default" grid reads sigma off the trained table at fractional timesteps: "linear" in sigma (diffusers'
    # Euler family), "log" in log sigma (k-diffusion's DiscreteSchedule.t_to_sigma: A1111's "Uniform", which its
    # k-diffusion labels set; `grids.SIGMA_INTERPOLATIONS`)
    sigma_interpolation: SigmaInterpolation = "linear"

    def validate(self) -> None:
        super().validate()
        if self.sigma_interpolation not in grids.SIGMA_INTERPOLATIONS:
            raise ConfigError("unknown sigma interpolation", where="sigma_interpolation",
                              expected=list(grids.SIGMA_INTERPOLATIONS), found=repr(self.sigma_interpolation))

    def timesteps(self, noise_scheduler: NoiseScheduler, num_inference_steps: int) -> torch.Tensor:
        """The N timesteps the model is first called with at each step, descending: (N,) CPU tensor."""
        return self.plan(noise_scheduler, num_inference_steps).timesteps

    def plan(self, noise_scheduler: NoiseScheduler, num_inference_steps: int, *, start_step: int = 0) -> SigmaPlan:
        """Timesteps, sigmas and scales of one run (for custom loops over `sigma_loops.sample_*`): steps
        start_step .. N-1 of the N-step grid (0 <= start_step < N)."""
        if not isinstance(noise_scheduler, NoiseScheduler):
            raise InputError("a NoiseScheduler is needed", where="noise_scheduler", expected="NoiseScheduler",
                             found=describe(noise_scheduler))
        table = grids.sigma_table(noise_scheduler.alphas_cumprod,
                                  zero_terminal_snr=noise_scheduler.config.rescale_zero_terminal_snr)
        timesteps, sigmas = self._grid(noise_scheduler, table, num_inference_steps)
        s = check_start_step(start_step, len(timesteps))
        # From step s > 0, x is x_t on the network's scale: the state is x_t / sqrt(abar) = x_t sqrt(sigma_s^2 + 1).
        init = grids.init_noise_sigma(sigmas, self.timestep_spacing) if s == 0 else (sigmas[s].item()**2 + 1) ** 0.5
        return SigmaPlan(torch.from_numpy(np.ascontiguousarray(timesteps[s:])), sigmas[s:].tolist(), init,
                         start_step=s)

    def sample(self, denoise: Denoiser, x_T: torch.Tensor, noise_scheduler: NoiseScheduler,
               num_inference_steps: int, *, start_step: int = 0, generator: Generator = None,
               callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
        """x_T (B, C, H, W) standard normal -> x_0 in `num_inference_steps` steps, in x_T's dtype
        (a float16 / bfloat16 x_T is stepped in float32; the model still gets its input in x_T's dtype).

        start_step = s > 0 runs steps s .. N-1 only, from x_T = the sample x_t at step s (`noise_to_start`).
        The noise of stochastic samplers is drawn per sample from `generator` (one, or a list of one per
        sample) on the generator's device, then moved. callback(i, t_i, x, denoised) runs after step i (i counted
        from 0 in the run; `base.StepCallback`); a tensor it returns replaces x.
        """
        check_sample_call(denoise, x_T, generator, callback)
        plan = self.plan(noise_scheduler, num_inference_steps, start_step=start_step)
        # A half-precision x_T (the model's dtype) is stepped in float32, as diffusers' schedulers upcast.
        state_dtype = torch.float32 if x_T.dtype in (torch.float16, torch.bfloat16) else x_T.dtype
        table = grids.sigma_table(noise_scheduler.alphas_cumprod,
                                  zero_terminal_snr=noise_scheduler.config.rescale_zero_terminal_snr)
        model = sigma_loops.discrete_time_denoiser(denoise, plan.sigmas, plan.timesteps,
                                                  prediction_type=noise_scheduler.config.prediction_type,
                                                  clip_sample_range=self._clip,
                                                  model_dtype=x_T.dtype if state_dtype != x_T.dtype else None,
                                                  log_table=np.log(table))
        x = x_T.to(state_dtype) * plan.init_scale
        noise = self._noise(generator, x, plan, self.noise_dtype or x_T.dtype)   # diffusers: the model's dtype
        x = self._run(model, x, plan, noise, _with_timesteps(callback, plan), progress)
        return (x * plan.final_scale if plan.final_scale != 1.0 else x).to(x_T.dtype)

    # ---- what subclasses define ---------------------------------------------------------------------
    @property
    def _clip(self) -> float | None:
        """The clamp of D(x; sigma), where a sampler offers one (HeunSampler); None: no clamp."""
        return None

    noise_dtype: ClassVar[torch.dtype | None] = None     # dtype noise is drawn in (None: x_T's)

    def _run(self, model: sigma_loops.SigmaDenoiser, x: torch.Tensor, plan: SigmaPlan, noise: Any,
             callback: StepCallback | None, progress: bool) -> torch.Tensor:
        raise NotImplementedError

    def _noise(self, generator: Generator, x: torch.Tensor, plan: SigmaPlan, dtype: torch.dtype) -> Any:
        """The noise `_run` gets: a `noise_sampler(x)` drawing from `generator` in `dtype` (the stochastic samplers
        with a Brownian tree override it: `samplers.brownian`)."""
        return noise_sampler_from(generator, dtype=dtype)

    def _grid(self, noise_scheduler: NoiseScheduler, table: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (timesteps (N,), sigmas (N + 1,) float32) as diffusers' Euler-family `set_timesteps` builds them."""
        return self._euler_family_grid(noise_scheduler, table, n)

    def _euler_family_grid(self, noise_scheduler: NoiseScheduler, table: np.ndarray, n: int, *,
                           sigma_min: float | None = None, sigma_max: float | None = None,
                           final_sigma: float = 0.0, round_karras: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`round_karras`: karras timesteps rounded to integers (diffusers' KDPM2 schedulers)."""
        timesteps = grids.timestep_grid(noise_scheduler.num_train_timesteps, n, kind="euler",
                                        spacing=self.timestep_spacing, steps_offset=self.steps_offset)
        sigmas = linear = grids.interpolate_sigmas(timesteps, table)
        if self.sigma_interpolation == "log":
            sigmas = grids.interpolate_sigmas(timesteps, table, log=True)
        schedule = getattr(self, "sigma_schedule", "default")
        if schedule != "default":      # karras / exponential span the spaced grid unless sigma_min/max are set (its
            # ends are trained timesteps: the table's own sigmas, as k-diffusion's model sigma_min / sigma_max)
            low = sigma_min if sigma_min is not None else linear[-1].item()
            high = sigma_max if sigma_max is not None else linear[0].item()
            sigmas = grids.schedule_sigmas(schedule, table, n, low=low, high=high,
                                           ays_model=getattr(self, "ays_model", "sd15"))
            timesteps = grids.sigma_to_t(sigmas, np.log(table))
            if round_karras and schedule == "karras":
                timesteps = timesteps.round()
        sigmas = np.concatenate([sigmas, [final_sigma]]).astype(np.float32)
        return timesteps.astype(np.float32), sigmas


def _with_timesteps(callback: StepCallback | None, plan: SigmaPlan) -> StepCallback | None:
    """The loops' callback(i, sigma_i, x, denoised) as the user's callback(i, t_i, x, denoised), its return value
    kept; t_i a Python float (int for DPM-Solver)."""
    callback = as_step_callback(callback)
    if callback is None:
        return None
    t_list = plan.timesteps.tolist()
    return lambda i, sigma, x, denoised: callback(i, t_list[i], x, denoised)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ScheduledSigmaSampler(SigmaSampler):
    sigma_schedule: SigmaSchedule = "default"   # see SigmaSchedule
    # the Align Your Steps table: NVIDIA published one per model family (SD 1.x / 2.x and SDXL share the training
    # schedule but not the optimised steps); pipelines of SDXL set "sdxl" where the sampler has the default
    ays_model: AYSModel = "sd15"


@SAMPLERS.register("euler")
@dataclasses.dataclass(frozen=True, kw_only=True)
class EulerSampler(_ScheduledSigmaSampler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2). diffusers: EulerDiscreteScheduler."""

    sigma_min: float | None = None     # ends of the karras / exponential grid (None: the interpolated grid's)
    sigma_max: float | None = None
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"   # the last step goes to 0 or to sigma_0 of training

    def validate(self) -> None:
        super().validate()
        for name in ("sigma_min", "sigma_max"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive number", where=name, expected="> 0", found=value)
        if self.sigma_min is not None and self.sigma_max is not None and not self.sigma_min < self.sigma_max:
            raise ConfigError("sigma_min must be below sigma_max", where="sigma_min", expected=f"< {self.sigma_max}",
                              found=self.sigma_min)

    def _grid(self, noise_scheduler: NoiseScheduler, table: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        final = 0.0 if self.final_sigmas_type == "zero" else table[0].item()
        return self._euler_family_grid(noise_scheduler, table, n, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                                       final_sigma=final)

    def _run(self, model, x, plan, noise, callback, progress):
        return sigma_loops.sample_euler(model, x, plan.sigmas, callback=callback, progress=progress)


@SAMPLERS.register("euler_ancestral")
@dataclasses.dataclass(frozen=True, kw_only=True)
class EulerAncestralSampler(SigmaSampler):
    """Euler steps with fresh noise at each step (ancestral sampling). diffusers: EulerAncestralDiscreteScheduler."""

    def _run(self, model, x, plan, noise, callback, progress):
        return sigma_loops.sample_euler_ancestral(model, x, plan.sigmas, noise_sampler=noise, callback=callback,
                                                 progress=progress)


@SAMPLERS.register("heun")
@dataclasses.dataclass(frozen=True, kw_only=True)
class HeunSampler(_ScheduledSigmaSampler):
    """Heun's second-order method (Karras et al. 2022, Alg. 1), 2N - 1 model calls. diffusers: HeunDiscreteScheduler."""

    clip_sample: bool = False          # clamp D(x; sigma) to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not self.clip_sample_range > 0:
            raise ConfigError("clip_sample_range must be > 0", where="clip_sample_range", expected="> 0",
                              found=self.clip_sample_range)

    @property
    def _clip(self) -> float | None:
        return self.clip_sample_range if self.clip_sample else None

    def _run(self, model, x, plan, noise, callback, progress):
        return sigma_loops.sample_heun(model, x, plan.sigmas, callback=callback, progress=progress)


@SAMPLERS.register("lms")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LMSSampler(_ScheduledSigmaSampler):
    """Linear multistep of order 4 on the sigma grid. diffusers: LMSDiscreteScheduler (step(order=4))."""

    order: ClassVar[int] = 4

    def _run(self, model, x, plan, noise, callback, progress):
        return sigma_loops.sample_lms(model, x, plan.sigmas, order=self.order, callback=callback, progress=progress)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultistepSigmaSampler(_ScheduledSigmaSampler):
    """The multistep solvers diffusers runs on x_t itself (DPM-Solver++, and UniPC and DEIS in `multistep.py`): one
    timestep grid (N + 1 points over the trained range, the last dropped), karras / exponential sigmas spanning the
    whole trained range, and x_T started at sigma_0 as x_T sqrt(sigma_0^2 + 1). Subclasses say where their grids
    differ through the hooks below (the diffusers class of each differs there, and only there)."""

    def plan(self, noise_scheduler: NoiseScheduler, num_inference_steps: int, *, start_step: int = 0) -> SigmaPlan:
        plan = super().plan(noise_scheduler, num_inference_steps, start_step=start_step)
        # diffusers runs these solvers on x_t itself: x_T starts at sigma_0 as x_T / sqrt(abar), and the last
        # state is returned as x_t = x / sqrt(sigma^2 + 1) (x itself when the final sigma is 0).
        first, last = plan.sigmas[0], plan.sigmas[-1]
        return plan._replace(init_scale=(first**2 + 1) ** 0.5, final_scale=1 / (last**2 + 1) ** 0.5)

    def _grid(self, noise_scheduler: NoiseScheduler, table: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The `set_timesteps` of DPMSolverMultistepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler: their
        own timestep grid; karras / exponential span the whole trained range whatever the spacing, and karras
        timesteps are rounded (`_round_karras`). With sigma_interpolation "log" the default grid is k-diffusion's
        (the Euler family's timesteps), which diffusers' classes do not have."""
        cfg = noise_scheduler.config
        if self.sigma_schedule == "default" and self.sigma_interpolation == "log":
            # k-diffusion's uniform grid (A1111's "Uniform"): the Euler family's timesteps, log-interpolated sigmas,
            # the model called at the nearest integer timestep
            timesteps = grids.timestep_grid(cfg.num_train_timesteps, n, kind="euler", spacing=self.timestep_spacing,
                                            steps_offset=self.steps_offset)
            sigmas = grids.interpolate_sigmas(timesteps, table, log=True)
            timesteps = timesteps.round()
        elif self.sigma_schedule == "default":
            timesteps = grids.timestep_grid(cfg.num_train_timesteps, n, kind="dpm_solver",
                                            spacing=self.timestep_spacing, steps_offset=self.steps_offset,
                                            last_timestep=self._last_timestep(noise_scheduler))
            sigmas = grids.interpolate_sigmas(timesteps, table)
        else:                          # the spaced grid is not used: the sigmas alone give the timesteps
            check_num_inference_steps(n, cfg.num_train_timesteps)
            low, high = self._sigma_range(table)
            sigmas = grids.schedule_sigmas(self.sigma_schedule, table, n, low=low, high=high,
                                           ays_model=self.ays_model)
            timesteps = grids.sigma_to_t(sigmas, np.log(table))
            # integer timesteps: karras ones rounded as diffusers rounds them, the table schedules' to the nearest
            karras = self.sigma_schedule == "karras" and self._round_karras(noise_scheduler)
            if karras or self.sigma_schedule in grids.TABLE_SCHEDULES:
                timesteps = timesteps.round()
        final = self._final_sigma(table, sigmas)
        return timesteps.astype(np.int64), np.concatenate([sigmas, [final]]).astype(np.float32)

    # ---- the hooks: where the diffusers classes differ ------------------------------------------------
    def _last_timestep(self, noise_scheduler: NoiseScheduler) -> int | None:
        """The end of the spaced grid (None: T)."""
        return None

    def _sigma_range(self, table: np.ndarray) -> tuple[float, float]:
        """(sigma_min, sigma_max) of a karras / exponential grid: the trained range."""
        return table[0].item(), table[-1].item()

    def _round_karras(self, noise_scheduler: NoiseScheduler) -> bool:
        """Whether karras timesteps are rounded (else truncated to int64)."""
        return True

    def _final_sigma(self, table: np.ndarray, sigmas: np.ndarray) -> float:
        """sigma_N, where the last step goes: 0, or the smallest trained sigma (final_sigmas_type "sigma_min")."""
        return 0.0 if getattr(self, "final_sigmas_type", "zero") == "zero" else table[0].item()


@dataclasses.dataclass(frozen=True, kw_only=True)
class _DPMSolverSampler(MultistepSigmaSampler):
    """Settings of DPMSolverMultistepScheduler that latentdiff implements (solver orders 1 and 2)."""

    solver_order: int = 2              # 2: DPM-Solver++(2M); 1: DPM-Solver++(1), i.e. DDIM
    solver_type: Literal["midpoint", "heun"] = "midpoint"    # the second-order correction term
    lower_order_final: bool = True     # first-order last step when N < 15
    euler_at_final: bool = False       # first-order last step always
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"
    lambda_min_clipped: float = -math.inf   # drop timesteps with log(alpha_t / sigma_t) below it (cosine schedules)

    algorithm_type: ClassVar[str]

    def validate(self) -> None:
        super().validate()
        if self.solver_order not in (1, 2):
            raise ConfigError("solver_order must be 1 or 2 (third order is not implemented)", where="solver_order",
                              expected=[1, 2], found=self.solver_order)

    def _last_timestep(self, noise_scheduler: NoiseScheduler) -> int | None:
        return grids.lambda_clipped_last_timestep(noise_scheduler.alphas_cumprod, self.lambda_min_clipped,
                                                  zero_terminal_snr=noise_scheduler.config.rescale_zero_terminal_snr)

    def _round_karras(self, noise_scheduler: NoiseScheduler) -> bool:
        return noise_scheduler.config.beta_schedule != "squaredcos_cap_v2"   # diffusers truncates there

    def _run(self, model, x, plan, noise, callback, progress):
        # diffusers' "fewer than 15 steps" counts the whole grid, also for a run started part-way
        few_steps = plan.start_step + len(plan.timesteps) < 15
        sde, tree = self.algorithm_type == "sde-dpmsolver++", isinstance(noise, brownian.BrownianNoise)
        return sigma_loops.sample_dpmpp_2m(
            model, x, plan.sigmas, solver_order=self.solver_order, solver_type=self.solver_type,
            lower_order_final=self.lower_order_final and few_steps, euler_at_final=self.euler_at_final,
            noise_sampler=noise if sde and not tree else None, interval_noise=noise if sde and tree else None,
            callback=callback, progress=progress)


@SAMPLERS.register("dpmpp_2m")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DPMSolverMultistepSampler(_DPMSolverSampler):
    """DPM-Solver++(2M) (Lu et al. 2022). diffusers: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")."""

    algorithm_type: ClassVar[str] = "dpmsolver++"


@SAMPLERS.register("dpmpp_2m_sde")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DPMSolverMultistepSDESampler(_DPMSolverSampler):
    """SDE-DPM-Solver++(2M): noise at every step. diffusers: DPMSolverMultistepScheduler(algorithm_type=
    "sde-dpmsolver++"), which draws that noise in float32 whatever the model's dtype; so do we, for seed parity."""

    algorithm_type: ClassVar[str] = "sde-dpmsolver++"
    noise_dtype: ClassVar[torch.dtype | None] = torch.float32
    # "gaussian": fresh noise per step (diffusers); "brownian": a Brownian tree's increments (k-diffusion, A1111 and
    # ComfyUI's DPM++ 2M SDE; one tree per sample, its entropy drawn from the generator: samplers.brownian)
    noise_type: Literal["gaussian", "brownian"] = "gaussian"

    def validate(self) -> None:
        super().validate()
        brownian.check_noise_type(self.noise_type)

    def _noise(self, generator, x, plan, dtype):
        if self.noise_type == "brownian":
            return brownian.brownian_noise_from(generator, x, plan.sigmas)   # in the state's dtype, as k-diffusion
        return super()._noise(generator, x, plan, dtype)
