"""Noise schedules of the forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): pure math.

Ho et al. 2020 (DDPM) define the forward process by a variance schedule beta_1..beta_T; with
alpha_t = 1 - beta_t and abar_t = prod_{s<=t} alpha_s (`alphas_cumprod`), x_t can be drawn from x_0 in
one step. The functions here build beta schedules and derived quantities (SNR, and the x0 / eps that a
model's prediction implies at x_t), nothing else: no state, no devices, no models.

Every schedule is computed with the same float32 torch operations diffusers uses, in the same order,
so that a model trained with diffusers' schedulers sees bit-identical abar_t here: the schedule is
part of what a checkpoint was trained for.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from .. import limits
from ..errors import ConfigError, InputError

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_t evenly spaced from beta_start to beta_end (Ho et al. 2020, sec. 4). -> (T,) float32."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """sqrt(beta_t) evenly spaced (the latent-diffusion / Stable Diffusion schedule). -> (T,) float32."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def squaredcos_cap_v2_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule of Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2((t/T + s)/(1 + s) * pi/2), s = 0.008.

    beta_t = 1 - abar(t)/abar(t-1), capped at `max_beta` to avoid the singularity at t = T (their sec. 3.2).
    Computed in Python floats, then rounded to float32, exactly as diffusers' `betas_for_alpha_bar`.
    """
    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(beta_schedule: str, num_train_timesteps: int, *, beta_start: float, beta_end: float,
               trained_betas: Sequence[float] | None = None) -> torch.Tensor:
    """The (T,) float32 betas of a named schedule; `trained_betas`, when given, are used as they are."""
    limits.check_count(num_train_timesteps, key="num_train_timesteps", at_least=1,
                       at_most=limits.MAX_TRAIN_TIMESTEPS, where="num_train_timesteps")
    if trained_betas is not None:
        return torch.tensor(list(trained_betas), dtype=torch.float32)
    if beta_schedule == "linear":
        return linear_betas(num_train_timesteps, beta_start, beta_end)
    if beta_schedule == "scaled_linear":
        return scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
    if beta_schedule == "squaredcos_cap_v2":
        return squaredcos_cap_v2_betas(num_train_timesteps)
    raise ConfigError("unknown beta schedule", where="beta_schedule", expected=list(BETA_SCHEDULES),
                      found=repr(beta_schedule))


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that the last step has zero SNR (Lin et al. 2023, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", Algorithm 1).

    sqrt(abar) is shifted so that its last value is 0 and scaled so that its first value is unchanged;
    a model trained on the result sees pure noise at t = T - 1, as it does at inference. Only
    v-prediction (or x0-prediction) can be sampled from it: epsilon prediction divides by sqrt(abar_T) = 0.
    betas: (T,) -> (T,), same dtype; the last beta is exactly 1.
    """
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))   # Algorithm 1, lines 4-8
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])  # undo the cumulative product
    return 1 - alphas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, sec. 2). (T,) -> (T,), same dtype."""
    return torch.cumprod(1.0 - betas, dim=0)


def signal_to_noise_ratio(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021, eq. 1 with alpha^2 = abar, sigma^2 = 1 - abar)."""
    return alphas_cumprod / (1 - alphas_cumprod)


def check_betas(betas: torch.Tensor, *, where: str) -> None:
    """Every beta must lie in (0, 1]: beta = 0 makes a step a no-op, beta > 1 a negative variance."""
    if betas.ndim != 1 or betas.numel() == 0:
        raise ConfigError("betas must be a non-empty 1-D sequence", where=where, expected="(T,)",
                          found=tuple(betas.shape))
    bad = ((betas <= 0) | (betas > 1) | ~torch.isfinite(betas)).nonzero().flatten().tolist()
    if bad:
        raise ConfigError("every beta must lie in (0, 1]", where=where, expected="0 < beta_t <= 1",
                          found=f"beta[{bad[0]}] = {float(betas[bad[0]])}")


def model_output_to_x0_eps(model_output: torch.Tensor, x_t: torch.Tensor, abar_t: float | torch.Tensor,
                           prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (x0_pred, eps): the clean sample and the noise that the model's prediction implies at x_t.

    epsilon (Ho et al. 2020):        x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    v_prediction (Salimans & Ho 2022, v = sqrt(abar) eps - sqrt(1 - abar) x0):
                                     x0 = sqrt(abar) x_t - sqrt(1 - abar) v,  eps = sqrt(abar) v + sqrt(1 - abar) x_t
    sample:                          eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
    model_output, x_t: (B, C, H, W); abar_t: a float, or a tensor broadcastable to x_t.
    """
    alpha, sigma = abar_t**0.5, (1 - abar_t) ** 0.5
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output, alpha * model_output + sigma * x_t
    if prediction_type == "sample":
        return model_output, (x_t - alpha * model_output) / sigma
    raise InputError("unknown prediction type", where="prediction_type", expected=list(PREDICTION_TYPES),
                     found=repr(prediction_type))
