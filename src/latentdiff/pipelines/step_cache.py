"""Pipeline switches that change how each step runs the UNet: DeepCache and FreeU, off by default.

    pipe.enable_deepcache(3, 0)              # a full UNet pass every 3rd step, the shallow branch 0 between
    pipe.enable_freeu(0.9, 0.2, 1.5, 1.6)    # FreeU with SD 1.x's published factors
    image = pipe("a castle").images[0]
    pipe.disable_deepcache(); pipe.disable_freeu()

DeepCache (Ma et al. 2024; `models.deep_cache`): which steps run the full UNet is decided here, per run. The
uniform choice (the paper's 1:N strategy) takes steps 0, N, 2N, ...; the non-uniform one (uniform=False) as many
steps, ceil(steps / N), placed more densely around step `center` (the paper's non-uniform 1:N; the schedule of
DeepCache's `sample_from_quad_center`, including its arithmetic: a negative base to the fractional power 1/p is
complex there, and the real part of its p-th power is kept; p lowered by 0.02 until the count is exact).

The step index is counted, never read from t (as `control.Controlled` counts it): the wrapped step callback
advances it after every sampler step; a run started part-way (image-to-image) counts its own steps from 0; the
doubled batch of classifier-free guidance is one model call of one step. Every model call of a full step runs
the full UNet and stores its feature, each under its position in the step (`DeepCacheState.slot`).

FreeU (Si et al. 2023; `models.freeu`): diffusers' `enable_freeu(s1, s2, b1, b2)`, passed to the UNet on every
call. Both switches reach the UNet as keywords of its forward (`cache=`, `freeu=`), so ControlNets, T2I-Adapters,
guidance, inpainting's concatenated inputs and SDXL's added conditioning wrap them unchanged.

Where the settings live: on the UNet (`SETTINGS`, an attribute of the module, as ToMe's settings live on its
transformer blocks and diffusers' FreeU on its up blocks), not on the pipeline. Pipelines that share a UNet
(`from_pipe`, `OtherPipeline(**pipe.components)`) share its switches: enabled on one, in effect in all; disabled
on one, off in all. A pipeline given another UNet (`from_pipe(pipe, unet=...)`) has that UNet's (none).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from ..config import is_int, is_real
from ..diffusion.samplers import StepCallback
from ..diffusion.samplers.base import StepCounting
from ..errors import InputError
from ..models.deep_cache import DeepCacheState, branch_point
from ..models.freeu import FreeU

Model = Callable[..., torch.Tensor]


def nonuniform_full_steps(steps: int, count: int, *, center: int, power: float) -> list[int]:
    """DeepCache's non-uniform choice of `count` full steps among `steps`: 0, then points denser around step
    `center` (module docstring). InputError when no power above 1 gives `count` distinct steps."""
    p = power
    while p > 1:
        low, high = complex(-center) ** (1 / p), complex(steps - center) ** (1 / p)
        points = [low + (high - low) * j / count for j in range(count + 1)]
        values = sorted({math.trunc((z ** p).real) for z in points})
        chosen = [0] + [v + center for v in values[1:-1]]
        if len(chosen) == count:
            return chosen
        p -= 0.02
    raise InputError("DeepCache's non-uniform schedule finds no such set of full steps", where="cache_interval",
                     expected="a larger interval, a smaller center, or uniform=True",
                     found={"steps": steps, "full steps": count, "center": center})


@dataclasses.dataclass(frozen=True)
class DeepCache:
    """DeepCache's settings: a full pass every `cache_interval` steps (1: every step, the plain run), the skip
    branch `cache_branch_id` (`models.deep_cache`), uniform or non-uniform full steps (`center`, `power`: the
    non-uniform schedule's, DeepCache's 15 and 1.4)."""

    cache_interval: int = 3
    cache_branch_id: int = 0
    uniform: bool = True
    center: int = 15
    power: float = 1.4

    def __post_init__(self) -> None:
        if not is_int(self.cache_interval) or self.cache_interval < 1:
            raise InputError("cache_interval must be a positive integer", where="cache_interval",
                             expected="an int >= 1 (1: no caching)", found=self.cache_interval)
        if not is_int(self.cache_branch_id) or self.cache_branch_id < 0:
            raise InputError("cache_branch_id must be a skip index", where="cache_branch_id", expected="an int >= 0",
                             found=self.cache_branch_id)
        if not isinstance(self.uniform, bool):
            raise InputError("uniform must be True or False", where="uniform", expected="bool", found=self.uniform)
        if not is_int(self.center) or self.center < 0 or not is_real(self.power) or not self.power > 1:
            raise InputError("the non-uniform schedule needs center >= 0 and power > 1", where="center/power",
                             expected="int >= 0, float > 1", found=(self.center, self.power))

    def full_steps(self, steps: int) -> frozenset[int]:
        """The steps (0-based, of `steps` run) that run the full UNet."""
        n = self.cache_interval
        if n == 1 or steps <= 1:
            return frozenset(range(steps))
        if self.uniform:
            return frozenset(range(0, steps, n))
        return frozenset(nonuniform_full_steps(steps, math.ceil(steps / n), center=self.center, power=self.power))


class SwitchedModel(StepCounting):
    """model(x, t, **kw) with the pipeline's switches as the UNet's keywords: `cache=` (the run's DeepCacheState,
    `full` set for the current step, `slot` the call's position in it) and `freeu=`. `counting(callback)` advances
    the step. One per run: it holds the run's state."""

    def __init__(self, model: Model, *, deepcache: DeepCache | None, freeu: FreeU | None, steps: int):
        self.model, self.freeu = model, freeu
        self.state = None if deepcache is None else DeepCacheState(branch=deepcache.cache_branch_id)
        self.full = frozenset() if deepcache is None else deepcache.full_steps(steps)
        self.step, self.calls = 0, 0

    def __call__(self, x: torch.Tensor, t: Any, **kwargs: Any) -> torch.Tensor:
        if self.state is not None:
            self.state.full, self.state.slot = self.step in self.full, self.calls
            self.calls += 1
            kwargs["cache"] = self.state
        if self.freeu is not None:
            kwargs["freeu"] = self.freeu
        return self.model(x, t, **kwargs)

    def step_started(self) -> None:
        """Each step's calls count from 0 (`slot`)."""
        self.calls = 0


SETTINGS = "step_switches"   # the UNet's attribute holding its StepSettings (absent: both off)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """A UNet's DeepCache and FreeU settings (None: off)."""

    deepcache: DeepCache | None = None
    freeu: FreeU | None = None


def step_settings(unet: Any) -> StepSettings:
    """The switches set on `unet` (both off when none were)."""
    settings = getattr(unet, SETTINGS, None)
    return settings if isinstance(settings, StepSettings) else StepSettings()


def set_step_settings(unet: Any, **changes: Any) -> None:
    """Replace some of `unet`'s switches (`StepSettings` fields); a plain attribute, never a parameter or buffer."""
    setattr(unet, SETTINGS, dataclasses.replace(step_settings(unet), **changes))


class StepSwitches:
    """The pipeline methods of the switches (a mixin of the denoising pipelines): enable / disable, and `switched`,
    which the denoising stage calls once per run. The settings are the UNet's (module docstring): pipelines that
    share it share them."""

    unet: Any

    @property
    def _deepcache(self) -> DeepCache | None:
        return step_settings(self.unet).deepcache

    @property
    def _freeu(self) -> FreeU | None:
        return step_settings(self.unet).freeu

    def enable_deepcache(self, cache_interval: int = 3, cache_branch_id: int = 0, *, uniform: bool = True,
                         center: int = 15, power: float = 1.4) -> None:
        """DeepCache (Ma et al. 2024): a full UNet pass every `cache_interval` steps, and between them only the
        shallow branch `cache_branch_id` (0: conv_in's skip, DeepCache's default) on the stored deep features.
        uniform=False: the paper's non-uniform choice of full steps, denser around step `center`."""
        settings = DeepCache(cache_interval, cache_branch_id, uniform=uniform, center=center, power=power)
        branch_point(self.unet.down_blocks, self.unet.up_blocks, cache_branch_id)   # in range for this UNet
        set_step_settings(self.unet, deepcache=settings)

    def disable_deepcache(self) -> None:
        set_step_settings(self.unet, deepcache=None)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (Si et al. 2023), with diffusers' semantics: skip factors s1, s2 and backbone factors b1, b2 of the
        first two up levels (SD 1.x: 0.9, 0.2, 1.5, 1.6; SD 2.x: 0.9, 0.2, 1.4, 1.6; SDXL: 0.6, 0.4, 1.1, 1.2)."""
        set_step_settings(self.unet, freeu=FreeU(s1, s2, b1, b2))

    def disable_freeu(self) -> None:
        set_step_settings(self.unet, freeu=None)

    def switched(self, model: Model, callback: StepCallback | None, *,
                 steps: int) -> tuple[Model, StepCallback | None]:
        """(model, callback) for a run of `steps` steps: unchanged with both switches off, else the model with
        the switches' keywords and the callback that counts its steps."""
        settings = step_settings(self.unet)
        if settings.deepcache is None and settings.freeu is None:
            return model, callback
        wrapped = SwitchedModel(model, deepcache=settings.deepcache, freeu=settings.freeu, steps=steps)
        return wrapped, wrapped.counting(callback) if settings.deepcache is not None else callback
