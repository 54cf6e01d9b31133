"""Former home of the sigma-space sampler loops: a re-export, kept so that old imports work. The code lives in
`samplers.sigma_loops`."""
from __future__ import annotations

from .samplers.base import StepCallback
from .samplers.sigma_loops import (
                                   SigmaDenoiser,
                                   ancestral_step,
                                   discrete_time_denoiser,
                                   dpm_solver_order,
                                   gauss_legendre_4,
                                   lms_coefficient,
                                   sample_dpmpp_2m,
                                   sample_euler,
                                   sample_euler_ancestral,
                                   sample_heun,
                                   sample_lms,
                                   to_d,
)

__all__ = ["SigmaDenoiser", "StepCallback", "discrete_time_denoiser", "to_d", "sample_euler", "ancestral_step",
           "sample_euler_ancestral", "sample_heun", "gauss_legendre_4", "lms_coefficient", "sample_lms",
           "dpm_solver_order", "sample_dpmpp_2m"]
