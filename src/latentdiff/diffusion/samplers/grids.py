"""The grids samplers walk: the timesteps of every sampler (`timestep_grid`, one function for the three kinds of
diffusers grid), and the noise levels of the sigma-space samplers (Euler, Heun, LMS, DPM-Solver). Pure math on the
host.

A discrete DDPM-family model trained on abar_t is also a denoiser of the variance-exploding process
x = x_0 + sigma n with sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", sec. 2 and app. C.1; k-diffusion's `DiscreteSchedule`). An
N-step sampler walks a descending grid sigma_0 > ... > sigma_{N-1} and a final sigma_N (0, or the
smallest trained sigma), and calls the model at each sigma_i with the timestep t_i that has this noise
level (a fractional t where the grid falls between trained timesteps).

Every grid is built with the numpy / float32 torch operations of diffusers 0.42's scheduler of the
same name, in the same order, so sigmas and timesteps agree bit for bit: a sampler is part of what
makes a seed reproduce an image. Each function names the diffusers method it mirrors.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from ...errors import InputError
from .base import TIMESTEP_SPACINGS, check_num_inference_steps

# Where a zero-terminal-SNR schedule has abar_{T-1} = 0 (sigma = inf), diffusers' Euler / DPM-Solver
# schedulers put the smallest positive float16 subnormal, so that the first sigma is finite (4096).
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24
KARRAS_RHO = 7.0   # Karras et al. 2022, eq. 5 and Table 1


def sigma_table(alphas_cumprod: torch.Tensor, *, zero_terminal_snr: bool = False) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0 .. T-1: (T,) float32, increasing in t.

    alphas_cumprod: (T,) float32 CPU. `zero_terminal_snr`: replace abar_{T-1} = 0 by 2^-24 first.
    """
    abar = alphas_cumprod.detach().to("cpu", torch.float32).clone()
    if zero_terminal_snr:
        abar[-1] = ZERO_SNR_ALPHA_CUMPROD
    return (((1 - abar) / abar) ** 0.5).numpy()


GridKind = Literal["discrete", "euler", "dpm_solver"]
GRID_KINDS: tuple[str, ...] = ("discrete", "euler", "dpm_solver")


