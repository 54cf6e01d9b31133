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

Every loop calls `callback(i, t_i, x)` after step i with the new sample; a tensor the callback returns
replaces x for the following steps (inpainting's blend of the known region), None leaves x as it is.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from ..errors import InputError
from .noise import randn

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
TimestepSpacing = Literal["leading", "trailing", "linspace"]
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
VarianceType = Literal["fixed_small", "fixed_large"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]   # may return a replacement x
Generator = torch.Generator | Sequence[torch.Generator] | None


# ---- the timestep grid ----------------------------------------------------------------------------
def select_timesteps(num_train_timesteps: int, num_inference_steps: int, *, spacing: str = "leading",
                     steps_offset: int = 0) -> list[int]:
    """The descending training timesteps visited by an N-step sampler (Lin et al. 2023, Table 2).

    "leading":  t_i = k * (T // N) + steps_offset for k = N-1 .. 0 (DDIM's original grid; SD uses offset 1)
    "trailing": t_i = round(T - k T / N) - 1 for k = 0 .. N-1 (starts at T - 1: the zero-SNR step)
    "linspace": t_i = round(linspace(0, T - 1, N)) reversed (ends at 0)
    The float grids are computed with the same numpy calls as diffusers 0.42 `set_timesteps`, so
    round-half-to-even ties fall the same way; unlike diffusers, "trailing" never yields N + 1 steps
    (numpy's float `arange` does for e.g. T = 1000, N = 61, ending in timestep -1).
    """
    T, N = num_train_timesteps, check_num_inference_steps(num_inference_steps, num_train_timesteps)
    if spacing == "leading":
        step_ratio = T // N
        timesteps = [k * step_ratio + steps_offset for k in reversed(range(N))]
    elif spacing == "trailing":
        timesteps = (np.round(np.arange(T, 0, -T / N))[:N].astype(np.int64) - 1).tolist()
    elif spacing == "linspace":
        timesteps = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64).tolist()
    else:
        raise InputError("unknown timestep spacing", where="timestep_spacing", expected=list(TIMESTEP_SPACINGS),
                         found=repr(spacing))
    if timesteps[0] >= T:
        raise InputError(f"steps_offset {steps_offset} pushes the first timestep past the training range",
                         where="steps_offset", expected=f"timesteps < num_train_timesteps = {T}",
                         found=f"first timestep {timesteps[0]} for {N} steps")
    return timesteps


def check_start_step(start_step: int, num_inference_steps: int) -> int:
    """start_step as a Python int, or an InputError unless 0 <= start_step < N (one step at least must run)."""
    s, N = start_step, num_inference_steps
    if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= s < N:
        raise InputError("start_step must be an integer index into the N-step plan, leaving a step to run",
                         where="start_step", expected=f"0 <= start_step < {N}", found=repr(s))
    return int(s)


def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int) -> int:
    """N as a Python int, or an InputError unless it is an integer with 1 <= N <= T."""
    N, T = num_inference_steps, num_train_timesteps
    if isinstance(N, bool) or not isinstance(N, numbers.Integral) or not 1 <= N <= T:
        raise InputError("num_inference_steps must be an integer between 1 and num_train_timesteps",
                         where="num_inference_steps", expected=f"1 <= N <= {T}", found=repr(N))
    return int(N)


# ---- one step -------------------------------------------------------------------------------------
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


# ---- noise ----------------------------------------------------------------------------------------
def noise_sampler_from(generator: Generator, *, dtype: torch.dtype | None = None) -> NoiseSampler:
    """A `noise_sampler(x) -> z` drawing standard normal noise like x from `generator` (one, one per
    sample, or None), on the generator's device, then moved to x's: see `diffusion.noise.randn`.
    `dtype`: draw in this dtype, then cast to x's (None: x's own); a seed gives other numbers per dtype."""
    def sample_noise(x: torch.Tensor) -> torch.Tensor:
        z = randn(x.shape, generator=generator, dtype=dtype or x.dtype, device=x.device)
        return z.to(x.dtype)

    return sample_noise


