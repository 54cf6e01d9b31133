"""What every sampler shares: the types of its arguments, the one step-callback contract, the checks made before
any work, the `SamplerProtocol` every sampler satisfies and the settings base both families derive from.

    denoise(x_t, t) -> prediction        a `Denoiser`: the network with its guidance (eps, v or x0)
    callback(i, t, x, denoised)          a `StepCallback`, after step i: t the step's timestep, x the new state,
                                         denoised the x0 prediction of the step (k-diffusion's `denoised`)

A callback returns None, or a tensor shaped and typed like x that replaces x for the following steps (how a
pipeline edits the sample between steps, inpainting's known region, without writing into the tensor the loop
holds). A callback written for the older forms still works: `callback(i, t, x)` (no parameter named `denoised`)
is called without the prediction, and the sigma loops' former `callback(i, x)` (two positional parameters) as
before; see `as_step_callback`.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeAlias, overload, runtime_checkable

import torch

from ...config import ComponentConfig, is_int
from ...errors import ConfigError, InputError, describe
from ...registry import SAMPLERS
from ..noise import randn

if TYPE_CHECKING:
    from ..noise_scheduler import NoiseScheduler

TimestepSpacing: TypeAlias = Literal["leading", "trailing", "linspace"]
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
VarianceType: TypeAlias = Literal["fixed_small", "fixed_large"]

Denoiser: TypeAlias = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler: TypeAlias = Callable[[torch.Tensor], torch.Tensor]
# k-diffusion's noise of one step, noise(sigma, sigma_next) -> z ~ N(0, I) like x: a Brownian tree's increment over
# [sigma_next, sigma] (samplers.brownian) or fresh Gaussian noise (dpm_loops.gaussian_interval_noise).
IntervalNoise: TypeAlias = Callable[[float, float], torch.Tensor]
Generator: TypeAlias = torch.Generator | Sequence[torch.Generator] | None
# The one step-callback signature, callback(i, t, x, denoised) -> None | a replacement x; the older (i, t, x)
# form is accepted too (module docstring).
StepCallback: TypeAlias = (Callable[[int, float, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
                           | Callable[[int, float, torch.Tensor], "torch.Tensor | None"])


@runtime_checkable
class SamplerProtocol(Protocol):
    """What a pipeline needs of a sampler. Every registered sampler satisfies it; a custom object needs only
    `init_noise_sigma` and `sample` for plain sampling, `noise_to_start` and `sample(..., start_step=)` to start
    part-way (image-to-image, inpainting: `check_sampler`), and `plan` (a SamplingPlan or SigmaPlan: `timesteps`,
    `noised(x0, noise, k)`) for inpainting with a plain UNet."""

    @property
    def init_noise_sigma(self) -> float: ...   # read-only: the samplers keep it as a class variable

    def sample(self, denoise: Denoiser, x_T: torch.Tensor, noise_scheduler: NoiseScheduler,
               num_inference_steps: int, *, start_step: int = 0, generator: Generator = None,
               callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor: ...

    def noise_to_start(self, x0: torch.Tensor, noise: torch.Tensor, noise_scheduler: NoiseScheduler,
                       num_inference_steps: int, start_step: int = 0) -> torch.Tensor: ...

    def plan(self, noise_scheduler: NoiseScheduler, num_inference_steps: int, *, start_step: int = 0) -> Any: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerSettings(ComponentConfig):
    """Settings and methods both sampler families share (`Sampler` of the discrete ones, `SigmaSampler`): which
    timesteps the grid starts from, `with_options`, and `noise_to_start` over the family's `plan`."""

    timestep_spacing: TimestepSpacing = "leading"
    steps_offset: int = 0              # added to "leading" timesteps (Stable Diffusion v1/v2 use 1)

    init_noise_sigma: ClassVar[float] = 1.0   # x_T ~ N(0, I): `sample` scales it itself where it must
    # The settings a diffusers scheduler file left out (diffusers' `_use_default_values`), set on a sampler read from
    # one (diffusion.scheduler_io): `from_config` gives those the new sampler's own defaults, as diffusers does.
    _use_default_values: ClassVar[tuple[str, ...]] = ()
    registry_name: ClassVar[str]

    def validate(self) -> None:
        if self.steps_offset < 0:
            raise ConfigError("steps_offset must be >= 0", where="steps_offset", expected=">= 0",
                              found=self.steps_offset)

    def with_options(self, **changes: Any) -> Any:
        """A copy with some settings changed; an unknown name is a TypeError, a bad value a ConfigError."""
        return dataclasses.replace(self, **changes)

    @property
    def config(self) -> dict[str, Any]:
        """The settings as a dict (diffusers' `scheduler.config`), what `from_config` reads: `_class_name` and
        every field, so `OtherSampler.from_config(pipe.sampler.config)` keeps the ones both share."""
        defaulted = {"_use_default_values": list(self._use_default_values)} if self._use_default_values else {}
        return {"_class_name": type(self).__name__, **defaulted, **self.to_dict()}

    @classmethod
    def from_config(cls, config: Any, **changes: Any) -> Any:
        """This sampler with the settings it shares with `config` (a sampler, its `.config`, or a diffusers
        scheduler's config), as diffusers' `from_config`: `pipe.scheduler = DPMSolverMultistepSampler.from_config(
        pipe.scheduler.config)` keeps the folder's timestep spacing and offset. Keys this sampler does not have are
        ignored (diffusers ignores them too), and so are those the config lists under `_use_default_values` (settings
        its scheduler file left out: they take this sampler's defaults, which are its diffusers class's, as in
        diffusers); the ones it has are checked (a ConfigError naming a bad one); `changes` override them.
        diffusers' use_karras_sigmas / use_exponential_sigmas give `sigma_schedule`."""
        if isinstance(config, SamplerSettings):
            config = config.config
        if not isinstance(config, Mapping):
            raise InputError("from_config takes a sampler's or a scheduler's config", where="config",
                             expected="a mapping such as pipe.scheduler.config, or a sampler",
                             found=describe(config))
        names = {f.name for f in dataclasses.fields(cls)} - set(config.get("_use_default_values") or ())
        settings = {key: value for key, value in config.items() if key in names}
        if "sigma_schedule" in names and "sigma_schedule" not in settings:
            flags = [name for name in ("karras", "exponential") if config.get(f"use_{name}_sigmas")]
            if flags:
                settings["sigma_schedule"] = flags[0]
        return cls(**(settings | changes))

    def plan(self, noise_scheduler: NoiseScheduler, num_inference_steps: int, *, start_step: int = 0) -> Any:
        raise NotImplementedError

    def noise_to_start(self, x0: torch.Tensor, noise: torch.Tensor, noise_scheduler: NoiseScheduler,
                       num_inference_steps: int, start_step: int = 0) -> torch.Tensor:
        """x0 (B, C, H, W) noised with `noise` by the forward process to step `start_step` of the N-step plan: the x
        that `sample(..., start_step=start_step)` takes. The plan's state there is plan.noised(x0, noise, 0), x_t
        for the discrete samplers, x0 + sigma_s noise for the sigma-space ones (diffusers' `add_noise` at the first
        timestep of image-to-image); `sample` multiplies its x by plan.init_scale, so x is that state divided by it
        (`initial_sample`)."""
        return initial_sample(self.plan(noise_scheduler, num_inference_steps, start_step=start_step), x0, noise)


