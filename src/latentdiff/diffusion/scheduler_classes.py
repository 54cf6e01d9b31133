"""diffusers 0.42's scheduler classes latentdiff reads natively: the defaults of their __init__ (CLASS_DEFAULTS), the
keys that hold a setting of the sampler each loads as (CLASS_FIELDS), and the keys accepted at one value only
(CLASS_FIXED_KEYS). Data for `scheduler_io`, kept apart so that module stays logic.
BETAS, SIGMAS, SPACING: the key groups most diffusers classes share, with their defaults (scheduler_io uses them
too)."""
from __future__ import annotations

import math
from typing import Any

BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
         "trained_betas": None, "prediction_type": "epsilon"}
_THRESHOLD = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_FLOW = {"use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False, "time_shift_type": "exponential"}
SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
SPACING = {"timestep_spacing": "linspace", "steps_offset": 0}

MULTISTEP_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "UniPCMultistepScheduler": {
        **BETAS, **_THRESHOLD, **_FLOW, **SIGMAS, **SPACING, "solver_order": 2, "predict_x0": True,
        "solver_type": "bh2", "lower_order_final": True, "disable_corrector": [], "solver_p": None,
        "final_sigmas_type": "zero", "rescale_betas_zero_snr": False, "sigma_min": None, "sigma_max": None,
        "shift_terminal": None},
    "DEISMultistepScheduler": {
        **BETAS, **_THRESHOLD, **_FLOW, **SIGMAS, **SPACING, "solver_order": 2, "algorithm_type": "deis",
        "solver_type": "logrho", "lower_order_final": True},
    "TCDScheduler": {
        **BETAS, **_THRESHOLD, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": True,
        "steps_offset": 0, "timestep_spacing": "leading", "timestep_scaling": 10.0, "rescale_betas_zero_snr": False},
}
MULTISTEP_CLASS_FIELDS: dict[str, tuple[str, ...]] = {
    "UniPCMultistepScheduler": ("timestep_spacing", "steps_offset", "solver_order", "solver_type", "predict_x0",
                                "lower_order_final", "disable_corrector", "final_sigmas_type", "sigma_min",
                                "sigma_max"),
    "DEISMultistepScheduler": ("timestep_spacing", "steps_offset", "solver_order", "lower_order_final"),
    # TCD never clips and ignores set_alpha_to_one (it ends at abar_0) and timestep_scaling: not settings of ours
    "TCDScheduler": ("timestep_spacing", "steps_offset", "original_inference_steps"),
}
# What UniPC and DEIS turn another solver's settings into (diffusers' __init__ of each), per key.
SOLVER_KEYS: dict[str, dict[str, dict[Any, Any]]] = {
    "UniPCMultistepScheduler": {"solver_type": {"bh1": "bh1", "bh2": "bh2", "midpoint": "bh2", "heun": "bh2",
                                                "logrho": "bh2"}},
    "DEISMultistepScheduler": {"solver_type": dict.fromkeys(("logrho", "midpoint", "heun", "bh1", "bh2"), "logrho"),
                               "algorithm_type": dict.fromkeys(("deis", "dpmsolver", "dpmsolver++"), "deis")},
}


# ---- every class scheduler_io reads natively (the multistep ones above merged in) ----------------------------
# __init__ keys and defaults of diffusers 0.42's classes read by `_read_native` (all native ones but DDIM / DDPM).
_BETAS, _SPACING, _SIGMAS = BETAS, SPACING, SIGMAS
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "PNDMScheduler": {**_BETAS, "skip_prk_steps": False, "set_alpha_to_one": False, **_SPACING,
                      "timestep_spacing": "leading"},
    "EulerDiscreteScheduler": {**_BETAS, "interpolation_type": "linear", **_SIGMAS, "sigma_min": None,
                               "sigma_max": None, **_SPACING, "timestep_type": "discrete",
                               "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"},
    "EulerAncestralDiscreteScheduler": {**_BETAS, **_SPACING, "rescale_betas_zero_snr": False},
    "HeunDiscreteScheduler": {**_BETAS, "beta_start": 0.00085, "beta_end": 0.012, **_SIGMAS, "clip_sample": False,
                              "clip_sample_range": 1.0, **_SPACING},
    "LMSDiscreteScheduler": {**_BETAS, **_SIGMAS, **_SPACING},
    "KDPM2DiscreteScheduler": {**_BETAS, "beta_start": 0.00085, "beta_end": 0.012, **_SIGMAS, **_SPACING},
    "KDPM2AncestralDiscreteScheduler": {**_BETAS, "beta_start": 0.00085, "beta_end": 0.012, **_SIGMAS, **_SPACING},
    "DPMSolverSDEScheduler": {**_BETAS, "beta_start": 0.00085, "beta_end": 0.012, **_SIGMAS,
                              "noise_sampler_seed": None, **_SPACING},
    "DPMSolverMultistepScheduler": {
        **_BETAS, "solver_order": 2, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
        "lower_order_final": True, "euler_at_final": False, **_SIGMAS, "use_lu_lambdas": False,
        "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf,
        "variance_type": None, **_SPACING, "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
        "time_shift_type": "exponential"},
    **MULTISTEP_CLASS_DEFAULTS,
    "LCMScheduler": {**_BETAS, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                     "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
                     "set_alpha_to_one": True, "steps_offset": 0, "thresholding": False,
                     "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "timestep_spacing": "leading",
                     "timestep_scaling": 10.0, "rescale_betas_zero_snr": False},
}
# Sampler fields that hold the diffusers key of the same name, per class.
CLASS_FIELDS: dict[str, tuple[str, ...]] = {
    "PNDMScheduler": ("timestep_spacing", "steps_offset", "set_alpha_to_one"),
    "EulerDiscreteScheduler": ("timestep_spacing", "steps_offset", "sigma_min", "sigma_max", "final_sigmas_type"),
    "EulerAncestralDiscreteScheduler": ("timestep_spacing", "steps_offset"),
    "HeunDiscreteScheduler": ("timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range"),
    "LMSDiscreteScheduler": ("timestep_spacing", "steps_offset"),
    "KDPM2DiscreteScheduler": ("timestep_spacing", "steps_offset"),
    "KDPM2AncestralDiscreteScheduler": ("timestep_spacing", "steps_offset"),
    "DPMSolverSDEScheduler": ("timestep_spacing", "steps_offset", "noise_sampler_seed"),
    "DPMSolverMultistepScheduler": ("timestep_spacing", "steps_offset", "solver_order", "solver_type",
                                    "lower_order_final", "euler_at_final", "final_sigmas_type", "lambda_min_clipped"),
    **MULTISTEP_CLASS_FIELDS,
    "LCMScheduler": ("timestep_spacing", "steps_offset", "original_inference_steps", "timestep_scaling", "clip_sample",
                     "clip_sample_range"),
}
# Keys of those classes accepted only at the value(s) latentdiff implements, checked where the class has them.
CLASS_FIXED_KEYS: dict[str, tuple[tuple[Any, ...], str]] = {
    "interpolation_type": (("linear",), "log-linear sigma interpolation is not implemented"),
    "use_beta_sigmas": ((False, None), "beta-distributed sigmas (Lee et al. 2024) are not implemented"),
    "use_lu_lambdas": ((False, None), "uniform-lambda grids (Lu et al. 2024) are not implemented"),
}
