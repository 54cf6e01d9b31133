"""diffusers 0.42's scheduler classes latentdiff reads natively since issue 20 (UniPC, DEIS, TCD): the defaults of
their __init__ and the keys that hold a setting of the sampler each loads as. Data for `scheduler_io`, which merges
these tables into its own (CLASS_DEFAULTS, CLASS_FIELDS); kept apart so that module stays one screenful of logic."""
from __future__ import annotations

from typing import Any

_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "trained_betas": None, "prediction_type": "epsilon"}
_THRESHOLD = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_FLOW = {"use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False, "time_shift_type": "exponential"}
_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_SPACING = {"timestep_spacing": "linspace", "steps_offset": 0}

MULTISTEP_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "UniPCMultistepScheduler": {
        **_BETAS, **_THRESHOLD, **_FLOW, **_SIGMAS, **_SPACING, "solver_order": 2, "predict_x0": True,
        "solver_type": "bh2", "lower_order_final": True, "disable_corrector": [], "solver_p": None,
        "final_sigmas_type": "zero", "rescale_betas_zero_snr": False, "sigma_min": None, "sigma_max": None,
        "shift_terminal": None},
    "DEISMultistepScheduler": {
        **_BETAS, **_THRESHOLD, **_FLOW, **_SIGMAS, **_SPACING, "solver_order": 2, "algorithm_type": "deis",
        "solver_type": "logrho", "lower_order_final": True},
    "TCDScheduler": {
        **_BETAS, **_THRESHOLD, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
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
