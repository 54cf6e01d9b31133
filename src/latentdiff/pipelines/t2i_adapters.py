"""T2I-Adapters as a pipeline part: the optional `adapter` component, its folders, and the call arguments that
bind it to its hint (a `control.ControlUnit`, so adapters sit beside ControlNets in the same denoiser wrapper).

    pipe = LatentDiffusionPipeline.from_pretrained(sd_path, adapter=T2IAdapter.from_single_file("sketch.pth"))
    image = pipe("a church", control_image=sketch, adapter_conditioning_scale=0.8).images[0]
    pipe = LatentDiffusionPipeline.from_pretrained(sd_path, adapter=[depth, canny])     # several: summed
    image = pipe("a church", control_image=[depth_map, edges], adapter_conditioning_scale=[0.7, 0.4])

An adapter sees neither the latent nor the timestep, so its features are computed ONCE per call (scaled by
`adapter_conditioning_scale`), then added to the UNet at every step, both halves of a guided batch getting the
same ones (diffusers' StableDiffusionAdapterPipeline). Several adapters: each one's features times its own scale,
summed, as diffusers' MultiAdapter with `adapter_weights` (there, `adapter_conditioning_scale` must be a list; here
one number applies to each adapter). With ControlNets too, `control_image` lists the ControlNets' hints first,
then the adapters'.

Folders as diffusers writes them: one adapter in `adapter/` (["diffusers", "T2IAdapter"]); several
(MultiAdapter) in `adapter/`, `adapter_1/` ... under ["diffusers", "MultiAdapter"]. A pipeline with adapters (and
no ControlNet) saves as diffusers' `StableDiffusionAdapterPipeline`, which loads it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import is_real
from ..errors import ConfigError, InputError
from ..models.residuals import Residuals
from ..models.t2i_adapter import T2IAdapter
from .control import Control, Region, prepare_hint
from .control_pipeline import numbered_folders
from .folder import FolderPart, library_entry

Adapters = T2IAdapter | Sequence[T2IAdapter] | None
MULTI_ENTRY = ("diffusers", "MultiAdapter")


def as_adapter(value: Adapters) -> T2IAdapter | tuple[T2IAdapter, ...] | None:
    """A T2IAdapter, a tuple of them (several, each with its own hint and scale), or None; anything else is a
    ConfigError."""
    if value is None or isinstance(value, T2IAdapter):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, T2IAdapter) for v in value):
        return tuple(value)
    raise ConfigError("adapter must be a T2IAdapter or a non-empty list of them", where="adapter",
                      expected="T2IAdapter | list[T2IAdapter] | None",
                      found=[type(v).__name__ for v in value] if isinstance(value, (list, tuple)) else
                      type(value).__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterUnit:
    """A T2I-Adapter bound to its hint for one call: `features` (one row per image, already times `scale`) and
    their guided-batch copy `[features; features]`, both computed once by `bind`."""

    adapter: T2IAdapter
    hint: torch.Tensor         # (B, in_channels, H, W) in [0, 1], H x W the generated image's size
    scale: float
    factor: int                # pixels per latent (the autoencoder's): a latent window is factor x it in the hint
    features: Residuals
    doubled: Residuals
    # MultiDiffusion windows: (rows, cols) -> that window's features, computed on its first call
    windows: dict[tuple[int, int, int, int], Residuals] = dataclasses.field(default_factory=dict)

    @classmethod
    def bind(cls, adapter: T2IAdapter, hint: torch.Tensor, *, scale: float, factor: int) -> AdapterUnit:
        features = adapter(hint).scaled(scale)
        doubled = Residuals(intrablock=tuple(torch.cat([f, f]) for f in features.intrablock or ()))
        return cls(adapter, hint, scale, factor, features, doubled)

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None, *,
                  added_cond: Mapping[str, torch.Tensor] | None, step: int, steps: int,
                  region: Region | None = None) -> Residuals | None:
        rows = self.hint.shape[0]
        if x.shape[0] not in (rows, 2 * rows):
            raise InputError("the latent batch does not match the T2I-Adapter's hint rows", where="control_image",
                             expected=f"{rows} or {2 * rows} rows (guided)", found=x.shape[0])
        doubled = x.shape[0] == 2 * rows
        if region is None:
            return self.doubled if doubled else self.features
        # a MultiDiffusion window: the features of the hint's pixels under it (the whole-image features do not
        # crop evenly at the coarse levels), computed once per window
        (r, c), f = region, self.factor
        key = (r.start, r.stop, c.start, c.stop)
        if key not in self.windows:
            self.windows[key] = self.adapter(self.hint[..., r.start * f:r.stop * f, c.start * f:c.stop * f]) \
                .scaled(self.scale)
        window = self.windows[key]
        return Residuals(intrablock=tuple(torch.cat([w, w]) for w in window.intrablock or ())) if doubled else window


class MultiAdapterFolders:
    """The loader of a MultiAdapter entry: `adapter/`, `adapter_1/` ... -> a tuple of T2IAdapters (diffusers
    reads the numbered folders until one is missing)."""

    @classmethod
    def from_pretrained(cls, root: Path, *, subfolder: str, **load: Any) -> tuple[T2IAdapter, ...]:
        folders = numbered_folders(root, subfolder, entry="MultiAdapter", noun="adapter", argument="adapter")
        return tuple(T2IAdapter.from_pretrained(root, subfolder=name, **load) for name in folders)


ADAPTER_PART = FolderPart("adapter", "adapter", {("diffusers", "T2IAdapter"): T2IAdapter,
                                                 MULTI_ENTRY: MultiAdapterFolders}, optional=True)


def adapter_scales(scale: Any, count: int) -> list[float]:
    """adapter_conditioning_scale: one number for every adapter, or a list of one per adapter."""
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * count
    if len(scales) != count:
        raise InputError("adapter_conditioning_scale must have one entry per adapter",
                         where="adapter_conditioning_scale", expected=f"a number or a list of {count}",
                         found=f"a list of {len(scales)}")
    for s in scales:
        if not is_real(s):
            raise InputError("adapter_conditioning_scale must be a number", where="adapter_conditioning_scale",
                             expected="float", found=repr(s))
    return [float(s) for s in scales]


def call_batch(arguments: Mapping[str, Any]) -> int:
    """The prompt count of a `__call__`'s arguments (prompt, else prompt_embeds' rows, else 1)."""
    prompt, embeds = arguments.get("prompt"), arguments.get("prompt_embeds")
    if prompt is not None:
        return 1 if isinstance(prompt, str) else len(prompt)
    return embeds.shape[0] if embeds is not None else 1


def _grey(hint: torch.Tensor, adapter: T2IAdapter, name: str) -> torch.Tensor:
    """A one-channel adapter (the sketch adapters) reads a grey picture, which `prepare_hint` makes RGB: its three
    equal channels become one. Other channel counts are checked by the adapter (InputError)."""
    if adapter.config.in_channels == 1 and hint.shape[1] == 3:
        if not (torch.equal(hint[:, 0], hint[:, 1]) and torch.equal(hint[:, 0], hint[:, 2])):
            raise InputError("this T2I-Adapter reads a grey (one-channel) control image; this one has colour",
                             where=name, expected="a grey image or a (B, 1, H, W) tensor", found=tuple(hint.shape))
        return hint[:, :1]
    return hint


class AdapterParts:
    """The T2I-Adapter side of a pipeline with a `unet` and a `vae` (mixed into LatentDiffusionPipeline)."""

    adapter: T2IAdapter | tuple[T2IAdapter, ...] | None = None
    # diffusers' pipeline class of this task with an adapter: the `_class_name` saved when one is set
    adapter_class_name: ClassVar[str] = "StableDiffusionAdapterPipeline"

    @property
    def adapters(self) -> tuple[T2IAdapter, ...]:
        """The adapters in their order (one, several, or none)."""
        a = self.adapter
        return () if a is None else (a,) if isinstance(a, T2IAdapter) else tuple(a)

    def _adapter_name(self, i: int) -> str:
        return "adapter" if isinstance(self.adapter, T2IAdapter) else f"adapter[{i}]"

    def check_adapters(self) -> None:
        """Each adapter's features must fit the UNet's levels (`T2IAdapter.check_fits`): a ConfigError."""
        pipe: Any = self   # a DenoisingPipeline: its unet and vae factor
        for i, adapter in enumerate(self.adapters):
            adapter.check_fits(pipe.unet.config, latent_factor=pipe.vae_scale_factor, where=self._adapter_name(i))

    def control_for_call(self, arguments: Mapping[str, Any], *, height: int, width: int) -> Control | None:
        """The call's control from a `__call__`'s arguments (its `locals()`): the ControlNets' (the next class's
        `control_for_call` in the MRO, `ControlNetParts`, given their share of control_image) and one `AdapterUnit`
        per adapter (given the rest, with adapter_conditioning_scale, control_resize_mode, the prompt count and
        num_images_per_prompt). Mixed in before ControlNetParts, so every pipeline call that binds its ControlNets
        binds its adapters too."""
        nets: Any = super()
        count, adapters = len(getattr(self, "controlnets", ())), len(self.adapters)
        images = arguments.get("control_image")
        if adapters and count:   # ControlNets' hints first, then the adapters'
            if not isinstance(images, (list, tuple)) or len(images) != count + adapters:
                raise InputError("with ControlNets and T2I-Adapters, control_image lists one image per ControlNet, "
                                 "then one per adapter", where="control_image",
                                 expected=f"a list of {count + adapters}",
                                 found=f"a list of {len(images)}" if isinstance(images, (list, tuple)) else
                                 type(images).__name__)
            net_images, images = (images[0] if count == 1 else list(images[:count])), list(images[count:])
        else:
            net_images, images = (images, None) if not adapters else (None, images)
        control = nets.control_for_call({**arguments, "control_image": net_images}, height=height, width=width)
        units = self.adapter_units(images, scale=arguments.get("adapter_conditioning_scale", 1.0),
                                   resize_mode=arguments.get("control_resize_mode", 0), height=height, width=width,
                                   batch=call_batch(arguments),
                                   num_images_per_prompt=arguments.get("num_images_per_prompt", 1))
        if not units:
            return control
        return Control(units) if control is None else dataclasses.replace(control, units=(*control.units, *units))

    def adapter_units(self, control_image: Any, *, scale: float | Sequence[float], resize_mode: int | None,
                      height: int, width: int, batch: int, num_images_per_prompt: int) -> tuple[AdapterUnit, ...]:
        """One bound unit per adapter: the arguments checked (counts, numbers, each hint's channels and size)
        before any adapter runs, then each adapter's features computed once."""
        adapters = self.adapters
        if not adapters:
            if not (is_real(scale) and scale == 1.0):
                raise InputError("adapter_conditioning_scale needs a T2I-Adapter: load the pipeline with adapter=",
                                 where="adapter_conditioning_scale", expected="a pipeline with an adapter",
                                 found=repr(scale))
            return ()
        if control_image is None:
            raise InputError("a pipeline with a T2I-Adapter needs a control_image", where="control_image",
                             expected="an image (one per adapter: a list)", found=None)
        many = len(adapters) > 1
        if many and not (isinstance(control_image, (list, tuple)) and len(control_image) == len(adapters)):
            raise InputError("with several T2I-Adapters, control_image must be a list of one image (or batch) each",
                             where="control_image", expected=f"a list of {len(adapters)}",
                             found=f"a list of {len(control_image)}" if isinstance(control_image, (list, tuple))
                             else type(control_image).__name__)
        images = list(control_image) if many else [control_image]
        scales = adapter_scales(scale, len(adapters))
        pipe: Any = self
        hints = []
        for i, (adapter, image) in enumerate(zip(adapters, images, strict=True)):
            name = f"control_image[{i}]" if many else "control_image"
            hint = _grey(prepare_hint(image, height=height, width=width, batch=batch,
                                      num_images_per_prompt=num_images_per_prompt, resize_mode=resize_mode, name=name,
                                      device=pipe.device, dtype=adapter.dtype), adapter, name)
            adapter.check_hint(hint, size=(height, width))
            hints.append(hint)
        return tuple(AdapterUnit.bind(a, h, scale=s, factor=pipe.vae_scale_factor)
                     for a, h, s in zip(adapters, hints, scales, strict=True))

    def write_adapters(self, folder: Path, *, variant: str | None = None) -> dict[str, list[str]]:
        """Write the adapters as diffusers does (module docstring); -> their model_index.json entry."""
        adapters = self.adapters
        if not adapters:
            return {}
        if isinstance(self.adapter, T2IAdapter):
            self.adapter.write_files(folder / "adapter", variant=variant)
            return {"adapter": library_entry(self.adapter)}
        for i, adapter in enumerate(adapters):
            adapter.write_files(folder / ("adapter" if i == 0 else f"adapter_{i}"), variant=variant)
        return {"adapter": list(MULTI_ENTRY)}
