"""Reading and writing diffusers' `scheduler/scheduler_config.json`.

A diffusers scheduler config mixes two things latentdiff keeps apart: the noise schedule (the forward
process the model was trained with -> NoiseSchedulerConfig) and the settings of one sampler (timestep
spacing, offset, clipping -> DDIMSampler / DDPMSampler). The mapping is strict:

* `DDIMScheduler` -> DDIMSampler, `DDPMScheduler` -> DDPMSampler, with every key mapped.
* Other diffusers samplers of the same (discrete, DDPM-family) forward process - PNDM (Stable
  Diffusion v1's default), LMS, Euler, DPM-Solver, UniPC ... - give the same noise schedule and a
  DDIMSampler built exactly as `DDIMScheduler.from_config(config)` would be, with ONE warning saying so.
* A key missing from the file takes diffusers' default (DDIMScheduler's / DDPMScheduler's, which agree).
* A key that would change the model's forward process or output to something latentdiff does not
  implement (thresholding, continuous timesteps, flow sigmas, learned variance ...) at any value but
  the implemented one, a key no supported diffusers scheduler knows, or an unsupported class is a
  ConfigError naming it. Keys that only configure a foreign sampler are accepted and, for foreign
  classes, listed in the warning (diffusers' own DDIMScheduler ignores them too: SD 2.x's DDIM config
  carries PNDM's `skip_prk_steps`).

Files written here are DDIMScheduler / DDPMScheduler configs that diffusers loads to the same schedule;
DDIM's eta (a `step()` argument in diffusers, not a config key) is kept under `_latentdiff_sampler`.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from .. import __version__, hub
from ..config import read_json
from ..errors import ConfigError
from .noise_scheduler import NoiseScheduler, NoiseSchedulerConfig
from .samplers import DDIMSampler, DDPMSampler, Sampler

SCHEDULER_CONFIG_NAME = "scheduler_config.json"

# Classes whose noise schedule we read; the sampler of all but DDIM/DDPM is replaced by DDIM.
NATIVE_CLASSES = {"DDIMScheduler": DDIMSampler, "DDPMScheduler": DDPMSampler}
FOREIGN_CLASSES = (
    "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler", "LCMScheduler", "TCDScheduler",
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
}
# Keys read only when a FIXED_KEYS feature is on (it cannot be), so any value is fine.
INERT_KEYS = ("dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type")
# Keys that configure only a foreign sampler (its step rule or its sigma grid), never the forward process.
FOREIGN_SAMPLER_KEYS = (
    "skip_prk_steps", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "interpolation_type",
    "sigma_min", "sigma_max", "final_sigmas_type", "solver_order", "algorithm_type", "solver_type",
    "lower_order_final", "euler_at_final", "use_lu_lambdas", "lambda_min_clipped", "predict_x0",
    "disable_corrector", "solver_p", "original_inference_steps", "timestep_scaling",
)
KNOWN_KEYS = frozenset(SCHEDULE_KEYS) | frozenset(SAMPLER_KEYS) | frozenset(FIXED_KEYS) | frozenset(INERT_KEYS) \
    | frozenset(FOREIGN_SAMPLER_KEYS)
DDPM_VARIANCE = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",  # exp(log(v)/2) = sqrt(v)
                 "fixed_large": "fixed_large"}
# variance_type values that other classes may carry: the model outputs no variance channels.
NON_LEARNED_VARIANCE = (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
LATENTDIFF_KEY = "_latentdiff_sampler"


# ---- reading ----------------------------------------------------------------------------------------
def load_scheduler_folder(folder: str | os.PathLike) -> tuple[NoiseScheduler, Sampler]:
    """(NoiseScheduler, sampler) from `folder/scheduler_config.json` (a local folder)."""
    config, sampler = read_scheduler_file(Path(folder) / SCHEDULER_CONFIG_NAME, _stacklevel=4)
    return NoiseScheduler(config), sampler


def read_scheduler_file(path: str | os.PathLike, *, warn: bool = True,
                        _stacklevel: int = 3) -> tuple[NoiseSchedulerConfig, Sampler]:
    """(NoiseSchedulerConfig, sampler) from a scheduler_config.json file."""
    return read_scheduler_config(read_json(path), source=str(path), warn=warn, _stacklevel=_stacklevel)


def read_scheduler_config(data: Mapping[str, Any], *, source: str | None = None, warn: bool = True,
                          _stacklevel: int = 2) -> tuple[NoiseSchedulerConfig, Sampler]:
    """Map a diffusers scheduler config dict to (NoiseSchedulerConfig, sampler); see the module docstring.

    `warn`: emit the one warning when a foreign sampler class is replaced by DDIM (`_stacklevel` points
    it at the user's call)."""
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
    values = {**DIFFUSERS_DEFAULTS, **keys}
    schedule = _build(NoiseSchedulerConfig, {ours: values[theirs] for theirs, ours in SCHEDULE_KEYS.items()},
                      source, reverse={v: k for k, v in SCHEDULE_KEYS.items()})
    common = {k: values[k] for k in ("timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range")}
    if name == "DDPMScheduler":
        variance = values["variance_type"]
        if variance not in DDPM_VARIANCE:
            raise ConfigError("DDPM variance type not supported (learned variances need a model that outputs them)",
                              where=_at(source, "variance_type"), expected=sorted(DDPM_VARIANCE), found=repr(variance))
        sampler: Sampler = _build(DDPMSampler, {**common, "variance_type": DDPM_VARIANCE[variance]}, source)
    else:
        if "variance_type" in keys and keys["variance_type"] not in NON_LEARNED_VARIANCE:
            raise ConfigError("a learned variance (the model outputs 2C channels) is not supported",
                              where=_at(source, "variance_type"), expected=list(NON_LEARNED_VARIANCE),
                              found=repr(keys["variance_type"]))
        extra = _latentdiff_options(data.get(LATENTDIFF_KEY), name, source)
        sampler = _build(DDIMSampler, {**common, "set_alpha_to_one": values["set_alpha_to_one"], **extra}, source)
    if name in FOREIGN_CLASSES and warn:
        unused = {k: keys[k] for k in FOREIGN_SAMPLER_KEYS if k in keys}
        warnings.warn(
            f"{name} is not implemented in latentdiff: its noise schedule is used with {sampler!r} instead "
            f"(the sampler diffusers' DDIMScheduler.from_config gives for this config)"
            + (f"; its own settings {unused} are not used" if unused else "")
            + f" [{source or 'scheduler config'}]", UserWarning, stacklevel=_stacklevel)
    return schedule, sampler


def _latentdiff_options(options: Any, name: str, source: str | None) -> dict[str, Any]:
    """DDIM settings diffusers has no config key for (eta), as written by `scheduler_file_config`."""
    if options is None:
        return {}
    if not isinstance(options, dict) or set(options) - {"name", "eta"} or options.get("name") != "ddim" \
            or name != "DDIMScheduler":
        raise ConfigError(f"malformed {LATENTDIFF_KEY}", where=_at(source, LATENTDIFF_KEY),
                          expected='{"name": "ddim", "eta": <float>} in a DDIMScheduler config', found=repr(options))
    return {k: v for k, v in options.items() if k != "name"}


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
def scheduler_file_config(noise_scheduler: NoiseScheduler, sampler: Sampler) -> dict[str, Any]:
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
    elif isinstance(sampler, DDPMSampler):
        data.update(_class_name="DDPMScheduler", variance_type=sampler.variance_type)
    else:
        raise ConfigError("this sampler has no diffusers scheduler config", where="sampler",
                          expected="DDIMSampler or DDPMSampler", found=type(sampler).__name__)
    return data


def write_scheduler_folder(folder: str | os.PathLike, noise_scheduler: NoiseScheduler, sampler: Sampler) -> Path:
    """Write `folder/scheduler_config.json` (the file atomically; wrap in hub.atomic_folder for the folder)."""
    folder = Path(folder)
    data = scheduler_file_config(noise_scheduler, sampler)
    folder.mkdir(parents=True, exist_ok=True)
    hub.write_json(data, folder / SCHEDULER_CONFIG_NAME)
    return folder / SCHEDULER_CONFIG_NAME