def initial_sample(plan: Any, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The x with which `sample` runs `plan` (a SamplingPlan or SigmaPlan) from the forward-process state
    plan.noised(x0, noise, 0): that state divided by the scale `sample` applies to x (plan.init_scale: 1 for the
    loops on x_t, sqrt(sigma^2 + 1) in sigma space). x0, noise: (B, C, H, W)."""
    if not isinstance(x0, torch.Tensor) or not isinstance(noise, torch.Tensor) or x0.shape != noise.shape:
        raise InputError("x0 and noise must be tensors of one shape", where="noise",
                         expected=tuple(x0.shape) if isinstance(x0, torch.Tensor) else "a tensor",
                         found=describe(noise))
    state = plan.noised(x0, noise, 0)
    return state if plan.init_scale == 1.0 else state / plan.init_scale


def switch_sampler(current: Any, name: str | None) -> Any:
    """The sampler `name`, keeping the settings it shares with the model's (timestep spacing, offset ...), as
    diffusers' `from_config` does; the model's own when name is None or the same."""
    if name is None or name == getattr(current, "registry_name", None):
        return current
    cls: Any = SAMPLERS.get(name)
    if isinstance(current, SamplerSettings):
        return cls.from_config(current)
    shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(current)}
    return cls(**{key: getattr(current, key) for key in shared})


# ---- the step callback -------------------------------------------------------------------------------
class _Normalized:
    """A user's callback as the loops call it, cb(i, t, x, denoised), whichever form it was written in."""

    __slots__ = ("callback", "form")

    def __init__(self, callback: Callable[..., Any], form: str):
        self.callback, self.form = callback, form

    def __call__(self, i: int, t: float, x: torch.Tensor, denoised: torch.Tensor | None = None) -> Any:
        if self.form == "denoised":
            return self.callback(i, t, x, denoised=denoised)
        if self.form == "i_x":
            return self.callback(i, x)
        return self.callback(i, t, x)


@overload
def as_step_callback(callback: None) -> None: ...


@overload
def as_step_callback(callback: Callable[..., Any]) -> _Normalized: ...


def as_step_callback(callback: Callable[..., Any] | None) -> _Normalized | None:
    """`callback` as the loops call it, callback(i, t, x, denoised), its form read once from its signature: a
    parameter named `denoised` (or **kwargs) gets the prediction as that keyword; two positional parameters and no
    more is the sigma loops' former callback(i, x); anything else is called (i, t, x) as before."""
    if callback is None or isinstance(callback, _Normalized):
        return callback
    try:
        params = list(inspect.signature(callback).parameters.values())
    except (TypeError, ValueError):         # a builtin without a signature: the documented (i, t, x) form
        return _Normalized(callback, "i_t_x")
    if any(p.name == "denoised" or p.kind is p.VAR_KEYWORD for p in params):
        return _Normalized(callback, "denoised")
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) == 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        return _Normalized(callback, "i_x")
    return _Normalized(callback, "i_t_x")