def check_generator(generator: Generator, batch_size: int) -> None:
    """Raise an InputError before any work if `generator` is not None, a Generator, or one per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        raise InputError("generator must be a torch.Generator or a list of them", where="generator",
                         expected="torch.Generator | list[torch.Generator] | None", found=type(generator).__name__)
    if len(generator) != batch_size:
        raise InputError("one generator per sample is needed", where="generator",
                         expected=f"a list of {batch_size} generators", found=f"a list of {len(generator)}")


def check_sample_call(denoise: Callable, x_T: torch.Tensor, generator: Generator, callback: Callable | None) -> None:
    """The checks every `Sampler.sample` makes before any work: InputErrors naming the bad argument."""
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


def noise_to_start(plan: Any, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The x a sampler's `sample` takes to run `plan` (a SamplingPlan or SigmaPlan) from the forward-process sample
    plan.noised(x0, noise, 0): that state divided by the scale `sample` applies to x (plan.init_scale: 1 for the
    loops on x_t, sqrt(sigma^2 + 1) in sigma space). x0, noise: (B, C, H, W)."""
    if not isinstance(x0, torch.Tensor) or not isinstance(noise, torch.Tensor) or x0.shape != noise.shape:
        raise InputError("x0 and noise must be tensors of one shape", where="noise",
                         expected=tuple(x0.shape) if isinstance(x0, torch.Tensor) else "a tensor",
                         found=_describe(noise))
    state = plan.noised(x0, noise, 0)
    return state if plan.init_scale == 1.0 else state / plan.init_scale


def after_step(callback: Callable | None, x: torch.Tensor, *args: Any) -> torch.Tensor:
    """x after `callback(*args, x)` ran: the tensor it returns (shaped and typed like x) replaces x, None keeps x.

    A replacement is how a pipeline edits the sample between steps (inpainting's known region) without
    writing into the tensor a loop holds, which a multistep method may still need."""
    if callback is None:
        return x
    replacement = callback(*args, x)
    if replacement is None:
        return x
    if not isinstance(replacement, torch.Tensor) or replacement.shape != x.shape or replacement.dtype != x.dtype:
        raise InputError("a step callback must return None or a tensor like the sample it was given",
                         where="callback", expected=f"None or a {x.dtype} tensor of shape {tuple(x.shape)}",
                         found=_describe(replacement))
    return replacement


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


