"""Former home of the sigma grids: a re-export, kept so that old imports work. The code lives in `samplers.grids`,
where one function, `timestep_grid(..., kind=)`, builds the timesteps of every sampler."""
from __future__ import annotations

import numpy as np

from .samplers.grids import (
    KARRAS_RHO,
    ZERO_SNR_ALPHA_CUMPROD,
    exponential_sigmas,
    init_noise_sigma,
    interpolate_sigmas,
    karras_sigmas,
    lambda_clipped_last_timestep,
    sigma_table,
    sigma_to_t,
    timestep_grid,
)


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, *, spacing: str,
                     steps_offset: int = 0) -> np.ndarray:
    """timestep_grid(..., kind="euler"): the float32 grid of EulerDiscreteScheduler / Heun / LMS."""
    return timestep_grid(num_train_timesteps, num_inference_steps, kind="euler", spacing=spacing,
                         steps_offset=steps_offset)


def dpm_solver_timesteps(num_train_timesteps: int, num_inference_steps: int, *, spacing: str, steps_offset: int = 0,
                         last_timestep: int | None = None) -> np.ndarray:
    """timestep_grid(..., kind="dpm_solver"): the int64 grid of DPMSolverMultistepScheduler."""
    return timestep_grid(num_train_timesteps, num_inference_steps, kind="dpm_solver", spacing=spacing,
                         steps_offset=steps_offset, last_timestep=last_timestep)


__all__ = ["ZERO_SNR_ALPHA_CUMPROD", "KARRAS_RHO", "sigma_table", "spaced_timesteps", "dpm_solver_timesteps",
           "lambda_clipped_last_timestep", "interpolate_sigmas", "karras_sigmas", "exponential_sigmas", "sigma_to_t",
           "init_noise_sigma"]
