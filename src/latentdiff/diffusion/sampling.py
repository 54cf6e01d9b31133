"""Former home of the discrete-time sampler loops and the shared sampler types: a re-export, kept so that old
imports work. The code lives in `samplers/` (`samplers.discrete_loops`, `samplers.base`, `samplers.grids`) and, for
`model_output_to_x0_eps`, in `schedules`."""
from __future__ import annotations

from .samplers.base import (
    TIMESTEP_SPACINGS,
    Denoiser,
    Generator,
    NoiseSampler,
    StepCallback,
    TimestepSpacing,
    VarianceType,
    after_step,
    check_generator,
    check_num_inference_steps,
    check_sample_call,
    check_start_step,
    noise_sampler_from,
)
from .samplers.base import initial_sample as noise_to_start  # its former name here: (plan, x0, noise) -> x
from .samplers.discrete_loops import (
    PLMS_COEFFICIENTS,
    check_plan,
    ddim_sigma,
    ddim_step,
    ddpm_step,
    plms_eps,
    plms_transfer,
    sample_ddim,
    sample_ddpm,
    sample_plms,
)
from .samplers.grids import timestep_grid
from .schedules import PREDICTION_TYPES, PredictionType, model_output_to_x0_eps

Callback = StepCallback   # its former name here


def select_timesteps(num_train_timesteps: int, num_inference_steps: int, *, spacing: str = "leading",
                     steps_offset: int = 0) -> list[int]:
    """timestep_grid(..., kind="discrete") as a list of Python ints."""
    return timestep_grid(num_train_timesteps, num_inference_steps, kind="discrete", spacing=spacing,
                         steps_offset=steps_offset).tolist()


__all__ = ["PredictionType", "PREDICTION_TYPES", "TimestepSpacing", "TIMESTEP_SPACINGS", "VarianceType", "Denoiser",
           "NoiseSampler", "Callback", "Generator", "select_timesteps", "check_start_step", "check_num_inference_steps",
           "model_output_to_x0_eps", "ddim_sigma", "ddim_step", "ddpm_step", "noise_sampler_from", "check_generator",
           "check_sample_call", "noise_to_start", "after_step", "sample_ddim", "sample_ddpm", "PLMS_COEFFICIENTS",
           "plms_eps", "plms_transfer", "sample_plms", "check_plan"]