def timestep_grid(num_train_timesteps: int, num_inference_steps: int, *, kind: GridKind = "discrete",
                  spacing: str = "leading", steps_offset: int = 0, last_timestep: int | None = None) -> np.ndarray:
    """The N descending training timesteps an N-step sampler visits (Lin et al. 2023, Table 2), as the diffusers
    0.42 scheduler of each `kind` builds them with numpy (so round-half-to-even ties fall the same way):

    "leading":  k (T' // P) + steps_offset for k = P-1 .. 0 (DDIM's original grid; SD uses offset 1)
    "trailing": round(T' - k T / N) - 1 for k = 0 .. N-1 (starts at T - 1: the zero-SNR step)
    "linspace": round(linspace(0, T' - 1, P)) reversed

    kind "discrete" (DDIM, DDPM, PNDM) and "euler" (Euler, Heun, LMS): P = N points over T' = T; "euler" keeps its
    float32 "linspace" grid unrounded (fractional timesteps). "dpm_solver" (DPMSolverMultistepScheduler): P = N + 1
    points over T' = `last_timestep` (default T; see `lambda_clipped_last_timestep`), the final t = 0 dropped.
    -> (N,) int64 ("discrete", "dpm_solver") or float32 ("euler"). Unlike diffusers, "trailing" never yields
    N + 1 steps (numpy's float `arange` does for e.g. T = 1000, N = 61, ending in timestep -1).
    """
    T, N = num_train_timesteps, check_num_inference_steps(num_inference_steps, num_train_timesteps)
    if kind not in GRID_KINDS:
        raise InputError("unknown timestep grid kind", where="kind", expected=list(GRID_KINDS), found=repr(kind))
    last = T if last_timestep is None or kind != "dpm_solver" else last_timestep
    points = N + 1 if kind == "dpm_solver" else N
    if spacing == "linspace" and kind == "euler":
        timesteps = np.linspace(0, T - 1, N, dtype=np.float32)[::-1]
    elif spacing == "linspace":
        timesteps = np.linspace(0, last - 1, points).round()[::-1][:N]
    elif spacing == "leading":
        timesteps = (np.arange(0, points) * (last // points)).round()[::-1][:N] + steps_offset
    elif spacing == "trailing":
        timesteps = np.arange(last, 0, -T / N).round()[:N] - 1
    else:
        raise InputError("unknown timestep spacing", where="timestep_spacing", expected=list(TIMESTEP_SPACINGS),
                         found=repr(spacing))
    timesteps = timesteps.astype(np.float32 if kind == "euler" else np.int64)   # a copy: no view of a reversal
    if timesteps[0] >= T:
        raise InputError(f"steps_offset {steps_offset} pushes the first timestep past the training range",
                         where="steps_offset", expected=f"timesteps < num_train_timesteps = {T}",
                         found=f"first timestep {timesteps[0]} for {len(timesteps)} steps")
    if kind == "dpm_solver" and (len(timesteps) != N or (N > 1 and not (np.diff(timesteps) < 0).all())):
        raise InputError(f"{N} steps do not fit the {spacing!r} grid of this schedule (timesteps would repeat)",
                         where="num_inference_steps", expected=f"fewer steps than {last}", found=N)
    return timesteps


def lambda_clipped_last_timestep(alphas_cumprod: torch.Tensor, lambda_min_clipped: float, *,
                                 zero_terminal_snr: bool = False) -> int:
    """T minus the number of timesteps whose half log-SNR lambda_t = log(alpha_t / sigma_t) lies below
    `lambda_min_clipped` (DPM-Solver's clipping for the cosine schedule; -inf clips nothing)."""
    abar = alphas_cumprod.detach().to("cpu", torch.float32).clone()
    if zero_terminal_snr:
        abar[-1] = ZERO_SNR_ALPHA_CUMPROD
    lambdas = torch.log(torch.sqrt(abar)) - torch.log(torch.sqrt(1 - abar))
    clipped = torch.searchsorted(torch.flip(lambdas, [0]), lambda_min_clipped)
    return len(abar) - int(clipped)


SIGMA_INTERPOLATIONS: tuple[str, ...] = ("linear", "log")


def interpolate_sigmas(timesteps: np.ndarray, table: np.ndarray, *, log: bool = False) -> np.ndarray:
    """sigma(t) interpolated in the (T,) table at (possibly fractional) timesteps: linearly in sigma (diffusers'
    Euler family), or with `log` linearly in log sigma, in float32 as k-diffusion's `DiscreteSchedule.t_to_sigma`
    computes it (A1111's "Uniform" grid: `get_sigmas`). -> float64."""
    if not log:
        return np.interp(timesteps, np.arange(0, len(table)), table)
    t, log_table = torch.as_tensor(np.asarray(timesteps, dtype=np.float32)), torch.from_numpy(table).float().log()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_table[low] + w * log_table[high]).exp().double().numpy()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0 .. n-1
    (Karras et al. 2022, eq. 5): steps shrink towards sigma_min, where they matter most. -> (n,) float64."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas evenly spaced in log sigma from sigma_max to sigma_min (k-diffusion's
    `get_sigmas_exponential`). -> (n,) float64."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """The fractional timestep of each sigma: linear interpolation of log sigma between the two trained
    timesteps around it (k-diffusion's `DiscreteSchedule.sigma_to_t`; diffusers' `_sigma_to_t`).

    sigmas: (n,); log_table: (T,) float32 log sigma_t. -> (n,) float64 in [0, T - 1].
    """
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_table[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_table.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_table[low_idx], log_table[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigmas))


def init_noise_sigma(sigmas: np.ndarray, spacing: str) -> float:
    """The standard deviation diffusers' Euler / Heun / LMS schedulers give x_T: sigma_max for "linspace" and
    "trailing" grids, sqrt(sigma_max^2 + 1) for "leading" (the exact variance of x_T / sqrt(abar) is the latter;
    diffusers keeps the former for the grids that start at t = T - 1, and so do we, for parity)."""
    sigma_max = torch.from_numpy(np.asarray(sigmas, dtype=np.float32)).max()
    return float(sigma_max if spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5)


# ---- the schedules of A1111 / ComfyUI ("Schedule type") -----------------------------------------------
# Align Your Steps (Sabour, Fidler & Kreis 2024, "Align Your Steps: Optimizing Sampling Schedules in Diffusion
# Models"): NVIDIA's published 10-step noise levels (11 sigmas, sigma_max first) for Stable Diffusion 1.5 and SDXL,
# as given on the paper's page (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html).
AYS_SIGMAS: dict[str, tuple[float, ...]] = {
    "sd15": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
             0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
}
AYS_MODELS: tuple[str, ...] = tuple(AYS_SIGMAS)
TABLE_SCHEDULES: tuple[str, ...] = ("sgm_uniform", "simple", "beta", "align_your_steps")
BETA_SCHEDULE_AB = (0.6, 0.6)     # ComfyUI / A1111's "Beta" schedule: Beta(0.6, 0.6) quantiles (Lee et al. 2024)


def loglinear_resample(levels: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """n values through the descending `levels`, linear in log sigma over evenly spaced positions (the resampling
    the AYS authors give for other step counts). -> (n,) float64, levels[0] first and levels[-1] last."""
    ys = np.log(np.asarray(levels, dtype=np.float64)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(ys)), ys))[::-1].copy()


def ays_sigmas(model: str, n: int) -> np.ndarray:
    """The n sigmas of an n-step Align Your Steps grid for `model` ("sd15" | "sdxl"): the 11 published levels,
    log-linearly resampled to n + 1, the last of which the final sigma 0 replaces. -> (n,) float64."""
    if model not in AYS_SIGMAS:
        raise InputError("no Align Your Steps table for this model", where="ays_model", expected=list(AYS_MODELS),
                         found=repr(model))
    levels = np.asarray(AYS_SIGMAS[model], dtype=np.float64)
    return (levels if n + 1 == len(levels) else loglinear_resample(levels, n + 1))[:n]


def simple_sigmas(table: np.ndarray, n: int) -> np.ndarray:
    """ComfyUI's "simple" schedule: every (T / n)-th trained sigma from the top, sigma_{T-1-floor(k T / n)} for
    k = 0 .. n-1. table: (T,) increasing. -> (n,)."""
    step = len(table) / n
    return np.array([table[-(1 + int(k * step))] for k in range(n)], dtype=np.float64)


def sgm_uniform_sigmas(table: np.ndarray, n: int) -> np.ndarray:
    """ComfyUI's "sgm_uniform" schedule (Stability's generative-models discretisation): n timesteps evenly spaced
    from T - 1 towards 0 (n + 1 points, the last dropped), each sigma interpolated linearly in log sigma between the
    trained timesteps around it. table: (T,) increasing. -> (n,)."""
    log_table = np.log(np.asarray(table, dtype=np.float64))
    t = np.linspace(len(table) - 1, 0, n + 1)[:-1]
    low = np.floor(t).astype(np.int64)
    high, w = np.ceil(t).astype(np.int64), t - low
    return np.exp((1 - w) * log_table[low] + w * log_table[high])


def beta_sigmas(table: np.ndarray, n: int, alpha: float = BETA_SCHEDULE_AB[0],
                beta: float = BETA_SCHEDULE_AB[1]) -> np.ndarray:
    """ComfyUI / A1111's "beta" schedule (Lee et al. 2024, "Beta Sampling is All You Need"): the trained sigmas at
    timesteps round((T - 1) q_k), q_k the Beta(alpha, beta) quantiles of 1 - k/n (k = 0 .. n-1), a timestep
    repeated by its predecessor dropped (so a large n may give fewer steps). table: (T,) increasing. -> (<= n,)."""
    total = len(table) - 1
    ts = np.rint(np.array([beta_ppf(1 - k / n, alpha, beta) for k in range(n)]) * total).astype(np.int64)
    kept = [t for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    return np.asarray(table, dtype=np.float64)[kept]


def _beta_cf(x: float, a: float, b: float) -> float:
    """The continued fraction of the regularized incomplete beta function (DLMF 8.17.22), modified Lentz."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1) < 1e-16:
            break
    return f


