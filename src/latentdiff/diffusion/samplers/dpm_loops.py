"""The DPM-Solver family of k-diffusion's `sampling.py` beyond 2M, as pure loops on sigmas (the conventions of
`sigma_loops`: model(x, sigma) -> D(x; sigma), N + 1 Python-float sigmas, callback(i, sigma_i, x, denoised)).

    sample_dpm_2             DPM2: a midpoint step in log sigma (Lu et al. 2022, "DPM-Solver", DPM-Solver-2 with
                             Karras et al.'s parametrisation), 2N - 1 model calls
    sample_dpm_2_ancestral   DPM2 a: the same step to sigma_down, plus fresh noise of std sigma_up
    sample_dpmpp_2s_ancestral  DPM++ 2S a: DPM-Solver++(2S) (Lu et al. 2022, "DPM-Solver++", Alg. 1) to sigma_down,
                             plus noise
    sample_dpmpp_sde         DPM++ SDE: two stochastic DPM-Solver++ substeps per step (k-diffusion `sample_dpmpp_sde`)
    sample_dpmpp_3m_sde      DPM++ 3M SDE: third-order multistep SDE-DPM-Solver++ (k-diffusion `sample_dpmpp_3m_sde`)

`midpoint_model` (default: model) is called at the intermediate noise levels of a step, which are not on the grid
(the sampler classes pass the network adapter's off-grid form: fractional timesteps there, as diffusers). The
stochastic loops take k-diffusion's interval noise, `noise(sigma, sigma_next) -> z` standard normal like x:
`brownian.BrownianNoise` (a Brownian tree) or, for fresh Gaussian noise, `gaussian_interval_noise`. With
lambda = -log sigma (the half log-SNR of the variance-exploding process), a DPM-Solver++ first-order step from sigma
to sigma' is x' = (sigma'/sigma) x - (e^-h - 1) D, h = lambda' - lambda: `_dpmpp_1`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import IntervalNoise, NoiseSampler, StepCallback, after_step, as_step_callback, progress_range
from .sigma_loops import SigmaDenoiser, ancestral_step, to_d


def gaussian_interval_noise(noise_sampler: NoiseSampler, x: torch.Tensor) -> IntervalNoise:
    """k-diffusion's interval noise from a plain `noise_sampler(x)`: fresh noise like x at every call."""
    return lambda sigma, sigma_next: noise_sampler(x)


def _dpmpp_1(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_to: float) -> torch.Tensor:
    """One first-order DPM-Solver++ step (DDIM in sigma form): x' = (sigma_to/sigma) x - (e^-h - 1) D."""
    return (sigma_to / sigma) * x - math.expm1(-math.log(sigma / sigma_to)) * denoised


def _dpm_2_step(model: SigmaDenoiser, x: torch.Tensor, d: torch.Tensor, sigma: float,
                sigma_to: float) -> torch.Tensor:
    """DPM-Solver-2 in Karras et al.'s form: an Euler half step to the log-midpoint sigma_mid = sqrt(sigma sigma_to),
    then the whole step with the slope there."""
    sigma_mid = math.sqrt(sigma * sigma_to)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid))
    return x + d_2 * (sigma_to - sigma)


