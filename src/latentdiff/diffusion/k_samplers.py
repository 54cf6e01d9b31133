"""Former home of the sigma-space sampler classes: a re-export, kept so that old imports work. The code lives in
`samplers.sigma`."""
from __future__ import annotations

from .samplers.sigma import (
                             DPMSolverMultistepSampler,
                             DPMSolverMultistepSDESampler,
                             EulerAncestralSampler,
                             EulerSampler,
                             HeunSampler,
                             LMSSampler,
                             SigmaPlan,
                             SigmaSampler,
                             SigmaSchedule,
)

__all__ = ["SigmaSchedule", "SigmaPlan", "SigmaSampler", "EulerSampler", "EulerAncestralSampler", "HeunSampler",
           "LMSSampler", "DPMSolverMultistepSampler", "DPMSolverMultistepSDESampler"]