def beta_cdf(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function: the Beta(a, b) distribution function at x."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1) / (a + b + 2):       # the fraction converges fast on this side; the other by symmetry
        return math.exp(log_front) * _beta_cf(x, a, b) / a
    return 1 - math.exp(log_front) * _beta_cf(1 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta(a, b) quantile function, inverted by bisection to double precision (no scipy at run time)."""
    if q <= 0 or q >= 1:
        return 0.0 if q <= 0 else 1.0
    if a == b and q == 0.5:     # the median of a symmetric Beta, exactly (rint(0.5 (T - 1)) is a tie)
        return 0.5
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if beta_cdf(mid, a, b) < q else (lo, mid)
    return (lo + hi) / 2


def schedule_sigmas(schedule: str, table: np.ndarray, n: int, *, low: float, high: float,
                    ays_model: str = "sd15") -> np.ndarray:
    """The n descending sigmas (no final one) of a `sigma_schedule` other than "default": karras / exponential span
    [low, high]; the others are read off the (T,) table of trained sigmas, or NVIDIA's AYS table. -> (<= n,)."""
    if schedule == "karras":
        return karras_sigmas(low, high, n)
    if schedule == "exponential":
        return exponential_sigmas(low, high, n)
    if schedule == "simple":
        return simple_sigmas(table, n)
    if schedule == "sgm_uniform":
        return sgm_uniform_sigmas(table, n)
    if schedule == "beta":
        return beta_sigmas(table, n)
    if schedule == "align_your_steps":
        return ays_sigmas(ays_model, n)
    raise InputError("unknown sigma schedule", where="sigma_schedule",
                     expected=["default", "karras", "exponential", *TABLE_SCHEDULES], found=repr(schedule))
def consistency_timesteps(num_train_timesteps: int, num_inference_steps: int, *,
                          original_inference_steps: int = 50) -> np.ndarray:
    """The N timesteps of a consistency-distilled model (LCM, Luo et al. 2023; TCD, Zheng et al. 2024), as diffusers
    0.42's LCMScheduler / TCDScheduler `set_timesteps` select them: the distillation's own grid of
    P = `original_inference_steps` timesteps k (T // P) - 1, k = P .. 1 (the model was only trained there), of which
    N are taken at the floored indices floor(j P / N), j = 0 .. N-1 (so the first is always T - 1 for T = P (T // P)).
    -> (N,) int64, descending. An InputError when N > P or P > T."""
    T, N = num_train_timesteps, check_num_inference_steps(num_inference_steps, num_train_timesteps)
    P = original_inference_steps
    if not isinstance(P, int) or isinstance(P, bool) or not 1 <= P <= T:
        raise InputError("original_inference_steps must be an integer between 1 and num_train_timesteps",
                         where="original_inference_steps", expected=f"1 <= P <= {T}", found=repr(P))
    if N > P:
        raise InputError("a consistency model samples a subset of its distillation grid: at most that many steps",
                         where="num_inference_steps", expected=f"<= original_inference_steps = {P}", found=N)
    origin = (np.arange(1, P + 1) * (T // P) - 1)[::-1]
    return origin[np.floor(np.linspace(0, P, num=N, endpoint=False)).astype(np.int64)].astype(np.int64)
