"""Control networks inside the denoiser: what every pipeline's control shares.

    units = [ControlNetUnit(cn, hint, scale=1.0, start=0.0, end=0.8)]       # one per ControlNet (or adapter)
    model = controlled(unet, units, steps=N)                                # unet(x, t, context=...) + residuals
    denoise = classifier_free_guidance(model, context=cond, uncond_context=uncond, guidance_scale=7.5)
    x_0 = sampler.sample(denoise, x_T, noise_scheduler, N, callback=model.counting(callback))

A `ControlUnit` is one control network bound to its hint(s) for one call; it returns the `Residuals` it adds to
the UNet at this step (or None: inactive). `controlled` wraps the UNet call (with any conditioning a pipeline
binds closer to the UNet: SDXL's added_cond, IP-Adapter's image tokens) so that every call gets the sum of the
active units' residuals through the UNet's `residuals=` keyword. Control is one more denoiser wrapper (STYLE.md):
every sampler, guidance, MultiDiffusion tiles and `pipe.compile()` work with it unchanged.

Which step is it? A unit's step range (diffusers' control_guidance_start / end) needs the index of the sampler
step a model call belongs to, and samplers evaluate the model a varying number of times per step (Heun and
DPM-2 twice, DPM-Solver++(2S) twice, PLMS's warm-up ...), at timesteps that are not always on the plan's grid.
So the index is counted, never read from t: the wrapper's `step` starts at 0 and `counting(callback)` advances
it after every step (the one step-callback contract every sampler keeps: called once after each step, before
the next step's first evaluation). All evaluations of step i see step i. A run started part-way (image-to-image,
inpainting with strength < 1) counts its own steps from 0 over the steps it runs, as diffusers' ControlNet
pipelines compute their `controlnet_keep` over the timesteps they run. (For Heun, diffusers' list holds
2N - 1 evaluations, so its ranges fall on evaluations, ours on steps: the same for one-evaluation samplers.)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..control import RESIZE_MODES, fit
from ..diffusion.samplers.base import StepCounting
from ..errors import ConfigError, InputError, describe
from ..models.controlnet import ControlNet
from ..models.residuals import Residuals

Region = tuple[slice, slice]    # latent rows and columns a model call sees (MultiDiffusion windows)


@runtime_checkable
class ControlUnit(Protocol):
    """One control network bound to its hint(s) for one pipeline call."""

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None, *,
                  added_cond: Mapping[str, torch.Tensor] | None, step: int, steps: int,
                  region: Region | None = None) -> Residuals | None:
        """What the unit adds to the UNet for this model call, or None when inactive at `step` (0-based, of
        `steps` run). x (B', C, h, w), context (B', L, D), added_cond: the batch the UNet sees, doubled under
        classifier-free guidance ([uncond; cond], B' = 2B, the hint holding B rows). region: the latent rows and
        columns x covers when sampling in MultiDiffusion windows (a unit crops its hint to them: f times them in
        pixels), None for the whole latent."""
        ...


def in_range(step: int, steps: int, start: float, end: float) -> bool:
    """Whether step `step` of `steps` lies in the fraction range [start, end] of the run (diffusers'
    controlnet_keep: a step is dropped when it begins before `start` or ends after `end`)."""
    return not (step / steps < start or (step + 1) / steps > end)


def _rows(added_cond: Mapping[str, torch.Tensor] | None, rows: slice) -> dict[str, torch.Tensor] | None:
    return None if added_cond is None else {k: v[rows] for k, v in added_cond.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class ControlNetUnit:
    """A ControlNet with its prepared hint (B, C, H, W) float in [0, 1] at the generation size, one row per image
    of the batch (`hints.prepare_hint`), its scale, its step range [start, end] (fractions of the run), and
    guess mode (diffusers': under guidance the ControlNet runs on the conditional half only, the unconditional
    half gets no residuals; the residuals rise from 0.1x at the first skip to 1x at the mid block)."""

    controlnet: ControlNet
    hint: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None, *,
                  added_cond: Mapping[str, torch.Tensor] | None, step: int, steps: int,
                  region: Region | None = None) -> Residuals | None:
        if not in_range(step, steps, self.start, self.end):
            return None
        hint = self.hint if region is None else self.window_hint(region)
        rows = hint.shape[0]
        doubled = x.shape[0] == 2 * rows
        if doubled and self.guess_mode:   # conditional half only; zeros for the unconditional half
            cond = slice(rows, None)
            t_cond = t[cond] if isinstance(t, torch.Tensor) and t.ndim == 1 and t.shape[0] == x.shape[0] else t
            down, mid = self.controlnet(x[cond], t_cond, None if context is None else context[cond], hint,
                                        conditioning_scale=self.scale, guess_mode=True,
                                        added_cond=_rows(added_cond, cond))
            return Residuals(down=tuple(torch.cat([torch.zeros_like(r), r]) for r in down),
                             mid=torch.cat([torch.zeros_like(mid), mid]))
        down, mid = self.controlnet(x, t, context, torch.cat([hint, hint]) if doubled else hint,
                                    conditioning_scale=self.scale, guess_mode=self.guess_mode,
                                    added_cond=added_cond)
        return Residuals(down=down, mid=mid)

    def window_hint(self, region: Region) -> torch.Tensor:
        """The hint's pixels under a latent window: f times its rows and columns (f the hint factor)."""
        f = self.controlnet.config.hint_factor
        (rows, cols) = region
        return self.hint[..., rows.start * f:rows.stop * f, cols.start * f:cols.stop * f]


class Controlled(StepCounting):
    """model(x, t, context=..., **kw) with residuals=sum of the active units' residuals at the current step.

    `step` is the 0-based step of the run the next call belongs to; `counting(callback)` wraps the sampler's step
    callback to advance it (module docstring). `region`: the latent window the next call covers, set by the
    tiled denoiser (`tiled_sampling.tiled_denoiser(on_window=)`), None for the whole latent. A wrapper holds
    the state of one run: build one per call (`controlled`), never share one between threads."""

    def __init__(self, model: Callable[..., torch.Tensor], units: Sequence[ControlUnit], *, steps: int,
                 added_cond: Mapping[str, torch.Tensor] | None = None,
                 added_uncond: Mapping[str, torch.Tensor] | None = None):
        if not all(isinstance(u, ControlUnit) for u in units):
            raise InputError("control units must have residuals(x, t, context, *, added_cond, step, steps)",
                             where="units", expected="ControlUnit objects",
                             found=[type(u).__name__ for u in units])
        if steps < 1:
            raise InputError("a controlled run needs at least one step", where="steps", expected=">= 1", found=steps)
        self.model, self.units, self.steps = model, tuple(units), steps
        self.step = 0
        self.region: Region | None = None
        # SDXL's added_cond as `sdxl_conditioning.with_added_cond` selects it: the conditional rows for a batch
        # of B, [uncond; cond] for the doubled batch (built once, not per step)
        self._added = None if added_cond is None else dict(added_cond)
        self._added_doubled = None if added_cond is None or added_uncond is None else \
            {k: torch.cat([added_uncond[k], added_cond[k]]) for k in added_cond}

    def added_cond_for(self, batch: int) -> dict[str, torch.Tensor] | None:
        if self._added is None:
            return None
        rows = next(iter(self._added.values())).shape[0]
        return self._added if batch == rows or self._added_doubled is None else self._added_doubled

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *, context: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        # SDXL's added_cond: the model's own keyword where a caller passes one (a PromptSchedule's per range)
        added = kwargs["added_cond"] if kwargs.get("added_cond") is not None else self.added_cond_for(x.shape[0])
        total: Residuals | None = None
        for unit in self.units:
            r = unit.residuals(x, t, context, added_cond=added, step=self.step, steps=self.steps,
                               region=self.region)
            if r is not None:
                total = r if total is None else total + r
        if total is not None:
            kwargs["residuals"] = total if "residuals" not in kwargs or kwargs["residuals"] is None \
                else kwargs["residuals"] + total
        return self.model(x, t, context=context, **kwargs)

    def on_window(self, region: Region | None) -> None:
        """Where the next calls look (`tiled_sampling.tiled_denoiser`'s hook): a latent window, or None."""
        self.region = region


def controlled(model: Callable[..., torch.Tensor], units: Sequence[ControlUnit], *, steps: int,
               added_cond: Mapping[str, torch.Tensor] | None = None,
               added_uncond: Mapping[str, torch.Tensor] | None = None) -> Controlled:
    """`model` (the UNet, or the UNet with conditioning bound closer to it) called with the summed residuals of
    `units` over a run of `steps` steps. added_cond / added_uncond: SDXL's added conditioning of the conditional
    and unconditional rows, which the ControlNets take too (the model binds its own: `with_added_cond`).
    Advance the step with `.counting(callback)` as the sampler's callback."""
    return Controlled(model, units, steps=steps, added_cond=added_cond, added_uncond=added_uncond)



@dataclasses.dataclass(frozen=True)
class Control:
    """A call's control, before it is bound to a model: the units, and SDXL's added conditioning of the
    conditional / unconditional rows (which ControlNets take as the UNet does). `TextGuidedPipeline.denoise`
    takes one (`control=`) and wraps its model last, outside the concatenated inputs of inpainting (a ControlNet
    sees the latents only, as in diffusers)."""

    units: tuple[ControlUnit, ...]
    added_cond: Mapping[str, torch.Tensor] | None = None
    added_uncond: Mapping[str, torch.Tensor] | None = None

    def bind(self, model: Callable[..., torch.Tensor], *, steps: int) -> Controlled:
        return controlled(model, self.units, steps=steps, added_cond=self.added_cond, added_uncond=self.added_uncond)

# ---- the call's arguments -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ControlSetting:
    """One ControlNet's share of a call: its control image (as given), scale and step range."""

    image: Any
    scale: float
    start: float
    end: float


def _per_net(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InputError(f"{name} must have one entry per ControlNet", where=name,
                             expected=f"a number or a list of {n}", found=f"a list of {len(value)}")
        return list(value)
    return [value] * n


def control_settings(count: int, control_image: Any, scale: float | Sequence[float],
                     start: float | Sequence[float], end: float | Sequence[float], *,
                     multi: bool | None = None) -> list[ControlSetting]:
    """The call's control arguments per ControlNet (`count` of them; `multi`: given as a list, default count > 1),
    checked before any work. Several: control_image is a list of one image (or batch) per ControlNet, or, as
    diffusers reads a list of lists, one list per prompt of one image per ControlNet; scales / starts / ends are
    one number for all or a list of one each (diffusers' broadcasting); 0 <= start < end <= 1."""
    multi = count > 1 if multi is None else multi
    images = [control_image]
    if multi:
        listed = isinstance(control_image, (list, tuple))
        if listed and control_image and any(isinstance(i, (list, tuple)) for i in control_image):
            if not all(isinstance(i, (list, tuple)) and len(i) == count for i in control_image):
                raise InputError("a list of lists of control images must hold one image per ControlNet in each "
                                 "list (one list per prompt)", where="control_image",
                                 expected=f"lists of {count}", found=[describe(i) for i in control_image])
            control_image = [list(t) for t in zip(*control_image, strict=True)]
        if not (listed and len(control_image) == count):
            found = f"a list of {len(control_image)}" if listed else type(control_image).__name__
            raise InputError("with several ControlNets, control_image must be a list of one image (or batch) each",
                             where="control_image", expected=f"a list of {count}", found=found)
        images = list(control_image)
    scales = _per_net(scale, count, "controlnet_conditioning_scale")
    starts = _per_net(start, count, "control_guidance_start")
    ends = _per_net(end, count, "control_guidance_end")
    out = []
    for i, (s, a, b) in enumerate(zip(scales, starts, ends, strict=True)):
        for name, v in (("controlnet_conditioning_scale", s), ("control_guidance_start", a),
                        ("control_guidance_end", b)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InputError(f"{name} must be a number", where=name, expected="float", found=repr(v))
        if not 0.0 <= a < b <= 1.0:
            raise InputError("a ControlNet's step range must satisfy 0 <= start < end <= 1",
                             where=f"control_guidance_start/end[{i}]", expected="0 <= start < end <= 1",
                             found=(a, b))
        out.append(ControlSetting(images[i], float(s), float(a), float(b)))
    return out


def check_controlnet_fits(controlnet: ControlNet, unet: Any, *, latent_channels: int, factor: int,
                          where: str = "controlnet") -> None:
    """A ControlNet must be made for the pipeline's base model: same text width, latent channels, level widths and
    layer counts (its residuals land on the UNet's skips), and a hint factor equal to the autoencoder's (the hint
    is at the generation size). A ConfigError naming both values otherwise (an SD 2.x ControlNet on SD 1.5 ...)."""
    if not isinstance(controlnet, ControlNet):
        raise ConfigError("controlnet must be a ControlNet", where=where, expected="ControlNet",
                          found=type(controlnet).__name__)
    ours, theirs = controlnet.config, unet.config
    pairs = [("cross_attention_dim", ours.cross_attention_dim, theirs.cross_attention_dim),
             ("in_channels", ours.in_channels, latent_channels),
             ("channels", tuple(ours.channels), tuple(theirs.channels)),
             ("layers_per_level", ours.per_level(ours.layers_per_level),
              theirs.per_level(theirs.layers_per_level)),
             ("hint_factor", ours.hint_factor, factor)]
    for key, found, expected in pairs:
        if found != expected:
            raise ConfigError(f"the ControlNet was made for another base model: its {key} is {found}, the "
                              f"pipeline's is {expected}", where=f"{where}.config.{key}", expected=expected,
                              found=found)


# ---- the hint ------------------------------------------------------------------------------------------------
def _to_batch(image: Any, size: tuple[int, int], mode: int | None, name: str) -> torch.Tensor:
    """One control image (PIL, numpy (H, W, C) / (B, H, W, C) uint8 or float in [0, 1], tensor (C, H, W) /
    (B, C, H, W) in [0, 1]) or a list of them -> float32 (B, C, H, W) in [0, 1] at `size` (fit's resize modes)."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise InputError("the control image list is empty", where=name, expected="at least one image", found=0)
        return torch.cat([_to_batch(i, size, mode, f"{name}[{k}]") for k, i in enumerate(image)])
    if isinstance(image, Image.Image):
        array = np.asarray(fit(image.convert("RGB"), size, mode=mode, name=name), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)[None]
    if isinstance(image, np.ndarray):
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        array = image[None] if image.ndim == 3 else image
        image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32) / scale).permute(0, 3, 1, 2)
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4) or not image.is_floating_point():
        raise InputError("a control image must be a PIL image, a numpy array or a float tensor", where=name,
                         expected="PIL.Image | (H, W, C) array | (C, H, W) / (B, C, H, W) float tensor in [0, 1]",
                         found=describe(image))
    hint = (image[None] if image.ndim == 3 else image).float()
    if hint.numel() and (hint.min() < 0 or hint.max() > 1):
        raise InputError("a control image tensor must hold values in [0, 1]", where=name, expected="[0, 1]",
                         found=(float(hint.min()), float(hint.max())))
    if tuple(hint.shape[-2:]) == size:
        return hint
    if mode is None or mode not in RESIZE_MODES:
        fit(Image.new("RGB", (hint.shape[-1], hint.shape[-2])), size, mode=mode, name=name)   # its error
    if mode == 0:    # as diffusers resizes tensors and arrays (nearest)
        return F.interpolate(hint, size=size)
    pictures = [Image.fromarray((row.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
                for row in hint]   # crop / fill modes through PIL: 8-bit
    return _to_batch([fit(p, size, mode=mode, name=name) for p in pictures], size, mode, name)


def prepare_hint(image: Any, *, height: int, width: int, batch: int, num_images_per_prompt: int = 1,
                 resize_mode: int | None = 0, name: str = "control_image", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """A control image (or a list: one per prompt) -> (batch * num_images_per_prompt, C, height, width) in [0, 1],
    as diffusers' `prepare_control_image` repeats it: one image for every row, or one per prompt repeated
    num_images_per_prompt times. resize_mode: `latentdiff.control.fit`'s (0 resize, as diffusers; 1 crop;
    2 fill; None: a hint of another size is an InputError); tensors and arrays resize as diffusers' (nearest) in
    mode 0, through 8-bit PIL in modes 1 and 2. Not doubled for guidance: the units do that per call."""
    hint = _to_batch(image, (height, width), resize_mode, name)
    n = hint.shape[0]
    if n == 1:
        hint = hint.expand(batch * num_images_per_prompt, -1, -1, -1)
    elif n == batch:
        hint = hint.repeat_interleave(num_images_per_prompt, dim=0)
    else:
        raise InputError("a control image batch must have one image, or one per prompt", where=name,
                         expected=f"1 or {batch} images", found=n)
    return hint.to(device=device, dtype=dtype).contiguous()
