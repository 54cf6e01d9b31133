"""Samplers of the reverse process: pure loops per family, thin immutable classes over them, the grids they walk.

    sampler = DDIMSampler(eta=0.0, timestep_spacing="leading", steps_offset=1)
    x_0 = sampler.sample(denoise, x_T, noise_scheduler, 50, generator=torch.Generator().manual_seed(0))

A sampler is a frozen dataclass (an unknown keyword is a TypeError, a bad value a ConfigError) with no state
between calls: two threads can share one, with different step counts. The noise schedule comes from the
NoiseScheduler passed to each call, so one sampler serves any model. Every sampler satisfies
`SamplerProtocol`: `sample(denoise, x_T, noise_scheduler, N, *, start_step, generator, callback, progress)`,
`noise_to_start(x0, noise, noise_scheduler, N, start_step)` and `init_noise_sigma`.

    base.py            the shared types (Denoiser, Generator, StepCallback), the protocol, the step-callback
                       contract, the checks, `switch_sampler`
    grids.py           `timestep_grid(T, N, kind=...)` and the sigma grids
    discrete_loops.py  DDIM, DDPM, PLMS as pure functions on alphas_cumprod
    sigma_loops.py     Euler, Euler ancestral, Heun, LMS, DPM-Solver++ as pure functions on sigmas (k-diffusion)
    discrete.py        DDIMSampler, DDPMSampler, PLMSSampler
    consistency.py     LCMSampler: multistep consistency sampling (LCM), its loop and boundary scalings
    sigma.py           EulerSampler, EulerAncestralSampler, HeunSampler, LMSSampler, DPMSolverMultistep(SDE)Sampler
    dpm_loops.py       DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE, DPM++ 3M SDE as pure functions on sigmas (k-diffusion)
    dpm.py             DPM2Sampler, DPM2AncestralSampler, DPMPP2SAncestralSampler, DPMSolverSDESampler,
                       DPMPP3MSDESampler
    brownian.py        Brownian-tree noise of the SDE samplers (torchsde's BrownianTree, without torchsde)
    multistep_loops.py UniPC and DEIS as pure functions on sigmas
    multistep.py       UniPCSampler (and its ComfyUI-named variants), DEISSampler, on DPM-Solver's grid
    tcd.py             TCD (trajectory consistency distillation): its loop on alphas_cumprod and TCDSampler

`Sampler` is the base of the discrete samplers (its name since 0.1), `SigmaSampler` of the sigma-space ones,
`SamplerSettings` of both. Importing this package registers every sampler with `registry.SAMPLERS`.
"""
from __future__ import annotations

from .base import (
                   Denoiser,
                   Generator,
                   NoiseSampler,
                   SamplerProtocol,
                   SamplerSettings,
                   StepCallback,
                   as_step_callback,
                   check_sampler,
                   switch_sampler,
)
from .brownian import BrownianNoise, BrownianTree
from .consistency import LCMSampler
from .discrete import DDIMSampler, DDPMSampler, PLMSSampler, Sampler, SamplingPlan
from .dpm import DPM2AncestralSampler, DPM2Sampler, DPMPP2SAncestralSampler, DPMPP3MSDESampler, DPMSolverSDESampler
from .grids import timestep_grid
from .multistep import DEISSampler, UniPCBH1Sampler, UniPCBH2Sampler, UniPCSampler
from .sigma import (
                   DPMSolverMultistepSampler,
                   DPMSolverMultistepSDESampler,
                   EulerAncestralSampler,
                   EulerSampler,
                   HeunSampler,
                   LMSSampler,
                   SigmaPlan,
                   SigmaSampler,
)
from .tcd import TCDSampler

__all__ = ["SamplingPlan", "Sampler", "DDIMSampler", "DDPMSampler", "PLMSSampler", "LCMSampler", "SigmaPlan",
           "SigmaSampler",
           "EulerSampler", "EulerAncestralSampler", "HeunSampler", "LMSSampler", "DPMSolverMultistepSampler",
           "DPMSolverMultistepSDESampler", "DPM2Sampler", "DPM2AncestralSampler", "DPMPP2SAncestralSampler",
           "DPMSolverSDESampler", "DPMPP3MSDESampler", "BrownianTree", "BrownianNoise", "UniPCSampler",
           "UniPCBH1Sampler", "UniPCBH2Sampler", "DEISSampler", "TCDSampler", "SamplerProtocol",
           "SamplerSettings", "Denoiser", "Generator", "NoiseSampler", "StepCallback", "as_step_callback",
           "check_sampler", "switch_sampler", "timestep_grid"]
