"""The forward process of a diffusion model: the noise schedule and what training needs from it.

`NoiseScheduler` holds beta_t and abar_t (`alphas_cumprod`) and maps (x_0, eps, t) to x_t, to the
training target, to SNR(t), and a model's prediction back to (x0_pred, eps). It is pure math: it knows
nothing of sampling (the reverse process lives in `samplers/`, which reads the schedule from it) and reads
and writes no files. `from_pretrained` / `save_pretrained` are `scheduler_io`'s functions, which that module
registers here (`register_folder_io`): scheduler_io imports this module, never the reverse. Where a
checkpoint's scheduler_config.json also carries sampler settings (timestep spacing, offset, clipping), those
belong to the sampler and are read by `scheduler_io.load_scheduler_folder`.

A NoiseScheduler is immutable: attributes cannot be reassigned, and its tensors must not be modified
in place, so one instance can be shared by threads. Per-device copies of the schedule are cached
(a pure memo: the same values on every device), so training steps do not copy the table each call.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from .. import limits
from ..config import ComponentConfig, is_int
from ..errors import ConfigError, InputError, describe
from ..registry import COMPONENTS
from . import schedules
from .schedules import model_output_to_x0_eps

# The module that reads and writes scheduler folders, and registers how in `_FOLDER_IO` when imported: it
# imports this module, so this module names it as a string and imports it only on the first file call, as the
# registry imports its built-in modules (registry._BUILTIN_MODULES).
FOLDER_IO_MODULE = "latentdiff.diffusion.scheduler_io"
_FOLDER_IO: dict[str, Callable[..., Any]] = {}


def register_folder_io(*, load: Callable[..., NoiseSchedulerConfig], save: Callable[..., Path]) -> None:
    """Set the functions behind NoiseScheduler.from_pretrained (`load(path_or_id, subfolder=, **location)` -> the
    NoiseSchedulerConfig) and save_pretrained (`save(noise_scheduler, save_directory, sampler=)` -> the folder);
    `scheduler_io` calls this when imported."""
    _FOLDER_IO.update(load=load, save=save)


def _folder_io(name: str) -> Callable[..., Any]:
    if name not in _FOLDER_IO:
        importlib.import_module(FOLDER_IO_MODULE)
    return _FOLDER_IO[name]


@dataclasses.dataclass(frozen=True)
class NoiseSchedulerConfig(ComponentConfig):
    """The forward process: T steps of a beta schedule, and what the network is trained to predict.

    The defaults are latent diffusion's / Stable Diffusion's (scaled_linear, 0.00085 -> 0.012, T = 1000).
    Timestep spacing and offset are not here: they choose which steps a *sampler* visits and are
    fields of the samplers (DDIMSampler, DDPMSampler), the forward process does not depend on them.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None      # overrides the three fields above when given
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    rescale_zero_terminal_snr: bool = False             # Lin et al. 2023, Algorithm 1

    def validate(self) -> None:
        if self.num_train_timesteps < 2:
            raise ConfigError("a diffusion process needs at least 2 timesteps", where="num_train_timesteps",
                              expected=">= 2", found=self.num_train_timesteps)
        # bounded before any table is built (10^11 steps: a 400 GB linspace; 10^9 cosine steps: a Python loop)
        limits.check_count(self.num_train_timesteps, key="num_train_timesteps", at_least=2,
                           at_most=limits.MAX_TRAIN_TIMESTEPS, where="num_train_timesteps")
        if self.trained_betas is not None:
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ConfigError("trained_betas must have one beta per training timestep", where="trained_betas",
                                  expected=f"{self.num_train_timesteps} values", found=f"{len(self.trained_betas)}")
            schedules.check_betas(torch.tensor(self.trained_betas, dtype=torch.float64), where="trained_betas")
        elif not 0 < self.beta_start <= self.beta_end < 1:
            raise ConfigError("beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1",
                              where="beta_start, beta_end", expected="0 < beta_start <= beta_end < 1",
                              found=(self.beta_start, self.beta_end))
        if self.rescale_zero_terminal_snr and self.prediction_type == "epsilon":
            raise ConfigError(
                "epsilon prediction cannot be used with a zero-terminal-SNR schedule: at t = T - 1, "
                "abar_T = 0, and x0 = (x_t - sqrt(1 - abar_T) eps) / sqrt(abar_T) divides by zero "
                "(Lin et al. 2023, sec. 3.2); train with v_prediction (or sample) instead",
                where="prediction_type", expected="'v_prediction' or 'sample' with rescale_zero_terminal_snr=True",
                found=repr(self.prediction_type))


