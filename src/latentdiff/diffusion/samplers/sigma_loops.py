"""Sigma-space samplers as pure functions, in the manner of k-diffusion's `sampling.py`.

Every loop here is `sample_x(model, x, sigmas, ...)` on the variance-exploding form of the process,
x = x_0 + sigma n (Karras et al. 2022, eq. 1), where `model(x, sigma) -> D(x; sigma)` is a denoiser that
returns its estimate of x_0. A discrete DDPM-family network is adapted to that protocol by
`discrete_time_denoiser`, a wrapper (k-diffusion's `CompVisDenoiser`): it feeds the network the sample in
its own scale, x_t = x / sqrt(sigma^2 + 1) (= sqrt(abar) x), with the timestep of sigma, and turns the
network's eps / v / x0 prediction into D. The loops know nothing of networks, timesteps or prediction
types, and keep no state between calls: one set of settings can serve many threads.

sigmas: N + 1 Python floats sigma_0 > ... > sigma_{N-1} > sigma_N >= 0; the loops make N steps and call
`callback(i, sigma_i, x, denoised)` after step i, denoised = D(x_i; sigma_i) (`base.StepCallback`: the sampler
classes pass the step's timestep for sigma_i; an (i, t, x) or the former (i, x) callback is called without the
prediction): a tensor it returns replaces x (see `base.after_step`). Step coefficients
are computed on the host in float64. A run started part-way is a run over the tail of the grid: LMS and
DPM-Solver start with an empty history there, as at sigma_0 (k-diffusion's img2img convention).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TypeAlias

import numpy as np
import torch

from ...errors import InputError
from ..schedules import PREDICTION_TYPES
from .base import Denoiser, IntervalNoise, NoiseSampler, StepCallback, after_step, as_step_callback, progress_range
from .grids import sigma_to_t

SigmaDenoiser: TypeAlias = Callable[[torch.Tensor, float], torch.Tensor]   # D(x; sigma) -> x0 estimate, like x


# ---- the model adapter ------------------------------------------------------------------------------
def discrete_time_denoiser(denoise: Denoiser, sigmas: Sequence[float], timesteps: torch.Tensor, *,
                           prediction_type: str, clip_sample_range: float | None = None,
                           model_dtype: torch.dtype | None = None,
                           log_table: np.ndarray | None = None) -> SigmaDenoiser:
    """Wrap `denoise(x_t, t) -> model output` (a UNet and its guidance) into D(x; sigma).

    sigmas[i] (i < len(timesteps)) is called with timesteps[i]: a 0-d tensor on x's device, of
    timesteps' dtype (float32 for the Euler family, int64 for DPM-Solver), as diffusers passes it.
        epsilon:       D = x - sigma eps
        v_prediction:  D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v   (Salimans & Ho 2022, in x's scale)
        sample:        D = x0
    `clip_sample_range` clamps D (diffusers' HeunDiscreteScheduler clip_sample). `model_dtype`: the dtype the
    network gets its input in (its output is cast back to x's), so a half-precision network can be sampled
    with a float32 state, as diffusers' schedulers compute their steps in float32. `log_table`: the (T,) log sigma_t
    of training; a sigma off the grid (the midpoints of DPM2 and DPM++ SDE) is then called with its fractional
    timestep (`grids.sigma_to_t`, as diffusers' KDPM2 / DPMSolverSDE schedulers compute theirs); so is every call
    with on_grid=False (a midpoint that falls on a grid sigma: DPM2 a's is sigma_{i+1} itself, whose grid timestep
    diffusers rounds on a karras grid while it does not round the midpoint's).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise InputError("unknown prediction type", where="prediction_type", expected=list(PREDICTION_TYPES),
                         found=repr(prediction_type))
    index: dict[float, int] = {}
    for i, sigma in enumerate(sigmas[:len(timesteps)]):
        index.setdefault(sigma, i)
    on_device: dict[torch.device, torch.Tensor] = {}

    def model(x: torch.Tensor, sigma: float, *, on_grid: bool = True) -> torch.Tensor:
        ts = on_device.get(x.device)
        if ts is None:                       # one copy per run and device, not one per step
            ts = on_device.setdefault(x.device, timesteps.to(x.device))
        # EDM's c_in = 1 / sqrt(sigma^2 + 1) (Karras et al. 2022, Table 1); the input is divided by its reciprocal,
        # as diffusers' `scale_model_input` divides, for the same float32 numbers.
        inv_c_in = (sigma**2 + 1) ** 0.5
        x_in = x / inv_c_in
        i = index.get(sigma) if on_grid else None
        if i is not None:
            t = ts[i]
        elif log_table is not None:
            t = torch.tensor(float(sigma_to_t(np.array([sigma]), log_table)[0]), dtype=ts.dtype, device=x.device)
        else:
            raise InputError("the model was called at a noise level off the sampler's grid", where="sigma",
                             expected="a sigma of the plan (or a log_table)", found=sigma)
        out = denoise(x_in if model_dtype is None else x_in.to(model_dtype), t).to(x.dtype)
        if prediction_type == "epsilon":
            x0 = x - sigma * out                                          # c_skip = 1, c_out = -sigma
        elif prediction_type == "v_prediction":
            x0 = out * (-sigma / inv_c_in) + x / (sigma**2 + 1)           # c_out = -sigma c_in, c_skip = c_in^2
        else:
            x0 = out
        return x0.clamp(-clip_sample_range, clip_sample_range) if clip_sample_range is not None else x0

    return model


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma = (x - D(x; sigma)) / sigma: the probability-flow ODE (Karras et al. 2022, eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma


# ---- Euler, Euler ancestral, Heun ---------------------------------------------------------------------
def sample_euler(model: SigmaDenoiser, x: torch.Tensor, sigmas: Sequence[float], *,
                 callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 with S_churn = 0)."""
    callback = as_step_callback(callback)
    for i in progress_range(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        d = to_d(x, sigma, denoised)
        x = x + d * (sigma_next - sigma)                       # x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i
        x = after_step(callback, x, i, sigmas[i], denoised)
    return x


def ancestral_step(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """-> (sigma_down, sigma_up): go deterministically to sigma_down, then add fresh noise of std sigma_up,
    so that sigma_down^2 + sigma_up^2 = sigma_to^2 and the step has DDPM's posterior variance
    sigma_up^2 = sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2 (k-diffusion `get_ancestral_step`, eta = 1)."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def sample_euler_ancestral(model: SigmaDenoiser, x: torch.Tensor, sigmas: Sequence[float], *,
                           noise_sampler: NoiseSampler, callback: StepCallback | None = None,
                           progress: bool = False) -> torch.Tensor:
    """Ancestral sampling with Euler steps: an Euler step to sigma_down, plus noise of std sigma_up."""
    callback = as_step_callback(callback)
    for i in progress_range(len(sigmas) - 1, progress):
        sigma = sigmas[i]
        denoised = model(x, sigma)
        d = to_d(x, sigma, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigmas[i + 1])
        x = x + d * (sigma_down - sigma)
        if sigma_up > 0:                                       # 0 at the last step (sigma_to = 0): no draw
            x = x + noise_sampler(x) * sigma_up
        x = after_step(callback, x, i, sigmas[i], denoised)
    return x


def sample_heun(model: SigmaDenoiser, x: torch.Tensor, sigmas: Sequence[float], *,
                callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn): an Euler step, then
    the trapezoidal rule with the slope at its end. The last step, to sigma = 0, is an Euler step
    (Algorithm 1, line 6: the slope is undefined at sigma = 0). 2N - 1 model calls in all."""
    callback = as_step_callback(callback)
    for i in progress_range(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt                                   # Algorithm 1, line 5
            d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next))   # line 7
            x = x + ((d + d_2) / 2) * dt                       # line 8
        x = after_step(callback, x, i, sigmas[i], denoised)
    return x


# ---- linear multistep ----------------------------------------------------------------------------------
@functools.cache
def gauss_legendre_4() -> tuple[np.ndarray, np.ndarray]:
    """4-point Gauss-Legendre nodes and weights, exact for polynomials of degree <= 7. Computed on first use, so
    that `import latentdiff` does not import numpy.polynomial (its cost: benchmarks/RESULTS.md)."""
    return np.polynomial.legendre.leggauss(4)


def lms_coefficient(sigmas: Sequence[float], i: int, j: int, order: int) -> float:
    """c_j = integral from sigma_i to sigma_{i+1} of the Lagrange basis polynomial
    prod_{k != j, k < order} (tau - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k}) d tau (k-diffusion
    `linear_multistep_coeff`). The integrand has degree order - 1 <= 3, so 4-point Gauss-Legendre
    quadrature is exact (up to rounding)."""
    a, b = sigmas[i], sigmas[i + 1]
    nodes, weights = gauss_legendre_4()
    taus = (b - a) / 2 * nodes + (a + b) / 2
    basis = np.ones_like(taus)
    for k in range(order):
        if k != j:
            basis *= (taus - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((b - a) / 2 * np.dot(weights, basis))


def sample_lms(model: SigmaDenoiser, x: torch.Tensor, sigmas: Sequence[float], *, order: int = 4,
               callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth on the sigma grid, Karras et al. 2022 / k-diffusion `sample_lms`):
    x_{i+1} = x_i + sum_j c_j d_{i-j} over the last min(i + 1, order) slopes, one model call per step."""
    callback = as_step_callback(callback)
    ds: list[torch.Tensor] = []
    for i in progress_range(len(sigmas) - 1, progress):
        sigma = sigmas[i]
        denoised = model(x, sigma)
        ds = (ds + [to_d(x, sigma, denoised)])[-order:]
        current = min(i + 1, order)
        coefficients = [lms_coefficient(sigmas, i, j, current) for j in range(current)]   # len(ds) == current
        x = x + sum(c * d for c, d in zip(coefficients, reversed(ds), strict=True))
        x = after_step(callback, x, i, sigmas[i], denoised)
    return x


# ---- DPM-Solver++ (multistep) --------------------------------------------------------------------------
def dpm_solver_order(i: int, n: int, *, solver_order: int, lower_order_final: bool, euler_at_final: bool,
                     final_sigma_is_zero: bool) -> int:
    """The order of step i of n: 1 for the first step (no history yet) and, as diffusers, for the last when
    `euler_at_final`, or `lower_order_final` with n < 15 (stabler for few steps), or the final sigma is 0."""
    if solver_order == 1 or i == 0:
        return 1
    if i == n - 1 and (euler_at_final or (lower_order_final and n < 15) or final_sigma_is_zero):
        return 1
    return 2


def sample_dpmpp_2m(model: SigmaDenoiser, x: torch.Tensor, sigmas: Sequence[float], *, solver_order: int = 2,
                    solver_type: str = "midpoint", lower_order_final: bool = True, euler_at_final: bool = False,
                    noise_sampler: NoiseSampler | None = None, interval_noise: IntervalNoise | None = None,
                    callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) in sigma form; with a `noise_sampler`,
    SDE-DPM-Solver++(2M) (their sec. 5 / k-diffusion `sample_dpmpp_2m_sde`, eta = 1).

    With lambda = -log sigma and h = lambda_{i+1} - lambda_i, D_0 = D(x_i; sigma_i) and the backward
    difference D_1 = (D_0 - D_prev) / r, r = h_prev / h:
      ODE: x_{i+1} = (sigma_{i+1}/sigma_i) x_i - (e^-h - 1) D_0 + c D_1
      SDE: x_{i+1} = (sigma_{i+1}/sigma_i) e^-h x_i + (1 - e^-2h) D_0 + c' D_1 + sigma_{i+1} sqrt(1 - e^-2h) z
    with c = -(e^-h - 1)/2, c' = (1 - e^-2h)/2 ("midpoint") or c = (e^-h - 1)/h + 1, c' = (1 - e^-2h)/(-2h) + 1
    ("heun"); first-order steps drop the D_1 term (DPM-Solver++(1) is DDIM). `interval_noise` (SDE; instead of
    noise_sampler): z = interval_noise(sigma_i, sigma_{i+1}), a Brownian tree's (k-diffusion's 2M SDE).
    """
    callback = as_step_callback(callback)
    n, old_denoised, h_prev = len(sigmas) - 1, None, None
    for i in progress_range(n, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        order = dpm_solver_order(i, n, solver_order=solver_order, lower_order_final=lower_order_final,
                                 euler_at_final=euler_at_final, final_sigma_is_zero=sigmas[-1] == 0)
        if sigma_next == 0:        # h = inf: every update above reduces to x_{i+1} = D_0
            x, h = denoised, math.inf
        elif sigma_next == sigma:  # h = 0 (a "sigma_min" final sigma equal to the last one): x stays
            h = 0.0
        else:
            h = math.log(sigma / sigma_next)
            step_noise = noise_sampler if interval_noise is None else _fixed(interval_noise(sigma, sigma_next))
            x = _dpmpp_update(x, denoised, old_denoised, sigma, sigma_next, h, h_prev if order == 2 else None,
                              solver_type, step_noise)
        old_denoised, h_prev = denoised, h
        x = after_step(callback, x, i, sigmas[i], denoised)
    return x


def _dpmpp_update(x: torch.Tensor, d0: torch.Tensor, d_prev: torch.Tensor | None, sigma: float, sigma_next: float,
                  h: float, h_prev: float | None, solver_type: str, noise_sampler: NoiseSampler | None) -> torch.Tensor:
    """One DPM-Solver++ step of order 2 (h_prev given) or 1; SDE when a noise_sampler is given."""
    if noise_sampler is None:
        x_next = (sigma_next / sigma) * x - math.expm1(-h) * d0
        c_mid, c_heun = -math.expm1(-h) / 2, math.expm1(-h) / h + 1
    else:
        phi = -math.expm1(-2 * h)                              # 1 - e^-2h
        x_next = (sigma_next / sigma * math.exp(-h)) * x + phi * d0 + (sigma_next * phi**0.5) * noise_sampler(x)
        c_mid, c_heun = phi / 2, phi / (-2 * h) + 1
    if h_prev is not None and d_prev is not None:    # order 2: both set together
        d1 = (d0 - d_prev) * (h / h_prev)                      # (D_0 - D_prev) / r
        x_next = x_next + (c_mid if solver_type == "midpoint" else c_heun) * d1
    return x_next


def _fixed(z: torch.Tensor) -> NoiseSampler:
    """A noise sampler returning z (the step's Brownian increment) where the update asks for noise like x."""
    return lambda x: z