def after_step(callback: Callable[..., Any] | None, x: torch.Tensor, i: int, t: float,
               denoised: torch.Tensor | None = None) -> torch.Tensor:
    """x after `callback(i, t, x, denoised)` ran (normalised by `as_step_callback`): the tensor it returns (shaped
    and typed like x) replaces x, None keeps x. A replacement, never a write into x: a multistep method may still
    need the tensor the loop holds."""
    if callback is None:
        return x
    replacement = as_step_callback(callback)(i, t, x, denoised)
    if replacement is None:
        return x
    if not isinstance(replacement, torch.Tensor) or replacement.shape != x.shape or replacement.dtype != x.dtype:
        raise InputError("a step callback must return None or a tensor like the sample it was given",
                         where="callback", expected=f"None or a {x.dtype} tensor of shape {tuple(x.shape)}",
                         found=describe(replacement))
    return replacement



class StepCounting:
    """A run's model wrapper that must know which step of the run its next call belongs to (to change what it does
    past a fraction of the steps, or per step range): `step`, 0-based, counted by the sampler's step callback, never
    read from t (samplers such as Heun evaluate the model several times per step, at timesteps off the plan's
    grid). `counting(callback)` is that callback; a subclass resets its per-step state in `step_started`.

        x_0 = sampler.sample(wrapper, x_T, noise_scheduler, N, callback=wrapper.counting(callback))
    """

    step: int = 0          # the sampler step (0-based) the next call belongs to

    def counting(self, callback: Callable[..., Any] | None, start_step: int = 0) -> Callable[..., Any]:
        """A step callback that advances `step` (from `start_step`), then runs `callback` (any of its forms)."""
        self.step = start_step
        self.step_started()
        inner = as_step_callback(callback)

        def on_step(i: int, t: Any, x: torch.Tensor, denoised: torch.Tensor | None = None) -> Any:
            self.step += 1
            self.step_started()
            return None if inner is None else inner(i, t, x, denoised)

        return on_step

    def step_started(self) -> None:
        """Called as the run starts and after each step: nothing here."""