@COMPONENTS.register("noise_scheduler")
class NoiseScheduler:
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) for t = 0 .. T-1, with T = num_train_timesteps.

    betas, alphas_cumprod: (T,) float32 CPU tensors, computed with the same float32 operations as
    diffusers' DDPMScheduler / DDIMScheduler, so parity holds bit for bit.
    """

    config_class = NoiseSchedulerConfig
    __slots__ = ("config", "betas", "alphas_cumprod", "_abar64", "_cache")
    config: NoiseSchedulerConfig
    betas: torch.Tensor                # (T,) float32 CPU
    alphas_cumprod: torch.Tensor       # (T,) float32 CPU
    _abar64: torch.Tensor              # alphas_cumprod in float64, the source of the coefficient tables
    _cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor]   # per-device tables (a pure memo)

    def __init__(self, config: NoiseSchedulerConfig | None = None):
        config = NoiseSchedulerConfig() if config is None else config
        if not isinstance(config, NoiseSchedulerConfig):
            raise ConfigError("NoiseScheduler needs a NoiseSchedulerConfig", where="config",
                              expected="NoiseSchedulerConfig", found=describe(config))
        betas = schedules.make_betas(config.beta_schedule, config.num_train_timesteps, beta_start=config.beta_start,
                                     beta_end=config.beta_end, trained_betas=config.trained_betas)
        if config.rescale_zero_terminal_snr:
            betas = schedules.rescale_zero_terminal_snr(betas)
        set_ = object.__setattr__
        set_(self, "config", config)
        set_(self, "betas", betas)
        set_(self, "alphas_cumprod", schedules.alphas_cumprod_from_betas(betas))
        # The coefficient tables are taken in float64 from the float32 abar, then cast per use.
        set_(self, "_abar64", self.alphas_cumprod.double())
        set_(self, "_cache", {})

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"NoiseScheduler is immutable (tried to set {name!r}); build a new one from a config")

    def __repr__(self) -> str:
        return f"NoiseScheduler({self.config!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseScheduler) and other.config == self.config

    def __hash__(self) -> int:
        return hash(self.config)

    def __reduce__(self):
        # Pickle / deepcopy the config only: the tables are recomputed, the device caches not shipped.
        return (NoiseScheduler, (self.config,))

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    # ---- the forward process ----------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. 2020, eq. 4).

        x0, noise: (B, ...); t: (B,) integer tensor (or a 0-d tensor / int for the whole batch).
        Returns a tensor on x0's device with x0's dtype.
        """
        self._check_pair(x0, noise, "noise")
        sqrt_abar, sqrt_one_minus_abar = self._coefficients(t, x0)
        return sqrt_abar * x0 + sqrt_one_minus_abar * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, sec. 4). Shapes as add_noise."""
        self._check_pair(x0, noise, "noise")
        sqrt_abar, sqrt_one_minus_abar = self._coefficients(t, x0)
        return sqrt_abar * noise - sqrt_one_minus_abar * x0

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network must predict from x_t: noise (epsilon), v (v_prediction) or x0 (sample)."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            self._check_pair(x0, noise, "noise")
            return noise
        if kind == "sample":
            self._check_pair(x0, noise, "noise")
            return x0
        return self.velocity(x0, noise, t)

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t): float32, on t's device, t's shape (0 at a zero-terminal-SNR t = T-1)."""
        t = self._check_t(t, None)
        table = self._table("snr", t.device, torch.float32)
        return table[t]

    def predict_x0_eps(self, model_output: torch.Tensor, x_t: torch.Tensor,
                       t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x0_pred, eps) implied by the model's raw prediction at x_t; t: (B,), 0-d or int."""
        self._check_pair(x_t, model_output, "model_output")
        t = self._check_t(t, x_t)
        shape = (-1,) + (1,) * (x_t.ndim - 1) if t.ndim == 1 else ()
        abar = self._table("abar", x_t.device, x_t.dtype)[t].reshape(shape)
        return model_output_to_x0_eps(model_output, x_t, abar, self.config.prediction_type)

    # ---- files: scheduler_io's, through the hook above ------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, subfolder: str | None = "scheduler",
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        token: str | bool | None = None, local_files_only: bool | None = None) -> NoiseScheduler:
        """Read the noise schedule from a diffusers `scheduler_config.json` (of a pipeline folder / Hub repo:
        `subfolder="scheduler"`; of a scheduler folder itself: `subfolder=None`). Sampler settings in the
        file are checked but not returned: use `scheduler_io.load_scheduler_folder` for both."""
        config = _folder_io("load")(path_or_id, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                                    token=token, local_files_only=local_files_only)
        return cls(config)

    def save_pretrained(self, save_directory: str | os.PathLike, *, sampler: object | None = None) -> Path:
        """Write `save_directory/scheduler_config.json` (atomically), loadable by the diffusers scheduler class
        of `sampler` (DDIMScheduler for a DDIMSampler, PNDMScheduler for PLMS, EulerDiscreteScheduler ...:
        see `scheduler_io`); `sampler` None writes the default DDIMSampler()."""
        return _folder_io("save")(self, save_directory, sampler=sampler)

    # ---- helpers -----------------------------------------------------------------------------
    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, device, dtype)
        table = self._cache.get(key)
        if table is None:
            abar = self._abar64
            full = {"abar": lambda: abar, "sqrt_abar": abar.sqrt, "sqrt_one_minus_abar": lambda: (1 - abar).sqrt(),
                    "snr": lambda: schedules.signal_to_noise_ratio(abar)}[name]()
            # setdefault is atomic: two threads filling the same key keep one (identical) table
            table = self._cache.setdefault(key, full.to(device=device, dtype=dtype))
        return table

    def _coefficients(self, t: torch.Tensor | int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) shaped to broadcast against x: (B, 1, ..., 1) or 0-d."""
        t = self._check_t(t, x)
        shape = (-1,) + (1,) * (x.ndim - 1) if t.ndim == 1 else ()
        a = self._table("sqrt_abar", x.device, x.dtype)[t].reshape(shape)
        s = self._table("sqrt_one_minus_abar", x.device, x.dtype)[t].reshape(shape)
        return a, s

    def _check_t(self, t: torch.Tensor | int, x: torch.Tensor | None) -> torch.Tensor:
        T = self.config.num_train_timesteps
        if is_int(t):
            t = torch.tensor(t, device=x.device if x is not None else None)
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise InputError("timesteps must be an integer tensor", where="t", expected="(B,) torch.long",
                             found=describe(t))
        if x is not None:
            if t.ndim > 1 or (t.ndim == 1 and x.ndim > 0 and t.shape[0] != x.shape[0]):
                raise InputError("one timestep per sample is needed", where="t",
                                 expected=f"shape ({x.shape[0]},) or a scalar", found=tuple(t.shape))
            t = t.to(x.device)
        if t.dtype != torch.long:   # uint8 / bool index tensors would act as masks
            t = t.long()
        # A range check on a CPU tensor is free; on an accelerator it would block on the device.
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
            raise InputError("timestep out of range", where="t", expected=f"0 <= t < {T}",
                             found=f"[{int(t.min())}, {int(t.max())}]")
        return t

    @staticmethod
    def _check_pair(x: torch.Tensor, other: torch.Tensor, name: str) -> None:
        if tuple(x.shape) != tuple(other.shape):
            raise InputError(f"{name} must have the shape of the sample", where=name, expected=tuple(x.shape),
                             found=tuple(other.shape))
