"""Reading and writing diffusers' `scheduler/scheduler_config.json`.

A diffusers scheduler config mixes two things latentdiff keeps apart: the noise schedule (the forward
process the model was trained with -> NoiseSchedulerConfig) and the settings of one sampler (timestep
spacing, offset, clipping, sigma grid, solver order ... -> a Sampler). The mapping is strict:

* Classes latentdiff implements load as that sampler, with every key of the class mapped:
  `DDIMScheduler` -> DDIMSampler, `DDPMScheduler` -> DDPMSampler, `PNDMScheduler` -> PLMSSampler,
  `EulerDiscreteScheduler` -> EulerSampler, `EulerAncestralDiscreteScheduler` -> EulerAncestralSampler,
  `HeunDiscreteScheduler` -> HeunSampler, `LMSDiscreteScheduler` -> LMSSampler, `LCMScheduler` -> LCMSampler,
  `DPMSolverMultistepScheduler` -> DPMSolverMultistepSampler ("dpmsolver++") or
  DPMSolverMultistepSDESampler ("sde-dpmsolver++"), `KDPM2DiscreteScheduler` -> DPM2Sampler,
  `KDPM2AncestralDiscreteScheduler` -> DPM2AncestralSampler, `DPMSolverSDEScheduler` -> DPMSolverSDESampler,
  `UniPCMultistepScheduler` -> UniPCSampler, `DEISMultistepScheduler` -> DEISSampler, `TCDScheduler` -> TCDSampler
  (whose `eta`, a `step()` argument in diffusers, is kept under `_latentdiff_sampler` as DDIM's).
  A PNDM config without `skip_prk_steps` (diffusers' default: 3 pseudo Runge-Kutta warm-up steps,
  which latentdiff does not implement) loads as PLMSSampler with ONE warning: its warm-up is the latent
  diffusion repository's pseudo improved-Euler step instead.
* Other diffusers samplers of the same (discrete, DDPM-family) forward process - DPM-Solver single-step
  - give the same noise schedule and a DDIMSampler built exactly as
  `DDIMScheduler.from_config(config)` would be, with ONE warning saying so.
* A key missing from the file takes the default of diffusers' class. A key the class does not have is
  ignored, as diffusers ignores it (SD 2.x's DDIM config carries PNDM's `skip_prk_steps`) - except
  `rescale_betas_zero_snr: true`, which would silently give another schedule than the model's.
* A key that would change the model's forward process or output to something latentdiff does not
  implement (thresholding, continuous timesteps, flow sigmas, learned variance, beta sigmas ...) at any
  value but the implemented one, a key no supported diffusers scheduler knows, or an unsupported class
  is a ConfigError naming it.

Files written here are configs of the diffusers class of the sampler, which diffusers loads to the same
schedule and sampler (a setting the class has no key for - an A1111 schedule such as sgm_uniform, Brownian noise
where the class draws Gaussian noise, A1111's dropped next-to-last sigma - makes it a registered sampler's file:
DDIM for diffusers, every setting under `_latentdiff_sampler` for latentdiff); DDIM's eta (a `step()` argument in
diffusers, not a config key) is kept under `_latentdiff_sampler`.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import hub
from ..config import read_json
from ..errors import ConfigError, describe
from ..registry import SAMPLERS
from ..version import __version__
from .noise_scheduler import NoiseScheduler, NoiseSchedulerConfig, register_folder_io
from .samplers import (
    DDIMSampler,
    DDPMSampler,
    DEISSampler,
    DPM2AncestralSampler,
    DPM2Sampler,
    DPMSolverMultistepSampler,
    DPMSolverMultistepSDESampler,
    DPMSolverSDESampler,
    EulerAncestralSampler,
    EulerSampler,
    HeunSampler,
    LCMSampler,
    LMSSampler,
    PLMSSampler,
    SamplerSettings,
    TCDSampler,
    UniPCBH1Sampler,
    UniPCBH2Sampler,
    UniPCSampler,
)
from .scheduler_classes import CLASS_DEFAULTS, CLASS_FIELDS, CLASS_FIXED_KEYS, SOLVER_KEYS

SCHEDULER_CONFIG_NAME = "scheduler_config.json"

# diffusers classes whose sampler latentdiff implements (DPM-Solver: by algorithm_type, see DPM_ALGORITHMS).
NATIVE_CLASSES: dict[str, type] = {
    "DDIMScheduler": DDIMSampler, "DDPMScheduler": DDPMSampler, "PNDMScheduler": PLMSSampler,
    "EulerDiscreteScheduler": EulerSampler, "EulerAncestralDiscreteScheduler": EulerAncestralSampler,
    "HeunDiscreteScheduler": HeunSampler, "LMSDiscreteScheduler": LMSSampler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepSampler, "KDPM2DiscreteScheduler": DPM2Sampler,
    "KDPM2AncestralDiscreteScheduler": DPM2AncestralSampler, "DPMSolverSDEScheduler": DPMSolverSDESampler,
    "UniPCMultistepScheduler": UniPCSampler, "DEISMultistepScheduler": DEISSampler, "TCDScheduler": TCDSampler,
    "LCMScheduler": LCMSampler,
}
# Classes whose noise schedule we read and whose sampler is replaced by DDIM (with a warning).
FOREIGN_CLASSES = (
    "DPMSolverSinglestepScheduler",
)

# diffusers 0.42 key -> NoiseSchedulerConfig field
SCHEDULE_KEYS = {
    "num_train_timesteps": "num_train_timesteps", "beta_start": "beta_start", "beta_end": "beta_end",
    "beta_schedule": "beta_schedule", "trained_betas": "trained_betas", "prediction_type": "prediction_type",
    "rescale_betas_zero_snr": "rescale_zero_terminal_snr",
}
# diffusers key -> sampler field (set_alpha_to_one: DDIM only; variance_type: DDPM only)
SAMPLER_KEYS = ("timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range", "set_alpha_to_one",
                "variance_type")
# Defaults of DDIMScheduler.__init__ and DDPMScheduler.__init__ (identical where both have a key).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
    "timestep_spacing": "leading", "steps_offset": 0, "clip_sample": True, "clip_sample_range": 1.0,
    "set_alpha_to_one": True, "variance_type": "fixed_small",
}
# Keys accepted only at the value(s) latentdiff implements, and why.
FIXED_KEYS: dict[str, tuple[tuple[Any, ...], str]] = {
    "thresholding": ((False,), "dynamic thresholding (Imagen) is not implemented"),
    "timestep_type": (("discrete",), "the model must be conditioned on the discrete timestep t"),
    "use_flow_sigmas": ((False, None), "flow-matching schedules are a different forward process"),
    "use_dynamic_shifting": ((False,), "resolution-dependent shifting is for flow-matching models"),
    "shift_terminal": ((None,), "terminal shifting is for flow-matching models"),
    "solver_p": ((None,), "another scheduler as UniPC's predictor is not implemented"),
}
# Keys read only when a FIXED_KEYS feature is on (it cannot be), so any value is fine.
INERT_KEYS = ("dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type")
# Keys that configure only a foreign sampler (its step rule or its sigma grid), never the forward process.
FOREIGN_SAMPLER_KEYS = (
    "skip_prk_steps", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "interpolation_type",
    "sigma_min", "sigma_max", "final_sigmas_type", "solver_order", "algorithm_type", "solver_type",
    "lower_order_final", "euler_at_final", "use_lu_lambdas", "lambda_min_clipped", "predict_x0",
    "disable_corrector", "solver_p", "original_inference_steps", "timestep_scaling", "noise_sampler_seed",
)
KNOWN_KEYS = frozenset(SCHEDULE_KEYS) | frozenset(SAMPLER_KEYS) | frozenset(FIXED_KEYS) | frozenset(INERT_KEYS) \
    | frozenset(FOREIGN_SAMPLER_KEYS)
# DPMSolverMultistepScheduler algorithm_type -> sampler; "deis" and the solver types below are what
# diffusers itself turns them into. "dpmsolver" / "sde-dpmsolver" (deprecated, noise-prediction) are not here.
DPM_ALGORITHMS = {"dpmsolver++": DPMSolverMultistepSampler, "deis": DPMSolverMultistepSampler,
                  "sde-dpmsolver++": DPMSolverMultistepSDESampler}
DPM_SOLVER_TYPES = {"midpoint": "midpoint", "heun": "heun", "logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}
# The classes whose `step()` settings latentdiff keeps under LATENTDIFF_KEY, and the registered sampler of each.
STEP_OPTIONS = {"DDIMScheduler": "ddim", "TCDScheduler": "tcd"}
# Our sampler class -> the diffusers class it is written as.
WRITTEN_CLASS = {PLMSSampler: "PNDMScheduler", EulerSampler: "EulerDiscreteScheduler",
                 EulerAncestralSampler: "EulerAncestralDiscreteScheduler", HeunSampler: "HeunDiscreteScheduler",
                 LMSSampler: "LMSDiscreteScheduler", DPMSolverMultistepSampler: "DPMSolverMultistepScheduler",
                 DPMSolverMultistepSDESampler: "DPMSolverMultistepScheduler", DPM2Sampler: "KDPM2DiscreteScheduler",
                 DPM2AncestralSampler: "KDPM2AncestralDiscreteScheduler", DPMSolverSDESampler: "DPMSolverSDEScheduler",
                 UniPCSampler: "UniPCMultistepScheduler", UniPCBH1Sampler: "UniPCMultistepScheduler",
                 UniPCBH2Sampler: "UniPCMultistepScheduler", DEISSampler: "DEISMultistepScheduler",
                 TCDSampler: "TCDScheduler", LCMSampler: "LCMScheduler"}
# The samplers with a `sigma_schedule` (written as use_karras_sigmas / use_exponential_sigmas).
SIGMA_GRID_SAMPLERS = (EulerSampler, HeunSampler, LMSSampler, DPMSolverMultistepSampler, DPMSolverMultistepSDESampler,
                       DPM2Sampler, DPM2AncestralSampler, DPMSolverSDESampler, UniPCSampler, DEISSampler)
# What a diffusers class cannot say: a sampler with one of these settings is written as a registered sampler
# (`_registered_file_config`: the schedule as DDIM for diffusers, the settings for latentdiff) instead.
DIFFUSERS_SIGMA_SCHEDULES = ("default", "karras", "exponential")
DIFFUSERS_NOISE = {DPM2AncestralSampler: "gaussian", DPMSolverMultistepSDESampler: "gaussian",
                   DPMSolverSDESampler: "brownian"}
DDPM_VARIANCE = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",  # exp(log(v)/2) = sqrt(v)
                 "fixed_large": "fixed_large"}
# variance_type values that other classes may carry: the model outputs no variance channels.
NON_LEARNED_VARIANCE = (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
LATENTDIFF_KEY = "_latentdiff_sampler"
NOTE_KEY = "_latentdiff_note"


def matching_sampler(class_name: str, config: Mapping[str, Any] | None = None) -> type | None:
    """The latentdiff sampler class that a diffusers scheduler class stands for (DPM-Solver multistep by its
    `algorithm_type`), None where latentdiff implements none (FOREIGN_CLASSES and unknown names)."""
    if class_name == "DPMSolverMultistepScheduler":
        return DPM_ALGORITHMS.get(str((config or {}).get("algorithm_type", "dpmsolver++")))
    return NATIVE_CLASSES.get(class_name)


# ---- reading ----------------------------------------------------------------------------------------
def load_scheduler_folder(folder: str | os.PathLike) -> tuple[NoiseScheduler, SamplerSettings]:
    """(NoiseScheduler, sampler) from `folder/scheduler_config.json` (a local folder)."""
    config, sampler = read_scheduler_file(Path(folder) / SCHEDULER_CONFIG_NAME, _stacklevel=4)
    return NoiseScheduler(config), sampler


def read_scheduler_file(path: str | os.PathLike, *, warn: bool = True,
                        _stacklevel: int = 3) -> tuple[NoiseSchedulerConfig, SamplerSettings]:
    """(NoiseSchedulerConfig, sampler) from a scheduler_config.json file."""
    return read_scheduler_config(read_json(Path(path)), source=str(path), warn=warn, _stacklevel=_stacklevel)


def read_scheduler_config(data: Mapping[str, Any], *, source: str | None = None, warn: bool = True,
                          _stacklevel: int = 2) -> tuple[NoiseSchedulerConfig, SamplerSettings]:
    """Map a diffusers scheduler config dict to (NoiseSchedulerConfig, sampler); see the module docstring.

    `warn`: emit the one warning when a foreign sampler class is replaced by DDIM, or PNDM's Runge-Kutta
    warm-up by PLMS's (`_stacklevel` points it at the user's call)."""
    name = data.get("_class_name")
    if name not in NATIVE_CLASSES and name not in FOREIGN_CLASSES:
        raise ConfigError("unsupported scheduler class", where=_at(source, "_class_name"),
                          expected=f"one of {sorted(NATIVE_CLASSES) + sorted(FOREIGN_CLASSES)}", found=repr(name))
    keys = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = sorted(set(keys) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"unknown scheduler config key(s) {unknown}", where=_at(source, unknown[0]),
                          expected=f"keys of diffusers' {name} (or of the schedulers it can stand for)",
                          found=unknown)
    for key, (allowed, why) in FIXED_KEYS.items():
        if key in keys and keys[key] not in allowed:
            raise ConfigError(f"scheduler config key {key!r} has a value latentdiff does not support ({why})",
                              where=_at(source, key), expected=list(allowed), found=repr(keys[key]))
    if "variance_type" in keys and keys["variance_type"] not in NON_LEARNED_VARIANCE:
        raise ConfigError("a learned variance (the model outputs 2C channels) is not supported",
                          where=_at(source, "variance_type"), expected=list(NON_LEARNED_VARIANCE),
                          found=repr(keys["variance_type"]))
    if name in CLASS_DEFAULTS:
        native_schedule, native = _read_native(name, keys, data, source, warn=warn, stacklevel=_stacklevel + 1)
        return native_schedule, defaults_used(native, keys)
    values = {**DIFFUSERS_DEFAULTS, **keys}
    schedule = _build(NoiseSchedulerConfig, {ours: values[theirs] for theirs, ours in SCHEDULE_KEYS.items()},
                      source, reverse={v: k for k, v in SCHEDULE_KEYS.items()})
    common = {k: values[k] for k in ("timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range")}
    if name == "DDPMScheduler":
        variance = values["variance_type"]
        if variance not in DDPM_VARIANCE:
            raise ConfigError("DDPM variance type not supported (learned variances need a model that outputs them)",
                              where=_at(source, "variance_type"), expected=sorted(DDPM_VARIANCE), found=repr(variance))
        sampler: SamplerSettings = _build(DDPMSampler, {**common, "variance_type": DDPM_VARIANCE[variance]}, source)
    else:
        custom = _registered_sampler(data.get(LATENTDIFF_KEY), name, source)
        if custom is not None:   # a registered sampler diffusers has no class for (see scheduler_file_config)
            return schedule, custom
        extra = _latentdiff_options(data.get(LATENTDIFF_KEY), name, source)
        sampler = _build(DDIMSampler, {**common, "set_alpha_to_one": values["set_alpha_to_one"], **extra}, source)
    if name in FOREIGN_CLASSES and warn:
        unused = {k: keys[k] for k in FOREIGN_SAMPLER_KEYS if k in keys}
        warnings.warn(
            f"{name} is not implemented in latentdiff: its noise schedule is used with {sampler!r} instead "
            f"(the sampler diffusers' DDIMScheduler.from_config gives for this config)"
            + (f"; its own settings {unused} are not used" if unused else "")
            + f" [{source or 'scheduler config'}]", UserWarning, stacklevel=_stacklevel)
    return schedule, defaults_used(sampler, keys)


def defaults_used(sampler: SamplerSettings, keys: Mapping[str, Any]) -> SamplerSettings:
    """`sampler`, noting the settings whose diffusers key the file left out (diffusers' `_use_default_values`), so
    that `OtherSampler.from_config(sampler.config)` gives them the other sampler's defaults, as diffusers'
    `from_config` does (Stable Diffusion v1's PNDM file has no timestep_spacing: DPM-Solver gets "linspace")."""
    diffusers_keys = set(SAMPLER_KEYS) | set(FOREIGN_SAMPLER_KEYS)
    left_out = [f.name for f in dataclasses.fields(sampler) if f.name in diffusers_keys and f.name not in keys]
    flags = ("use_karras_sigmas", "use_exponential_sigmas")
    if hasattr(sampler, "sigma_schedule") and not any(key in keys for key in flags):
        left_out.append("sigma_schedule")
    object.__setattr__(sampler, "_use_default_values", tuple(left_out))   # not a field: equality is unchanged
    return sampler


def _read_native(name: str, keys: dict[str, Any], data: Mapping[str, Any], source: str | None, *, warn: bool,
                 stacklevel: int) -> tuple[NoiseSchedulerConfig, SamplerSettings]:
    """A config of PNDM, Euler, Euler ancestral, Heun, LMS or DPM-Solver multistep -> our sampler of that kind."""
    defaults = CLASS_DEFAULTS[name]
    values = {**defaults, **{k: v for k, v in keys.items() if k in defaults}}   # diffusers ignores the others
    for key, (allowed, why) in CLASS_FIXED_KEYS.items():
        if key in defaults and values[key] not in allowed:
            raise ConfigError(f"scheduler config key {key!r} has a value latentdiff does not support ({why})",
                              where=_at(source, key), expected=list(allowed), found=repr(values[key]))
    if "rescale_betas_zero_snr" not in defaults and keys.get("rescale_betas_zero_snr"):
        raise ConfigError(f"diffusers' {name} has no zero-terminal-SNR rescaling and ignores this key: the model "
                          "would be sampled with another schedule than the file says", where=_at(
                              source, "rescale_betas_zero_snr"), expected="false or absent", found=True)
    options = _latentdiff_options(data.get(LATENTDIFF_KEY), name, source)     # TCD's eta
    schedule = _build(NoiseSchedulerConfig, {ours: values.get(theirs, False)   # rescale: False where absent
                                             for theirs, ours in SCHEDULE_KEYS.items()},
                      source, reverse={v: k for k, v in SCHEDULE_KEYS.items()})
    cls = NATIVE_CLASSES[name]
    kwargs = {key: values[key] for key in CLASS_FIELDS[name]}
    if "use_karras_sigmas" in defaults:
        kwargs["sigma_schedule"] = _sigma_schedule(values, source)
    if name == "DPMSolverMultistepScheduler":
        cls = _lookup(DPM_ALGORITHMS, values, "algorithm_type", source,
                      "noise-prediction DPM-Solver is not implemented")
        kwargs["solver_type"] = _lookup(DPM_SOLVER_TYPES, values, "solver_type", source, "unknown solver type")
    for key, table in SOLVER_KEYS.get(name, {}).items():
        converted = _lookup(table, values, key, source, f"{name} does not implement it")
        if key in kwargs:
            kwargs[key] = converted
    kwargs.update(options)
    sampler = _build(cls, kwargs, source)
    if name == "PNDMScheduler" and not _flag(values, "skip_prk_steps", source) and warn:
        warnings.warn(
            f"PNDMScheduler with skip_prk_steps=False warms up with 3 pseudo Runge-Kutta steps, which latentdiff does "
            f"not implement: loaded as {sampler!r}, whose first step is the latent diffusion repository's pseudo "
            f"improved-Euler step instead [{source or 'scheduler config'}]", UserWarning, stacklevel=stacklevel)
    return schedule, sampler


def _sigma_schedule(values: Mapping[str, Any], source: str | None) -> str:
    """use_karras_sigmas / use_exponential_sigmas (None counts as false, as in diffusers) -> sigma_schedule."""
    karras, exponential = _flag(values, "use_karras_sigmas", source), _flag(values, "use_exponential_sigmas", source)
    if karras and exponential:
        raise ConfigError("use_karras_sigmas and use_exponential_sigmas exclude each other",
                          where=_at(source, "use_exponential_sigmas"), expected="at most one of them true",
                          found="both true")
    return "karras" if karras else "exponential" if exponential else "default"


def _lookup(table: Mapping[Any, Any], values: Mapping[str, Any], key: str, source: str | None, why: str) -> Any:
    try:
        return table[values[key]]
    except (KeyError, TypeError):
        raise ConfigError(f"scheduler config key {key!r} has a value latentdiff does not support ({why})",
                          where=_at(source, key), expected=sorted(table), found=repr(values[key])) from None


def _flag(values: Mapping[str, Any], key: str, source: str | None) -> bool:
    """A boolean config key (None counts as false, as in diffusers); another type is a ConfigError."""
    value = values[key]
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"scheduler config key {key!r} must be true or false", where=_at(source, key),
                          expected="bool", found=repr(value))
    return bool(value)


def _latentdiff_options(options: Any, name: str, source: str | None) -> dict[str, Any]:
    """DDIM's or TCD's settings diffusers has no config key for (eta: a `step()` argument there), as written by
    `scheduler_file_config`."""
    if options is None:
        return {}
    if not isinstance(options, dict) or set(options) - {"name", "eta"} or name not in STEP_OPTIONS \
            or options.get("name") != STEP_OPTIONS[name]:
        raise ConfigError(f"malformed {LATENTDIFF_KEY}", where=_at(source, LATENTDIFF_KEY),
                          expected='{"name": "ddim" | "tcd", "eta": <float>} in a DDIMScheduler / TCDScheduler config',
                          found=repr(options))
    return {k: v for k, v in options.items() if k != "name"}


def _registered_sampler(options: Any, name: str, source: str | None) -> SamplerSettings | None:
    """The registered sampler a DDIMScheduler config names under LATENTDIFF_KEY with its settings (None: DDIM's)."""
    if not isinstance(options, dict) or options.get("name") in (None, "ddim") or name != "DDIMScheduler":
        return None
    registered = options["name"]
    if not isinstance(registered, str) or registered not in SAMPLERS.names():
        raise ConfigError("the folder's sampler is not registered in this process", where=_at(source, LATENTDIFF_KEY),
                          expected=f"a registered sampler name ({sorted(SAMPLERS.names())}; register yours "
                                   "before loading, or pass sampler=)", found=repr(registered))
    cls: Any = SAMPLERS.get(registered)
    return cls.from_dict({k: v for k, v in options.items() if k != "name"}, source=_at(source, LATENTDIFF_KEY))


def _build(cls: type, kwargs: dict[str, Any], source: str | None, reverse: Mapping[str, str] | None = None) -> Any:
    """cls(**kwargs), with a type or value error re-raised naming the file and its key."""
    try:
        return cls(**kwargs)
    except ConfigError as e:
        key = (reverse or {}).get(str(e.where), e.where)
        raise ConfigError(e.message, where=_at(source, key), expected=e.expected, found=e.found) from None


def _at(source: str | None, key: Any) -> str:
    return f"{source}: {key}" if source else str(key)


# ---- writing ----------------------------------------------------------------------------------------
def scheduler_file_config(noise_scheduler: NoiseScheduler, sampler: SamplerSettings) -> dict[str, Any]:
    """The config dict of the diffusers scheduler class that describes (noise_scheduler, sampler)."""
    if isinstance(sampler, (DDIMSampler, DDPMSampler)) and type(sampler) in (DDIMSampler, DDPMSampler):
        return _ddim_ddpm_file_config(noise_scheduler, sampler)
    name = WRITTEN_CLASS.get(type(sampler))
    if name is not None and not _diffusers_can_say(sampler) and _is_registered(sampler):
        return _registered_file_config(noise_scheduler, sampler)
    if name is None and _is_registered(sampler):
        return _registered_file_config(noise_scheduler, sampler)
    if name is None:
        raise ConfigError("this sampler has no diffusers scheduler config", where="sampler",
                          expected=sorted(["DDIMSampler", "DDPMSampler"] + [c.__name__ for c in WRITTEN_CLASS])
                          + ["a SamplerSettings dataclass registered with SAMPLERS.register (its settings are saved)"],
                          found=describe(sampler))
    cfg, defaults = noise_scheduler.config, CLASS_DEFAULTS[name]
    if cfg.rescale_zero_terminal_snr and "rescale_betas_zero_snr" not in defaults:
        raise ConfigError(f"diffusers' {name} cannot express a zero-terminal-SNR schedule (it has no "
                          "rescale_betas_zero_snr): it would load another schedule", where="rescale_zero_terminal_snr",
                          expected=f"False with {type(sampler).__name__}", found=True)
    data: dict[str, Any] = dict(defaults)
    data.update({theirs: getattr(cfg, ours) for theirs, ours in SCHEDULE_KEYS.items() if theirs in defaults})
    data["trained_betas"] = list(cfg.trained_betas) if cfg.trained_betas is not None else None
    data.update({key: getattr(sampler, key) for key in CLASS_FIELDS[name]})
    if "use_karras_sigmas" in defaults and isinstance(sampler, SIGMA_GRID_SAMPLERS):
        data.update(use_karras_sigmas=sampler.sigma_schedule == "karras",
                    use_exponential_sigmas=sampler.sigma_schedule == "exponential")
    if name == "PNDMScheduler":
        data["skip_prk_steps"] = True
    if isinstance(sampler, (DPMSolverMultistepSampler, DPMSolverMultistepSDESampler)):  # DPMSolverMultistepScheduler
        data["algorithm_type"] = sampler.algorithm_type
    if isinstance(sampler, TCDSampler) and sampler.eta != TCDSampler().eta:
        data[LATENTDIFF_KEY] = {"name": "tcd", "eta": sampler.eta}
    data.update(_class_name=name, _latentdiff_version=__version__)
    return data


def _diffusers_can_say(sampler: Any) -> bool:
    """Whether the diffusers class of `sampler` has keys for all of its settings (not an A1111 schedule such as
    sgm_uniform, A1111's dropped next-to-last sigma or a default grid interpolated in log sigma, nor the other kind
    of noise than the class draws)."""
    if getattr(sampler, "sigma_schedule", "default") not in DIFFUSERS_SIGMA_SCHEDULES:
        return False
    if getattr(sampler, "ays_model", "sd15") != "sd15" or getattr(sampler, "discard_next_to_last_sigma", False):
        return False
    if getattr(sampler, "sigma_interpolation", "linear") != "linear" and \
            getattr(sampler, "sigma_schedule", "default") == "default":    # k-diffusion's "Uniform": no diffusers key
        return False
    noise = DIFFUSERS_NOISE.get(type(sampler))
    return noise is None or getattr(sampler, "noise_type", noise) == noise


def _is_registered(sampler: Any) -> bool:
    name = getattr(type(sampler), "registry_name", None)
    return isinstance(sampler, SamplerSettings) and isinstance(name, str) and name in SAMPLERS.names() \
        and SAMPLERS.get(name) is type(sampler)


def _registered_file_config(noise_scheduler: NoiseScheduler, sampler: SamplerSettings) -> dict[str, Any]:
    """A registered sampler diffusers has no class for: the noise schedule as a DDIMScheduler config (what diffusers
    reads), the sampler's own settings under LATENTDIFF_KEY (what latentdiff reads back), and a note saying so."""
    shared = {f.name for f in dataclasses.fields(DDIMSampler)} & {f.name for f in dataclasses.fields(sampler)}
    ddim = DDIMSampler(**{k: getattr(sampler, k) for k in shared if k != "eta"})
    data = _ddim_ddpm_file_config(noise_scheduler, ddim)
    name = type(sampler).registry_name
    data[LATENTDIFF_KEY] = {"name": name, **sampler.to_dict()}
    data[NOTE_KEY] = (f"latentdiff samples with its registered sampler {name!r} ({LATENTDIFF_KEY}); diffusers does "
                      "not read it and samples this noise schedule with DDIM")
    return data


def _ddim_ddpm_file_config(noise_scheduler: NoiseScheduler, sampler: DDIMSampler | DDPMSampler) -> dict[str, Any]:
    """The diffusers DDIMScheduler / DDPMScheduler config dict describing (noise_scheduler, sampler)."""
    cfg = noise_scheduler.config
    data: dict[str, Any] = {theirs: getattr(cfg, ours) for theirs, ours in SCHEDULE_KEYS.items()}
    data["trained_betas"] = list(cfg.trained_betas) if cfg.trained_betas is not None else None
    data.update(timestep_spacing=sampler.timestep_spacing, steps_offset=sampler.steps_offset,
                clip_sample=sampler.clip_sample, clip_sample_range=sampler.clip_sample_range,
                thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                _latentdiff_version=__version__)
    if isinstance(sampler, DDIMSampler):
        data.update(_class_name="DDIMScheduler", set_alpha_to_one=sampler.set_alpha_to_one)
        if sampler.eta != 0.0:
            data[LATENTDIFF_KEY] = {"name": "ddim", "eta": sampler.eta}
    else:
        data.update(_class_name="DDPMScheduler", variance_type=sampler.variance_type)
    return data


def write_scheduler_folder(folder: str | os.PathLike, noise_scheduler: NoiseScheduler,
                           sampler: SamplerSettings) -> Path:
    """Write `folder/scheduler_config.json` (the file atomically; wrap in hub.atomic_folder for the folder)."""
    folder = Path(folder)
    data = scheduler_file_config(noise_scheduler, sampler)
    folder.mkdir(parents=True, exist_ok=True)
    hub.write_json(data, folder / SCHEDULER_CONFIG_NAME)
    return folder / SCHEDULER_CONFIG_NAME


# ---- NoiseScheduler.from_pretrained / save_pretrained -----------------------------------------------------
def read_noise_schedule(path_or_id: str | os.PathLike, *, subfolder: str | None = "scheduler",
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        token: str | bool | None = None, local_files_only: bool | None = None) -> NoiseSchedulerConfig:
    """The NoiseSchedulerConfig of `path_or_id`'s scheduler_config.json (a local folder or a Hub repo; under
    `subfolder`), its sampler settings checked but not returned: NoiseScheduler.from_pretrained."""
    prefix = f"{subfolder}/" if subfolder else ""
    location = hub.HubLocation(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    root = location.resolve(path_or_id, allow_patterns=[f"{prefix}{SCHEDULER_CONFIG_NAME}"])
    folder = root / subfolder if subfolder else root
    config, _ = read_scheduler_file(folder / SCHEDULER_CONFIG_NAME, warn=False)
    return config


def save_noise_scheduler(noise_scheduler: NoiseScheduler, save_directory: str | os.PathLike, *,
                         sampler: SamplerSettings | None = None) -> Path:
    """Write `save_directory/scheduler_config.json` atomically for (noise_scheduler, sampler; None: DDIMSampler()):
    NoiseScheduler.save_pretrained."""
    with hub.atomic_folder(save_directory) as tmp:
        write_scheduler_folder(tmp, noise_scheduler, sampler if sampler is not None else DDIMSampler())
    return Path(save_directory)


register_folder_io(load=read_noise_schedule, save=save_noise_scheduler)