# ---- noise -----------------------------------------------------------------------------------------------
def noise_sampler_from(generator: Generator, *, dtype: torch.dtype | None = None) -> NoiseSampler:
    """A `noise_sampler(x) -> z` drawing standard normal noise like x from `generator` (one, one per
    sample, or None), on the generator's device, then moved to x's: see `diffusion.noise.randn`.
    `dtype`: draw in this dtype, then cast to x's (None: x's own); a seed gives other numbers per dtype."""
    def sample_noise(x: torch.Tensor) -> torch.Tensor:
        z = randn(x.shape, generator=generator, dtype=dtype or x.dtype, device=x.device)
        return z.to(x.dtype)

    return sample_noise


# ---- checks before any work ----------------------------------------------------------------------------
def check_start_step(start_step: int, num_inference_steps: int) -> int:
    """start_step as a Python int, or an InputError unless 0 <= start_step < N (one step at least must run)."""
    s, N = start_step, num_inference_steps
    if not is_int(s) or not 0 <= s < N:
        raise InputError("start_step must be an integer index into the N-step plan, leaving a step to run",
                         where="start_step", expected=f"0 <= start_step < {N}", found=repr(s))
    return int(s)


def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int) -> int:
    """N as a Python int, or an InputError unless it is an integer with 1 <= N <= T."""
    N, T = num_inference_steps, num_train_timesteps
    if not is_int(N) or not 1 <= N <= T:
        raise InputError("num_inference_steps must be an integer between 1 and num_train_timesteps",
                         where="num_inference_steps", expected=f"1 <= N <= {T}", found=repr(N))
    return int(N)


def check_generator(generator: Generator, batch_size: int) -> None:
    """Raise an InputError before any work if `generator` is not None, a Generator, or one per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        raise InputError("generator must be a torch.Generator or a list of them", where="generator",
                         expected="torch.Generator | list[torch.Generator] | None", found=describe(generator))
    if len(generator) != batch_size:
        raise InputError("one generator per sample is needed", where="generator",
                         expected=f"a list of {batch_size} generators", found=f"a list of {len(generator)}")


def check_sample_call(denoise: Callable, x_T: torch.Tensor, generator: Generator, callback: Callable | None) -> None:
    """The checks every sampler's `sample` makes before any work: InputErrors naming the bad argument."""
    if not callable(denoise):
        raise InputError("denoise must be a callable denoise(x_t, t) -> model_output", where="denoise",
                         expected="a callable", found=describe(denoise))
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.ndim < 1:
        raise InputError("x_T must be a floating-point tensor (B, C, H, W)", where="x_T",
                         expected="a float tensor", found=describe(x_T))
    if callback is not None and not callable(callback):
        raise InputError("callback must be callable", where="callback", expected="callback(i, t, x_t, denoised)",
                         found=describe(callback))
    check_generator(generator, x_T.shape[0])


def check_sampler(sampler: object) -> SamplerProtocol:
    """`sampler`, or an InputError before any work if it cannot start from a noised image (a custom object without
    latentdiff's `noise_to_start` / `sample(..., start_step=)`)."""
    if not callable(getattr(sampler, "noise_to_start", None)):
        raise InputError("this sampler cannot start from a noised image: it has no noise_to_start(x0, noise, ...)",
                         where="sampler", expected="a latentdiff sampler (every registered one can)",
                         found=describe(sampler))
    return sampler  # type: ignore[return-value]   # what start part-way needs is checked above


# tqdm options of the progress bars of the sampling loops in this context (a pipeline's `set_progress_bar_config`,
# set around its stages): a context variable, so two threads sharing a pipeline each see their own.
PROGRESS_BAR_OPTIONS: ContextVar[Mapping[str, Any]] = ContextVar("PROGRESS_BAR_OPTIONS", default=MappingProxyType({}))


def progress_range(n: int, progress: bool) -> Any:
    """range(n), shown as a tqdm bar when `progress` (with the options of PROGRESS_BAR_OPTIONS: disable=True ...)."""
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), **({"total": n} | dict(PROGRESS_BAR_OPTIONS.get())))
