"""IP-Adapter on the Stable Diffusion pipelines (text-to-image, image-to-image, inpainting), with diffusers' names
(`IPAdapterMixin`).

    pipe.load_ip_adapter("h94/IP-Adapter", subfolder="models", weight_name="ip-adapter_sd15.safetensors")
    pipe.set_ip_adapter_scale(0.6)
    image = pipe("a church at dusk", ip_adapter_image=style_photo).images[0]
    pipe.unload_ip_adapter()                     # the UNet is the base model again

The file's modules (`models.ip_adapter`) go into the UNet's cross-attention layers without replacing them (each
`Attention` gets an entry in its `extra` tuple: the UNet's state dict is unchanged, so saving the pipeline saves
the base model). The image tokens are appended to the text context by the innermost wrapper around the UNet call
(`with_image_tokens`), so any wrapper outside it (ControlNets) sees the text context alone, as in diffusers.

Image features as diffusers computes them (its `encode_image`, here `encode_ip_adapter_image`): plain adapters read
the encoder's projected `image_embeds`, the negative being zeros; plus adapters read its penultimate hidden states,
the negative being those of an all-zero image. `ip_adapter_image_embeds` takes diffusers' layout: a list with one
tensor per adapter, (2B or B, K, E) (plus: (2B or B, K, L, E)), negative rows first under guidance.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import hub
from ..config import is_real
from ..errors import CheckpointError, InputError, UsageError, describe
from ..layers.attention import Attention
from ..models.clip_vision import CLIPVisionModelWithProjection
from ..models.ip_adapter import (
    ImageAttention,
    IPAdapter,
    check_fits,
    check_image_features,
    cross_attentions,
    image_tokens,
)
from .clip_image import clip_pixels

IMAGE_ENCODER_FOLDER = "image_encoder"   # where h94/IP-Adapter keeps it: beside the weights (models/image_encoder)
Source = str | os.PathLike | Mapping[str, Any]                       # a file, folder, Hub id or state dict
Scale = float | dict[str, Any]                                        # one number, or diffusers' per-block dict
ImageTokens = tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]


@dataclasses.dataclass
class LoadedIPAdapter:
    """What `load_ip_adapter` installed: the module, the UNet layers that hold its attentions, its file."""

    adapter: IPAdapter
    layers: list[Attention]
    source: str


class IPAdapterMixin:
    """diffusers' IPAdapterMixin methods on a pipeline with `unet` (latentdiff's UNet2DConditional)."""

    unet: Any
    image_encoder: Any = None   # a CLIP vision model with projection (ours or transformers'), once loaded

    def load_ip_adapter(self, pretrained_model_name_or_path_or_dict: Source | list[Source],
                        subfolder: str | None | list[str | None] = None, weight_name: str | None | list[str] = None,
                        *, image_encoder: str | os.PathLike | nn.Module | bool | None = None,
                        image_encoder_folder: str = IMAGE_ENCODER_FOLDER, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                        local_files_only: bool | None = None) -> None:
        """Load IP-Adapters (plain or plus, the released `image_proj.*` / `ip_adapter.N.*` layout) from a file
        (.safetensors, or .bin read with weights_only), a folder or Hub id with `subfolder` / `weight_name`, or a
        state dict, and install them (replacing any loaded before), at scale 1.0. Several at once as diffusers: a
        list of weight names (and of sources / subfolders, or one for all); each call's image prompt then has one
        entry per adapter, in this order.

        image_encoder: None - the pipeline's encoder if it has one, else the transformers folder
        `image_encoder_folder` beside the (first) weights (diffusers' default); a folder / Hub id; a model
        (latentdiff's or transformers' CLIPVisionModelWithProjection, used as given); False - none (then only
        `ip_adapter_image_embeds` work). Errors (CheckpointError / InputError) come before anything changes."""
        location = hub.HubLocation(revision=revision, cache_dir=cache_dir, token=token,
                                   local_files_only=local_files_only)
        loaded: list[LoadedIPAdapter] = []
        beside: Path | None = None
        for source, folder, name in _adapter_list(pretrained_model_name_or_path_or_dict, subfolder, weight_name):
            state, where, next_to = _read(source, folder, name, location, image_encoder_folder)
            adapter = IPAdapter.from_state_dict(state, source=where)
            loaded.append(LoadedIPAdapter(adapter, check_fits(adapter, self.unet, source=where), where))
            beside = next_to if beside is None else beside
        encoder = self._image_encoder_for(image_encoder, beside, location, source=loaded[0].source)
        if encoder is not None:
            for entry in loaded:
                _check_encoder(entry.adapter, encoder, source=entry.source)
        # ---- nothing changed before this line ----
        self.unload_ip_adapter(keep_encoder=True)
        for layer in loaded[0].layers:   # also what another pipeline sharing this UNet (`from_pipe`) put there
            layer.extra = tuple(e for e in layer.extra if not isinstance(e, ImageAttention))
        for slot, entry in enumerate(loaded):
            entry.adapter.to(device=self.unet.device, dtype=self.unet.dtype)
            for layer, attention in zip(entry.layers, entry.adapter.attentions(), strict=True):
                attention.slot = slot
                layer.extra = (*layer.extra, attention)
        self.__dict__["_ip_adapters"] = loaded
        self.image_encoder = encoder

    def set_ip_adapter_scale(self, scale: Scale | list[Scale]) -> None:
        """The weight of the image attention (diffusers' `scale`: 1.0 as loaded; 0.6 the usual text-and-image
        balance; 0 turns the image prompt off): one number for every layer, or diffusers' per-block dict (InstantStyle:
        `{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}`, a number or one per transformer
        of the block; blocks and "mid" left out get 0). With several adapters, a list of those (one per adapter), or
        one for all."""
        loaded = self._loaded_ip_adapters(where="set_ip_adapter_scale")
        scales = list(scale) if isinstance(scale, (list, tuple)) else [scale]
        if len(scales) == 1:
            scales = scales * len(loaded)
        if len(scales) != len(loaded):
            raise InputError("one IP-Adapter scale per loaded adapter, or one for all", where="scale",
                             expected=f"1 or {len(loaded)} scales", found=len(scales))
        names = [name for name, _ in cross_attentions(self.unet)]
        for entry, value in zip(loaded, scales, strict=True):
            per_layer = block_scales(value, names) if isinstance(value, dict) else [_scale(value, scale)] * len(names)
            for attention, s in zip(entry.adapter.attentions(), per_layer, strict=True):
                attention.scale = s

    def unload_ip_adapter(self, *, keep_encoder: bool = False) -> None:
        """Remove the IP-Adapters from the UNet's layers (the UNet computes the base model again, bit for bit) and
        drop the image encoder (kept with keep_encoder=True)."""
        for entry in self.__dict__.pop("_ip_adapters", []):
            own = set(map(id, entry.adapter.attentions()))
            for layer in entry.layers:
                layer.extra = tuple(e for e in layer.extra if id(e) not in own)
        if not keep_encoder:
            self.image_encoder = None

    @property
    def ip_adapters(self) -> list[IPAdapter]:
        """The loaded IP-Adapter modules, in their order."""
        return [entry.adapter for entry in self.__dict__.get("_ip_adapters", [])]

    @property
    def ip_adapter(self) -> IPAdapter | None:
        """The loaded IP-Adapter module (the first of several: `ip_adapters`), or None."""
        return next(iter(self.ip_adapters), None)

    def ip_adapter_networks(self) -> tuple[nn.Module, ...]:
        """What `to()` moves besides the pipeline's own networks: the adapters and the image encoder."""
        return tuple(m for m in (*self.ip_adapters, self.image_encoder) if isinstance(m, nn.Module))

    # ---- a call ---------------------------------------------------------------------------------------------
    def check_ip_adapter_inputs(self, ip_adapter_image: Any, ip_adapter_image_embeds: Any) -> None:
        """Before any model runs: at most one of the two, adapters loaded, one entry per adapter, an encoder for
        images."""
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            return
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise InputError("pass ip_adapter_image or ip_adapter_image_embeds, not both",
                             where="ip_adapter_image_embeds", expected="None with ip_adapter_image",
                             found=describe(ip_adapter_image_embeds))
        where = "ip_adapter_image" if ip_adapter_image is not None else "ip_adapter_image_embeds"
        loaded = self._loaded_ip_adapters(where=where)
        _per_adapter(ip_adapter_image if ip_adapter_image is not None else ip_adapter_image_embeds, len(loaded),
                     name=where, tensors=ip_adapter_image is None)
        if ip_adapter_image is not None and self.image_encoder is None:
            raise InputError("this IP-Adapter was loaded without an image encoder", where="ip_adapter_image",
                             expected="load_ip_adapter(..., image_encoder=folder or model), or "
                             "ip_adapter_image_embeds", found="no image encoder")

    def encode_ip_adapter_image(self, image: Any, adapter: IPAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        """One adapter's image(s) -> (features, negative features), (1, K, E) plain / (1, K, L, E) plus, K images."""
        encoder = self.image_encoder
        first = next(encoder.parameters())
        size = _config_value(encoder, "image_size")
        pixels = clip_pixels(image, size=size).to(device=first.device, dtype=first.dtype)
        if adapter.is_plus:
            both = encoder(torch.cat([pixels, torch.zeros_like(pixels)]), output_hidden_states=True).hidden_states[-2]
            features, negative = both.chunk(2)
        else:
            features = encoder(pixels).image_embeds
            negative = torch.zeros_like(features)
        return features[None], negative[None]

    def image_prompt_tokens(self, ip_adapter_image: Any, ip_adapter_image_embeds: Any, *, rows: int,
                            num_images_per_prompt: int, guidance: bool) -> ImageTokens:
        """The image tokens of every adapter, appended in order: (cond, uncond, counts), cond / uncond (rows,
        sum(counts), D), uncond None without guidance. `rows` = prompts x num_images_per_prompt, the batch of the
        text context; features for one image (B = 1), one per prompt or one per generated image."""
        loaded = self._loaded_ip_adapters(where="ip_adapter_image")
        given = ip_adapter_image if ip_adapter_image is not None else ip_adapter_image_embeds
        name = "ip_adapter_image" if ip_adapter_image is not None else "ip_adapter_image_embeds"
        conds, unconds = [], []
        for entry, item in zip(loaded, _per_adapter(given, len(loaded), name=name, tensors=ip_adapter_image is None),
                               strict=True):
            adapter = entry.adapter
            if ip_adapter_image is not None:
                features, negative = self.encode_ip_adapter_image(item, adapter)
            else:
                check_image_features(adapter, item, where=name)
                if guidance and item.shape[0] % 2:
                    raise InputError("under classifier-free guidance ip_adapter_image_embeds holds the negative "
                                     "rows then the positive ones", where=name,
                                     expected="an even first dimension (2B)", found=tuple(item.shape))
                negative, features = item.chunk(2) if guidance else (torch.zeros_like(item), item)
            param = next(adapter.parameters())
            cond, uncond = (adapter.project(f.to(device=param.device, dtype=param.dtype)) for f in (features, negative))
            prompts = rows // num_images_per_prompt
            conds.append(_to_rows(cond, rows, prompts, num_images_per_prompt))
            unconds.append(_to_rows(uncond, rows, prompts, num_images_per_prompt))
        counts = tuple(c.shape[1] for c in conds)
        cond_all = torch.cat(conds, dim=1).to(self.unet.dtype)
        return cond_all, (torch.cat(unconds, dim=1).to(self.unet.dtype) if guidance else None), counts

    def ip_adapter_model(self, model: Callable[..., torch.Tensor], ip_adapter_image: Any, ip_adapter_image_embeds: Any,
                         *, rows: int, num_images_per_prompt: int, guidance: bool) -> Callable[..., torch.Tensor]:
        """`model` (the UNet call) with the image tokens bound (`with_image_tokens`), or as it is without an image
        prompt."""
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            return model
        cond, uncond, counts = self.image_prompt_tokens(ip_adapter_image, ip_adapter_image_embeds, rows=rows,
                                                        num_images_per_prompt=num_images_per_prompt,
                                                        guidance=guidance)
        return with_image_tokens(model, cond, uncond, counts)

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _loaded_ip_adapters(self, *, where: str) -> list[LoadedIPAdapter]:
        loaded: list[LoadedIPAdapter] = self.__dict__.get("_ip_adapters", [])
        if not loaded:
            raise InputError("no IP-Adapter is loaded", where=where, expected="pipe.load_ip_adapter(...) first",
                             found=None)
        for entry in loaded:
            if not all(any(e is a for e in layer.extra)
                       for layer, a in zip(entry.layers, entry.adapter.attentions(), strict=True)):
                raise UsageError("this pipeline's IP-Adapter is no longer in its UNet: another pipeline sharing the "
                                 "UNet (from_pipe, components) loaded or unloaded one", where=where,
                                 expected="load_ip_adapter on this pipeline again", found=entry.source)
        return loaded

    def _image_encoder_for(self, given: Any, beside: Path | None, location: hub.HubLocation, *,
                           source: str) -> Any:
        """The encoder `load_ip_adapter` installs (see there), loaded before anything changes; None for False."""
        if given is False:
            return None
        if isinstance(given, nn.Module):
            if not hasattr(given, "config") or _config_value(given, "image_size", None) is None:
                raise InputError("image_encoder must be a CLIP vision model with projection", where="image_encoder",
                                 expected="CLIPVisionModelWithProjection (latentdiff's or transformers')",
                                 found=describe(given))
            return given
        if given is None:
            if self.image_encoder is not None:
                return self.image_encoder
            if beside is None or not (beside / "config.json").is_file():
                raise CheckpointError("no image encoder for the IP-Adapter", where=source,
                                      expected="image_encoder= a folder, a Hub id or a CLIPVisionModelWithProjection "
                                      "(or image_encoder=False to pass ip_adapter_image_embeds only)",
                                      found=f"no {beside} folder" if beside is not None else "a state dict")
            given = beside
        if isinstance(given, (str, os.PathLike)):
            return CLIPVisionModelWithProjection.from_pretrained(given, revision=location.revision,
                                                                 cache_dir=location.cache_dir, token=location.token,
                                                                 local_files_only=location.local_files_only,
                                                                 torch_dtype=self.unet.dtype, device=self.unet.device)
        raise InputError("image_encoder takes a folder, a Hub id, a model, None or False", where="image_encoder",
                         expected="str | PathLike | nn.Module | None | False", found=describe(given))


def with_image_tokens(model: Callable[..., torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor | None,
                      counts: tuple[int, ...]) -> Callable[..., torch.Tensor]:
    """model(x, t, context=...) -> the same call with the image tokens appended to the context: `cond` for a batch
    of its rows, [uncond; cond ...] for a batch of k x rows (classifier-free guidance: k = 2), and the counts (per
    adapter, in order) said to the IP attentions (`models.ip_adapter.image_tokens`). The innermost wrapper: what
    wraps it sees the text."""
    rows = cond.shape[0]

    def run(x: torch.Tensor, t: Any, *, context: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        groups = x.shape[0] // rows
        if groups * rows != x.shape[0]:
            raise InputError("a UNet batch that is no multiple of the image prompt's rows", where="x",
                             expected=f"a multiple of {rows}", found=x.shape[0])
        tokens = cond if groups == 1 else torch.cat([uncond if uncond is not None else cond] + [cond] * (groups - 1))
        with image_tokens(counts):
            return model(x, t, context=torch.cat([context, tokens.to(context)], dim=1), **kwargs)

    return run


def _read(source: Any, subfolder: str | None, weight_name: str | None, location: hub.HubLocation,
          encoder_folder: str) -> tuple[dict[str, Any], str, Path | None]:
    """(tensors, where they came from, the default image-encoder folder or None) of load_ip_adapter's source."""
    if isinstance(source, Mapping):
        return dict(source), "state dict", None
    if not isinstance(source, (str, os.PathLike)):
        raise InputError("load_ip_adapter takes a file, a folder, a Hub id or a state dict",
                         where="pretrained_model_name_or_path_or_dict", expected="str | PathLike | dict",
                         found=describe(source))
    path = Path(source).expanduser()
    if path.is_file():
        file, folder = path, path.parent
    else:
        if weight_name is None:
            raise InputError("a folder or Hub id needs the file's name", where="weight_name",
                             expected="e.g. 'ip-adapter_sd15.safetensors'", found=None)
        prefix = f"{subfolder}/" if subfolder else ""
        root = location.resolve(source, allow_patterns=[f"{prefix}{weight_name}", f"{prefix}{encoder_folder}/*"])
        folder = root / subfolder if subfolder else root
        file = hub.contained(folder, weight_name, file=folder, entry="weight_name")
        if not file.is_file():
            raise CheckpointError("no IP-Adapter file of that name", where=str(folder), expected=weight_name,
                                  found="nothing of that name")
    state = hub.load_safetensors(file) if file.suffix == ".safetensors" else hub.load_torch_pickle(file)
    if not isinstance(state, Mapping):
        raise CheckpointError("an IP-Adapter file holds a dict of tensors", where=str(file), expected="a dict",
                              found=type(state).__name__)
    return dict(state), str(file), folder / encoder_folder


def _check_encoder(adapter: IPAdapter, encoder: Any, *, source: str) -> None:
    """The encoder's output width must be the adapter's input width (plain: projection_dim; plus: hidden_size)."""
    key = "hidden_size" if adapter.is_plus else "projection_dim"
    proj = adapter.image_proj
    want = proj.proj_in.in_features if adapter.is_plus else proj.proj.in_features   # type: ignore[union-attr]
    found = _config_value(encoder, key)
    if found != want:
        raise CheckpointError(f"the image encoder's {key} is not the IP-Adapter's input width", where=source,
                              expected=want, found=found)


def _config_value(model: Any, key: str, *default: Any) -> Any:
    return getattr(model.config, key, *default)


def _per_adapter(value: Any, n: int, *, name: str, tensors: bool) -> list[Any]:
    """diffusers' per-adapter list -> one entry per loaded adapter (each an image, a list of K images, or a tensor
    of features); with one adapter, the entry alone is accepted too."""
    if not isinstance(value, (list, tuple)) or (n == 1 and tensors and isinstance(value, torch.Tensor)):
        value = [value]
    if len(value) != n:
        several = " (several images for one adapter: [[img1, img2]])" if not tensors else ""
        raise InputError(f"one entry per loaded IP-Adapter{several}", where=name, expected=f"a list of {n}",
                         found=f"a list of {len(value)}")
    if tensors and not all(isinstance(v, torch.Tensor) for v in value):
        raise InputError("ip_adapter_image_embeds holds tensors", where=name, expected="[tensor, ...]",
                         found=[describe(v) for v in value])
    return list(value)


def _adapter_list(source: Any, subfolder: Any, weight_name: Any) -> list[tuple[Any, str | None, str | None]]:
    """load_ip_adapter's arguments as diffusers broadcasts them: lists of one length, a single value for all."""
    names = weight_name if isinstance(weight_name, list) else [weight_name]
    sources = source if isinstance(source, list) else [source]
    folders = subfolder if isinstance(subfolder, list) else [subfolder]
    n = max(len(names), len(sources), len(folders))
    columns = []
    for label, column in (("pretrained_model_name_or_path_or_dict", sources), ("subfolder", folders),
                          ("weight_name", names)):
        if len(column) not in (1, n) or not column:
            raise InputError("load_ip_adapter's lists must have one length (or one entry for all)", where=label,
                             expected=f"1 or {n} entries", found=len(column))
        columns.append(column * n if len(column) == 1 else column)
    return list(zip(*columns, strict=True))


def _to_rows(tokens: torch.Tensor, rows: int, prompts: int, per_prompt: int) -> torch.Tensor:
    """(b, T, D) tokens for 1 image, `prompts` prompts or `rows` images -> (rows, T, D)."""
    b = tokens.shape[0]
    if b == rows:
        return tokens
    if b == 1:
        return tokens.expand(rows, -1, -1)
    if b == prompts:
        return tokens.repeat_interleave(per_prompt, dim=0)
    raise InputError("IP-Adapter features for 1 image, one per prompt or one per generated image",
                     where="ip_adapter_image_embeds", expected=f"B in (1, {prompts}, {rows})", found=b)


def _scale(value: Any, given: Any, *, where: str = "scale") -> float:
    if not is_real(value) or not math.isfinite(value):
        raise InputError("an IP-Adapter scale is a finite number or diffusers' per-block dict", where=where,
                         expected="a float, or {'down': ..., 'mid': ..., 'up': ...}", found=describe(given))
    return float(value)


def block_scales(scale: dict[str, Any], names: list[str]) -> list[float]:
    """diffusers' per-block IP-Adapter scales -> one per cross-attention `names` (the UNet's module names:
    `down_blocks.I.attentions.J...`, `mid_block...`, `up_blocks.I.attentions.J...`). Under "down" / "up": a number
    for every block, or {"block_I": a number, or a list with one per transformer of block I}; "mid": a number.
    What is left out is 0 (diffusers' default); an unknown key, or a list of the wrong length, is an InputError."""
    unknown = sorted(set(scale) - {"down", "mid", "up"})
    if unknown:
        raise InputError("per-block IP-Adapter scales take the keys down, mid, up", where="scale",
                         expected="down, mid, up", found=unknown)
    counts: dict[tuple[str, int], int] = {}
    for name in names:
        parts = name.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            key = (parts[0][:-7], int(parts[1]))
            counts[key] = max(counts.get(key, 0), int(parts[3]) + 1)
    per_name: list[float] = []
    for name in names:
        parts = name.split(".")
        if parts[0] == "mid_block":
            mid = scale.get("mid", 0.0)
            per_name.append(_scale(mid[0] if isinstance(mid, list) and len(mid) == 1 else mid, mid, where="mid"))
            continue
        updown, block, index = parts[0][:-7], int(parts[1]), int(parts[3])
        value = scale.get(updown, 0.0)
        if isinstance(value, dict):
            wrong = sorted(set(value) - {f"block_{b}" for (u, b) in counts if u == updown})
            if wrong:
                raise InputError(f"no such {updown} block with attention in this UNet", where=f"scale[{updown!r}]",
                                 expected=sorted(f"block_{b}" for (u, b) in counts if u == updown), found=wrong)
            value = value.get(f"block_{block}", 0.0)
        if isinstance(value, (list, tuple)):
            n = counts[(updown, block)]
            if len(value) not in (1, n):
                raise InputError("one scale per transformer of the block", where=f"scale[{updown!r}][block_{block}]",
                                 expected=f"1 or {n} numbers", found=len(value))
            value = value[0] if len(value) == 1 else value[index]
        per_name.append(_scale(value, value, where=f"scale[{updown!r}]"))
    return per_name