# ---- sampler loops --------------------------------------------------------------------------------
def sample_ddim(denoise: Denoiser, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: Sequence[float], *,
                prediction_type: str = "epsilon", eta: float = 0.0, clip_sample_range: float | None = None,
                noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                progress: bool = False) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) from x = x_T (B, C, H, W) to x_0.

    timesteps: t_1 > ... > t_N; alphas_cumprod: the N + 1 floats abar(t_1) .. abar(t_N), abar_final.
    denoise(x_t, t) gets t as a 0-d int64 tensor on x's device. `clip_sample_range` clamps x0_pred
    (the model's eps is still used for the direction, as diffusers does by default). With eta > 0 a
    noise z is drawn at every step from `noise_sampler(x)` (default: the global RNG).
    callback(i, t_i, x) is called after step i with the new sample; a tensor it returns replaces x.
    """
    check_plan(timesteps, alphas_cumprod)
    if eta > 0 and noise_sampler is None:
        noise_sampler = torch.randn_like
    ts = torch.tensor(list(timesteps), dtype=torch.long, device=x.device)  # one copy, not one per step
    for i in _steps(len(timesteps), progress):
        abar_t, abar_prev = alphas_cumprod[i], alphas_cumprod[i + 1]
        x0_pred, eps = model_output_to_x0_eps(denoise(x, ts[i]), x, abar_t, prediction_type)
        if clip_sample_range is not None:
            x0_pred = x0_pred.clamp(-clip_sample_range, clip_sample_range)
        noise = noise_sampler(x) if eta > 0 else None
        x = ddim_step(x0_pred, eps, abar_t, abar_prev, eta=eta, noise=noise)
        x = after_step(callback, x, i, int(timesteps[i]))
    return x


def sample_ddpm(denoise: Denoiser, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: Sequence[float], *,
                prediction_type: str = "epsilon", variance_type: str = "fixed_small",
                clip_sample_range: float | None = None, noise_sampler: NoiseSampler | None = None,
                callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2), strided over `timesteps`, from x = x_T to x_0.

    Arguments as `sample_ddim` (abar_final is 1 for DDPM). Noise is drawn at every step but the last,
    where the posterior is a point mass at the mean (Algorithm 2: z = 0 for the final step).
    """
    check_plan(timesteps, alphas_cumprod)
    noise_sampler = noise_sampler or torch.randn_like
    ts = torch.tensor(list(timesteps), dtype=torch.long, device=x.device)
    last = len(timesteps) - 1
    for i in _steps(len(timesteps), progress):
        abar_t, abar_prev = alphas_cumprod[i], alphas_cumprod[i + 1]
        x0_pred, _ = model_output_to_x0_eps(denoise(x, ts[i]), x, abar_t, prediction_type)
        if clip_sample_range is not None:
            x0_pred = x0_pred.clamp(-clip_sample_range, clip_sample_range)
        noise = noise_sampler(x) if i < last else None
        x = ddpm_step(x, x0_pred, abar_t, abar_prev, variance_type=variance_type, noise=noise)
        x = after_step(callback, x, i, int(timesteps[i]))
    return x


# Adams-Bashforth coefficients of the linear multistep method on eps (Liu et al. 2022, eq. 12), by the
# number of eps available (newest first): order 1 .. 4.
PLMS_COEFFICIENTS: tuple[tuple[float, ...], ...] = (
    (1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def plms_eps(eps_history: Sequence[torch.Tensor]) -> torch.Tensor:
    """eps' = sum_j c_j eps_{i-j} over the last k <= 4 predictions (oldest first in `eps_history`):
    (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24 with four (Liu et al. 2022, eq. 12), fewer below."""
    coefficients = PLMS_COEFFICIENTS[len(eps_history) - 1]
    return sum(c * e for c, e in zip(coefficients, reversed(eps_history)))


def plms_transfer(x_t: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_prev: float) -> torch.Tensor:
    """The transfer phi(x_t, eps, t, t_prev) of PNDM (Liu et al. 2022, eq. 11): the deterministic DDIM step
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps with x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    x0_pred, _ = model_output_to_x0_eps(eps, x_t, abar_t, "epsilon")
    return ddim_step(x0_pred, eps, abar_t, abar_prev)


def sample_plms(denoise: Denoiser, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: Sequence[float], *,
                prediction_type: str = "epsilon", callback: Callback | None = None,
                progress: bool = False) -> torch.Tensor:
    """PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models", sec. 3.3), as the latent
    diffusion repository runs it: the first step is a pseudo improved-Euler step (two model calls: at x_t
    and at its DDIM guess at t_{i+1}); later steps combine the last 2, 3, then 4 eps (eq. 12), one call each.

    Arguments as `sample_ddim`; every prediction type is turned into eps first (the method is on eps).
    """
    check_plan(timesteps, alphas_cumprod)
    ts = torch.tensor(list(timesteps), dtype=torch.long, device=x.device)
    n, eps_history = len(timesteps), []
    for i in _steps(n, progress):
        abar_t, abar_prev = alphas_cumprod[i], alphas_cumprod[i + 1]
        _, eps = model_output_to_x0_eps(denoise(x, ts[i]), x, abar_t, prediction_type)
        if not eps_history and i + 1 < n:
            x_guess = plms_transfer(x, eps, abar_t, abar_prev)
            _, eps_next = model_output_to_x0_eps(denoise(x_guess, ts[i + 1]), x_guess, abar_prev, prediction_type)
            eps_prime = (eps + eps_next) / 2              # improved Euler: the mean slope of the step
        else:
            eps_prime = plms_eps(eps_history + [eps])     # the warm-up's second eps is not kept, as in LDM
        eps_history = (eps_history + [eps])[-3:]
        x = plms_transfer(x, eps_prime, abar_t, abar_prev)
        x = after_step(callback, x, i, int(timesteps[i]))
    return x


def check_plan(timesteps: Sequence[int], alphas_cumprod: Sequence[float]) -> None:
    if len(timesteps) < 1 or len(alphas_cumprod) != len(timesteps) + 1:
        raise InputError("a sampling plan needs N >= 1 timesteps and N + 1 alphas_cumprod values",
                         where="alphas_cumprod", expected=f"{len(timesteps) + 1} values (abar_final last)",
                         found=f"{len(timesteps)} timesteps, {len(alphas_cumprod)} values")


def _steps(n: int, progress: bool):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), total=n)