def sample_dpm_2(model: SigmaDenoiser, x: torch.Tensor, sigmas: Sequence[float], *,
                 midpoint_model: SigmaDenoiser | None = None,
                 callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
    """DPM2 (k-diffusion `sample_dpm_2` without churn; diffusers KDPM2DiscreteScheduler): `_dpm_2_step` to each
    sigma, an Euler step to sigma = 0 (the midpoint would be 0). 2N - 1 model calls."""
    callback, mid = as_step_callback(callback), midpoint_model or model
    for i in progress_range(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        d = to_d(x, sigma, denoised)
        x = x + d * (sigma_next - sigma) if sigma_next == 0 else _dpm_2_step(mid, x, d, sigma, sigma_next)
        x = after_step(callback, x, i, sigma, denoised)
    return x


def sample_dpm_2_ancestral(model: SigmaDenoiser, x: torch.Tensor, sigmas: Sequence[float], *,
                           noise_sampler: IntervalNoise, midpoint_model: SigmaDenoiser | None = None,
                           callback: StepCallback | None = None,
                           progress: bool = False) -> torch.Tensor:
    """DPM2 a (k-diffusion `sample_dpm_2_ancestral`, eta = 1; diffusers KDPM2AncestralDiscreteScheduler): the DPM2
    step to sigma_down, then noise of std sigma_up (`sigma_loops.ancestral_step`)."""
    callback, mid = as_step_callback(callback), midpoint_model or model
    for i in progress_range(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            x = _dpm_2_step(mid, x, d, sigma, sigma_down) + noise_sampler(sigma, sigma_next) * sigma_up
        x = after_step(callback, x, i, sigma, denoised)
    return x


def sample_dpmpp_2s_ancestral(model: SigmaDenoiser, x: torch.Tensor, sigmas: Sequence[float], *,
                              noise_sampler: IntervalNoise, midpoint_model: SigmaDenoiser | None = None,
                              callback: StepCallback | None = None,
                              progress: bool = False) -> torch.Tensor:
    """DPM++ 2S a (k-diffusion `sample_dpmpp_2s_ancestral`, eta = 1): DPM-Solver++(2S) with r = 1/2 to sigma_down,
    i.e. a first-order step to sigma_s = sqrt(sigma sigma_down) (lambda halfway) and the whole step with D there
    (Lu et al. 2022, "DPM-Solver++", Algorithm 1), then noise of std sigma_up; an Euler step to sigma = 0."""
    callback, mid = as_step_callback(callback), midpoint_model or model
    for i in progress_range(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            sigma_s = math.sqrt(sigma * sigma_down)
            x_2 = _dpmpp_1(x, denoised, sigma, sigma_s)
            x = _dpmpp_1(x, mid(x_2, sigma_s), sigma, sigma_down)
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_up
        x = after_step(callback, x, i, sigma, denoised)
    return x


def sample_dpmpp_sde(model: SigmaDenoiser, x: torch.Tensor, sigmas: Sequence[float], *,
                     noise_sampler: IntervalNoise, r: float = 0.5, midpoint_model: SigmaDenoiser | None = None,
                     callback: StepCallback | None = None,
                     progress: bool = False) -> torch.Tensor:
    """DPM++ SDE (k-diffusion `sample_dpmpp_sde`, eta = 1; diffusers DPMSolverSDEScheduler for r = 1/2): per step,
    with lambda = -log sigma and h = lambda_{i+1} - lambda_i, an ancestral first-order step to the noise level of
    lambda_i + r h (sigma_s), then an ancestral first-order step from x_i to sigma_{i+1} with
    D = (1 - 1/2r) D(x_i) + 1/2r D(x_s) (r = 1/2: the second prediction alone). An Euler step to sigma = 0.
    2N - 1 model calls; noise(sigma_i, sigma_s) and noise(sigma_i, sigma_{i+1}) per step."""
    callback, mid = as_step_callback(callback), midpoint_model or model
    for i in progress_range(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
        else:
            lam, h = -math.log(sigma), math.log(sigma / sigma_next)
            sigma_s = math.exp(-(lam + h * r))
            down, up = ancestral_step(sigma, sigma_s)
            x_2 = _dpmpp_1(x, denoised, sigma, down) + noise_sampler(sigma, sigma_s) * up
            fac = 1 / (2 * r)
            denoised_d = (1 - fac) * denoised + fac * mid(x_2, sigma_s)
            down, up = ancestral_step(sigma, sigma_next)
            x = _dpmpp_1(x, denoised_d, sigma, down) + noise_sampler(sigma, sigma_next) * up
        x = after_step(callback, x, i, sigma, denoised)
    return x


def sample_dpmpp_3m_sde(model: SigmaDenoiser, x: torch.Tensor, sigmas: Sequence[float], *,
                        noise_sampler: IntervalNoise, callback: StepCallback | None = None,
                        progress: bool = False) -> torch.Tensor:
    """DPM++ 3M SDE (k-diffusion `sample_dpmpp_3m_sde`, eta = 1): the first-order SDE-DPM-Solver++ step
    x' = e^-2h x + (1 - e^-2h) D_0 (e^-2h = (sigma'/sigma) e^-h, the 2M SDE step), plus the backward differences of
    the last two predictions (second and third order, from the third step on) weighted by
    phi_2 = (e^-h_eta - 1)/h_eta + 1 and phi_3 = phi_2/h_eta - 1/2, plus sigma' sqrt(1 - e^-2h) z. The last step
    (to sigma = 0) returns D."""
    callback = as_step_callback(callback)
    d_1: torch.Tensor | None = None
    d_2: torch.Tensor | None = None
    h_1: float | None = None
    h_2: float | None = None
    for i in progress_range(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        h: float | None = None
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            h_eta = 2 * h
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None and d_1 is not None and d_2 is not None and h_1 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None and d_1 is not None:
                x = x + phi_2 * ((denoised - d_1) / (h_1 / h))
            x = x + noise_sampler(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * h)))
        d_1, d_2, h_1, h_2 = denoised, d_1, h, h_1
        x = after_step(callback, x, i, sigma, denoised)
    return x
