"""Samplers of the reverse process as pure functions (in the manner of k-diffusion's `sampling.py`).

A sampler loop is `sample_x(denoise, x, timesteps, alphas_cumprod, ...)`: `denoise(x_t, t)` is any
callable returning the model's raw prediction (epsilon, v or x0, see `model_output_to_x0_eps`);
guidance and model adapters are wrappers around it, never branches in here. Nothing keeps state
between calls, so one set of settings can serve many threads.

Notation (Song et al. 2021, "Denoising Diffusion Implicit Models"): abar_t is the cumulative product
alpha-bar of the forward process (their alpha_t), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
A sampling plan is the descending list of timesteps t_1 > ... > t_N and the N + 1 values
abar(t_1), ..., abar(t_N), abar_final: step i goes from t_i to t_{i+1} (the next entry of the list,
whatever the spacing), the last step to the "final" abar (1, or abar_0 for DDIM without
`set_alpha_to_one`). The abar values are Python floats: the coefficients of each step are computed on
the host in float64 once, so a step launches no extra device work and never synchronises.

A loop started part-way (image-to-image, inpainting) is the same loop over the tail of a plan: the
multistep methods start with an empty history there, as at t_1.

Every loop calls `callback(i, t_i, x, denoised)` after step i with the new sample x and the step's x0 prediction
(`base.StepCallback`; an (i, t, x) callback is called without it); a tensor the callback returns replaces x for the
following steps (inpainting's blend of the known region), None leaves x as it is.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import InputError
from ..schedules import model_output_to_x0_eps
from .base import Denoiser, NoiseSampler, StepCallback, after_step, as_step_callback, progress_range


# ---- one step -------------------------------------------------------------------------------------
def ddim_sigma(abar_t: float, abar_prev: float, eta: float) -> float:
    """sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (Song et al. 2021, eq. 16).

    eta = 0 is DDIM (deterministic), eta = 1 the DDPM posterior variance.
    """
    return eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5


def ddim_step(x0_pred: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_prev: float, *, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM update x_t -> x_prev (Song et al. 2021, eq. 12):

        x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t z

    x0_pred, eps: (B, C, H, W) from `model_output_to_x0_eps`; `noise` z is needed when eta > 0.
    """
    sigma = ddim_sigma(abar_t, abar_prev, eta)
    # max(0, .): 1 - abar_prev - sigma^2 >= 0 in exact arithmetic (it is 0 for eta = 1 and abar_prev = 1).
    x_prev = abar_prev**0.5 * x0_pred + max(1 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
    if sigma > 0:
        if noise is None:
            raise InputError("a DDIM step with eta > 0 needs noise", where="noise", expected="a tensor like x_t",
                             found=None)
        x_prev = x_prev + sigma * noise
    return x_prev


def ddpm_step(x_t: torch.Tensor, x0_pred: torch.Tensor, abar_t: float, abar_prev: float, *,
              variance_type: str = "fixed_small", noise: torch.Tensor | None = None) -> torch.Tensor:
    """One ancestral step x_t -> x_prev ~ q(x_prev | x_t, x0_pred) (Ho et al. 2020, eqs. 6-7).

    With beta = 1 - abar_t / abar_prev (the beta of the whole stride, for strided sampling):
        mean = sqrt(abar_prev) beta / (1 - abar_t) x0_pred + sqrt(1 - beta) (1 - abar_prev) / (1 - abar_t) x_t
        variance = (1 - abar_prev) / (1 - abar_t) beta  ("fixed_small", beta-tilde)  or  beta  ("fixed_large")
    `noise` None gives the mean (used for the last step, as in the paper's Algorithm 2: z = 0 at t = 1).
    """
    alpha = abar_t / abar_prev
    beta = 1 - alpha
    mean = (abar_prev**0.5 * beta / (1 - abar_t)) * x0_pred + (alpha**0.5 * (1 - abar_prev) / (1 - abar_t)) * x_t
    if noise is None:
        return mean
    if variance_type == "fixed_small":
        variance = (1 - abar_prev) / (1 - abar_t) * beta
    elif variance_type == "fixed_large":
        variance = beta
    else:
        raise InputError("unknown DDPM variance type", where="variance_type",
                         expected=["fixed_small", "fixed_large"], found=repr(variance_type))
    return mean + variance**0.5 * noise


# ---- sampler loops --------------------------------------------------------------------------------
def sample_ddim(denoise: Denoiser, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: Sequence[float], *,
                prediction_type: str = "epsilon", eta: float = 0.0, clip_sample_range: float | None = None,
                noise_sampler: NoiseSampler | None = None, callback: StepCallback | None = None,
                progress: bool = False) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) from x = x_T (B, C, H, W) to x_0.

    timesteps: t_1 > ... > t_N; alphas_cumprod: the N + 1 floats abar(t_1) .. abar(t_N), abar_final.
    denoise(x_t, t) gets t as a 0-d int64 tensor on x's device. `clip_sample_range` clamps x0_pred
    (the model's eps is still used for the direction, as diffusers does by default). With eta > 0 a
    noise z is drawn at every step from `noise_sampler(x)` (default: the global RNG).
    callback(i, t_i, x, denoised) is called after step i with the new sample and x0_pred; a tensor it returns
    replaces x.
    """
    check_plan(timesteps, alphas_cumprod)
    callback = as_step_callback(callback)
    sample_noise: NoiseSampler = noise_sampler or torch.randn_like    # drawn only when eta > 0
    ts = torch.tensor(list(timesteps), dtype=torch.long, device=x.device)  # one copy, not one per step
    for i in progress_range(len(timesteps), progress):
        abar_t, abar_prev = alphas_cumprod[i], alphas_cumprod[i + 1]
        x0_pred, eps = model_output_to_x0_eps(denoise(x, ts[i]), x, abar_t, prediction_type)
        if clip_sample_range is not None:
            x0_pred = x0_pred.clamp(-clip_sample_range, clip_sample_range)
        noise = sample_noise(x) if eta > 0 else None
        x = ddim_step(x0_pred, eps, abar_t, abar_prev, eta=eta, noise=noise)
        x = after_step(callback, x, i, int(timesteps[i]), x0_pred)
    return x


def sample_ddpm(denoise: Denoiser, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: Sequence[float], *,
                prediction_type: str = "epsilon", variance_type: str = "fixed_small",
                clip_sample_range: float | None = None, noise_sampler: NoiseSampler | None = None,
                callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2), strided over `timesteps`, from x = x_T to x_0.

    Arguments as `sample_ddim` (abar_final is 1 for DDPM). Noise is drawn at every step but the last,
    where the posterior is a point mass at the mean (Algorithm 2: z = 0 for the final step).
    """
    check_plan(timesteps, alphas_cumprod)
    callback = as_step_callback(callback)
    noise_sampler = noise_sampler or torch.randn_like
    ts = torch.tensor(list(timesteps), dtype=torch.long, device=x.device)
    last = len(timesteps) - 1
    for i in progress_range(len(timesteps), progress):
        abar_t, abar_prev = alphas_cumprod[i], alphas_cumprod[i + 1]
        x0_pred, _ = model_output_to_x0_eps(denoise(x, ts[i]), x, abar_t, prediction_type)
        if clip_sample_range is not None:
            x0_pred = x0_pred.clamp(-clip_sample_range, clip_sample_range)
        noise = noise_sampler(x) if i < last else None
        x = ddpm_step(x, x0_pred, abar_t, abar_prev, variance_type=variance_type, noise=noise)
        x = after_step(callback, x, i, int(timesteps[i]), x0_pred)
    return x


# Adams-Bashforth coefficients of the linear multistep method on eps (Liu et al. 2022, eq. 12), by the
# number of eps available (newest first): order 1 .. 4.
PLMS_COEFFICIENTS: tuple[tuple[float, ...], ...] = (
    (1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def plms_eps(eps_history: Sequence[torch.Tensor]) -> torch.Tensor:
    """eps' = sum_j c_j eps_{i-j} over the last k <= 4 predictions (oldest first in `eps_history`):
    (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24 with four (Liu et al. 2022, eq. 12), fewer below."""
    coefficients = PLMS_COEFFICIENTS[len(eps_history) - 1]
    terms = [c * e for c, e in zip(coefficients, reversed(eps_history), strict=True)]   # one c per eps
    return sum(terms[1:], terms[0])


def plms_transfer(x_t: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_prev: float) -> torch.Tensor:
    """The transfer phi(x_t, eps, t, t_prev) of PNDM (Liu et al. 2022, eq. 11): the deterministic DDIM step
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps with x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    x0_pred, _ = model_output_to_x0_eps(eps, x_t, abar_t, "epsilon")
    return ddim_step(x0_pred, eps, abar_t, abar_prev)


def sample_plms(denoise: Denoiser, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: Sequence[float], *,
                prediction_type: str = "epsilon", callback: StepCallback | None = None,
                progress: bool = False) -> torch.Tensor:
    """PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models", sec. 3.3), as the latent
    diffusion repository runs it: the first step is a pseudo improved-Euler step (two model calls: at x_t
    and at its DDIM guess at t_{i+1}); later steps combine the last 2, 3, then 4 eps (eq. 12), one call each.

    Arguments as `sample_ddim`; every prediction type is turned into eps first (the method is on eps). The
    callback's `denoised` is the x0 the model's prediction at (x_t, t_i) implies.
    """
    check_plan(timesteps, alphas_cumprod)
    callback = as_step_callback(callback)
    ts = torch.tensor(list(timesteps), dtype=torch.long, device=x.device)
    n = len(timesteps)
    eps_history: list[torch.Tensor] = []
    for i in progress_range(n, progress):
        abar_t, abar_prev = alphas_cumprod[i], alphas_cumprod[i + 1]
        x0_pred, eps = model_output_to_x0_eps(denoise(x, ts[i]), x, abar_t, prediction_type)
        if not eps_history and i + 1 < n:
            x_guess = plms_transfer(x, eps, abar_t, abar_prev)
            _, eps_next = model_output_to_x0_eps(denoise(x_guess, ts[i + 1]), x_guess, abar_prev, prediction_type)
            eps_prime = (eps + eps_next) / 2              # improved Euler: the mean slope of the step
        else:
            eps_prime = plms_eps(eps_history + [eps])     # the warm-up's second eps is not kept, as in LDM
        eps_history = (eps_history + [eps])[-3:]
        x = plms_transfer(x, eps_prime, abar_t, abar_prev)
        x = after_step(callback, x, i, int(timesteps[i]), x0_pred)
    return x


def check_plan(timesteps: Sequence[int], alphas_cumprod: Sequence[float]) -> None:
    if len(timesteps) < 1 or len(alphas_cumprod) != len(timesteps) + 1:
        raise InputError("a sampling plan needs N >= 1 timesteps and N + 1 alphas_cumprod values",
                         where="alphas_cumprod", expected=f"{len(timesteps) + 1} values (abar_final last)",
                         found=f"{len(timesteps)} timesteps, {len(alphas_cumprod)} values")
