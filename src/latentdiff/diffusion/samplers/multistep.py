"""UniPC and DEIS samplers: thin immutable classes over `multistep_loops`, on DPM-Solver's grid.

    sampler = UniPCSampler(solver_order=3, solver_type="bh1", sigma_schedule="karras")
    x_0 = sampler.sample(denoise, x_T, noise_scheduler, 10)

The interface, the model call and the state are DPMSolverMultistepSampler's (`sigma.py`): diffusers'
UniPCMultistepScheduler and DEISMultistepScheduler build DPM-Solver's timestep grid, run on x_t, and call the model
with int64 timesteps, so the three share `MultistepSigmaSampler` and differ only in the hooks where diffusers
differs: UniPC's karras / exponential grid may be bounded by sigma_min / sigma_max, and its "sigma_min" final sigma
is the grid's last on those; DEIS always ends at a positive sigma (the smallest trained one, or the karras /
exponential grid's last, repeated, so its last step is the identity, as in diffusers).

The names people use (`names.py`): diffusers' classes load as `unipc` / `deis`; ComfyUI's "uni_pc" and A1111's "UniPC"
(both B(h) = bh1, order 3: ComfyUI's `sample_unipc`, A1111's `uni_pc_variant` / `uni_pc_order` defaults) are
`uni_pc`, ComfyUI's "uni_pc_bh2" is `uni_pc_bh2`; those two fix solver_type and solver_order by their name, and keep
the other settings of the sampler they are switched from. Their own grids (A1111's "time_uniform" continuous time,
ComfyUI's scheduler list) are not reproduced: they run on latentdiff's grids, which a schedule name chooses.

Differences from diffusers 0.42 (none changes a result where diffusers' is finite):
* A step to sigma = 0 returns the model's x0 prediction (the limit of the first-order update). diffusers computes
  -inf * 0 there for bh1 (a NaN image unless lower_order_final makes it first order with bh2), and inf * 0 for
  predict_x0=False.
* `solver_p` (another scheduler as the predictor) and thresholding are not offered.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np

from ...errors import ConfigError
from ...registry import SAMPLERS
from . import multistep_loops
from .base import SamplerSettings
from .sigma import MultistepSigmaSampler

ORDERS = (1, 2, 3)


def _check_order(order: int) -> None:
    if order not in ORDERS:
        raise ConfigError("solver_order must be 1, 2 or 3", where="solver_order", expected=list(ORDERS), found=order)


@SAMPLERS.register("unipc")
@dataclasses.dataclass(frozen=True, kw_only=True)
class UniPCSampler(MultistepSigmaSampler):
    """UniPC (Zhao et al. 2023): UniP-p predictor and UniC-p corrector, p = solver_order. diffusers:
    UniPCMultistepScheduler, whose defaults these are."""

    solver_order: int = 2
    solver_type: Literal["bh1", "bh2"] = "bh2"   # B(h) = h (bh1, better for few steps unguided) or e^h - 1 (bh2)
    predict_x0: bool = True            # data prediction (x0 outputs); False: noise prediction
    lower_order_final: bool = True     # the last steps fall to first order (always, not only below 15 steps)
    disable_corrector: tuple[int, ...] = ()   # steps whose result is not corrected
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"
    sigma_min: float | None = None     # ends of the karras / exponential grid (None: the trained range)
    sigma_max: float | None = None

    # Settings a registered variant's name fixes (ComfyUI's uni_pc = bh1, order 3): `from_config` keeps them.
    named_settings: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        super().validate()
        _check_order(self.solver_order)
        for name in ("sigma_min", "sigma_max"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive number", where=name, expected="> 0", found=value)
        if any(i < 0 for i in self.disable_corrector):
            raise ConfigError("disable_corrector lists step indices (>= 0)", where="disable_corrector",
                              expected="indices >= 0", found=self.disable_corrector)

    @classmethod
    def from_config(cls, config: Any, **changes: Any) -> Any:
        """As `SamplerSettings.from_config`; a DPM-Solver / DEIS solver_type becomes bh2 (as diffusers' UniPC turns
        it), and a variant keeps the settings its name fixes unless the config is its own."""
        if isinstance(config, SamplerSettings):
            config = config.config
        if isinstance(config, Mapping):
            config = dict(config)
            if config.get("solver_type") in ("midpoint", "heun", "logrho"):
                config["solver_type"] = "bh2"
            if config.get("_class_name") != cls.__name__:
                config = {k: v for k, v in config.items() if k not in cls.named_settings}
        return super().from_config(config, **changes)

    def _sigma_range(self, table: np.ndarray) -> tuple[float, float]:
        low, high = super()._sigma_range(table)
        return (low if self.sigma_min is None else self.sigma_min), (high if self.sigma_max is None else self.sigma_max)

    def _final_sigma(self, table: np.ndarray, sigmas: np.ndarray) -> float:
        if self.final_sigmas_type == "sigma_min" and self.sigma_schedule != "default":
            return sigmas[-1].item()                       # the karras / exponential grid's own end
        return super()._final_sigma(table, sigmas)

    def _run(self, model, x, plan, noise, callback, progress):
        return multistep_loops.sample_unipc(
            model, x, plan.sigmas, solver_order=self.solver_order, variant=self.solver_type,
            predict_x0=self.predict_x0, lower_order_final=self.lower_order_final,
            disable_corrector=[i - plan.start_step for i in self.disable_corrector], callback=callback,
            progress=progress)


@SAMPLERS.register("uni_pc")
@dataclasses.dataclass(frozen=True, kw_only=True)
class UniPCBH1Sampler(UniPCSampler):
    """ComfyUI's "uni_pc" and A1111's "UniPC": UniPC with B(h) = h (bh1), third order."""

    solver_order: int = 3
    solver_type: Literal["bh1", "bh2"] = "bh1"
    named_settings: ClassVar[tuple[str, ...]] = ("solver_order", "solver_type")


@SAMPLERS.register("uni_pc_bh2")
@dataclasses.dataclass(frozen=True, kw_only=True)
class UniPCBH2Sampler(UniPCSampler):
    """ComfyUI's "uni_pc_bh2": UniPC with B(h) = e^h - 1 (bh2), third order."""

    solver_order: int = 3
    named_settings: ClassVar[tuple[str, ...]] = ("solver_order", "solver_type")


@SAMPLERS.register("deis")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DEISSampler(MultistepSigmaSampler):
    """DEIS multistep with the log-rho polynomial (Zhang & Chen 2023). diffusers: DEISMultistepScheduler
    (algorithm_type "deis", solver_type "logrho", the only ones it implements)."""

    solver_order: int = 2
    lower_order_final: bool = True    # first order at the last step, second at the one before, below 15 steps

    algorithm_type: ClassVar[str] = "deis"
    solver_type: ClassVar[str] = "logrho"

    def validate(self) -> None:
        super().validate()
        _check_order(self.solver_order)

    def _final_sigma(self, table: np.ndarray, sigmas: np.ndarray) -> float:
        return table[0].item() if self.sigma_schedule == "default" else sigmas[-1].item()

    def _run(self, model, x, plan, noise, callback, progress):
        # diffusers' "fewer than 15 steps" counts the whole grid, also for a run started part-way
        few_steps = plan.start_step + len(plan.timesteps) < 15
        return multistep_loops.sample_deis(model, x, plan.sigmas, solver_order=self.solver_order,
                                           lower_order_final=self.lower_order_final and few_steps,
                                           callback=callback, progress=progress)

