"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models").

A small convolutional encoder reads the control image (sketch, depth, colour palette ...) once per generation and
hands the UNet one feature map per down level (sec. 3.2: "the condition features F_c are added to the intermediate
features of the UNet encoder at each scale"); the UNet adds them inside its way down (`Residuals.intrablock`).
Unlike a ControlNet the adapter does not see the latent or the timestep, so its features are computed once and
reused at every step.

Three layouts, as diffusers' `T2IAdapter` names them (`adapter_type`):

    full_adapter     pixel-unshuffle (x8), conv_in, one block per level (level > 0: 2x2 average pool first,
                     a 1x1 conv where the width changes), each `num_res_blocks` residual units (3x3, ReLU, 1x1)
    full_adapter_xl  the same blocks, pixel-unshuffle x16, only the third block pools: SDXL's features
                     (two at the first scale, then two at half of it: the second one for the mid level)
    light_adapter    no conv_in; each block narrows to a quarter of its width (1x1), residual units of two 3x3
                     convs, widens back (1x1); one block more than `channels` (the last repeats the width)

Parameter names and config.json are those of diffusers' T2IAdapter (`diffusers_tables.T2I_ADAPTER`), so its
folders load with no key map and ours load in diffusers. TencentARC's original files (`t2iadapter_*_sd14v1.pth`)
load through `T2IAdapter.from_single_file` (the key tables live in `latentdiff.convert.t2i_adapter`).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import limits
from ..config import ComponentConfig
from ..errors import ConfigError, InputError
from ..hub_files import local_file
from ..registry import COMPONENTS, SINGLE_FILE
from ..utils import numerics
from ..utils.dtypes import resolve_torch_dtype
from . import structure
from .base import ModelMixin
from .diffusers_tables import T2I_ADAPTER
from .residuals import Residuals
from .unet import UNetConfig, shape_of

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")
XL_POOLING_BLOCK = 2   # full_adapter_xl: the one block that halves the features (SDXL's 2nd and 3rd levels differ)


@dataclasses.dataclass(frozen=True)
class T2IAdapterConfig(ComponentConfig):
    """diffusers T2IAdapter's arguments, under their names (they are the config.json keys)."""

    in_channels: int = 3          # channels of the control image (1: sketch / grey-scale hints)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)   # width per block (light_adapter: one block more)
    num_res_blocks: int = 2       # residual units per block
    downscale_factor: int = 8     # the pixel-unshuffle factor (full_adapter_xl: 16)
    adapter_type: str = "full_adapter"

    def validate(self) -> None:
        if self.adapter_type not in ADAPTER_TYPES:
            raise ConfigError("unknown T2I-Adapter type", where="adapter_type", expected=ADAPTER_TYPES,
                              found=self.adapter_type)
        if not self.channels:
            raise ConfigError("channels needs at least one width", where="channels", expected="non-empty tuple",
                              found=self.channels)
        structure.check_levels(self.channels)
        structure.check_counts([("in_channels", self.in_channels, limits.MAX_CHANNELS),
                                ("num_res_blocks", self.num_res_blocks, limits.MAX_LAYERS_PER_LEVEL),
                                ("downscale_factor", self.downscale_factor, 64)])
        limits.check_count(self.in_channels * self.downscale_factor ** 2, key="in_channels * downscale_factor^2",
                           at_least=1, at_most=limits.MAX_CHANNELS, where="downscale_factor")
        if self.adapter_type == "light_adapter" and any(c % 4 for c in self.channels):
            raise ConfigError("a light adapter's widths must be multiples of 4 (its blocks work at a quarter)",
                              where="channels", expected="multiples of 4", found=self.channels)
        # full_adapter_xl: diffusers builds the blocks after the pooling one without a width change
        xl_tail = self.channels[XL_POOLING_BLOCK:]
        if self.adapter_type == "full_adapter_xl" and (not xl_tail or len(set(xl_tail)) > 1):
            raise ConfigError("full_adapter_xl needs at least 3 widths, those from the third on equal",
                              where="channels", expected="e.g. (320, 640, 1280, 1280)", found=self.channels)

    def blocks(self) -> list[tuple[int, int, bool]]:
        """(input width, output width, pools first) of each block, in order; the first block's input is the
        unshuffled control image (light adapter) or conv_in's output (full adapters)."""
        ch, unshuffled = self.channels, self.in_channels * self.downscale_factor ** 2
        if self.adapter_type == "full_adapter":
            return [(ch[0], ch[0], False)] + [(ch[i - 1], ch[i], True) for i in range(1, len(ch))]
        if self.adapter_type == "full_adapter_xl":
            return [(ch[max(i - 1, 0)], ch[i], i == XL_POOLING_BLOCK) for i in range(len(ch))]
        return ([(unshuffled, ch[0], False)] + [(ch[i], ch[i + 1], True) for i in range(len(ch) - 1)]
                + [(ch[-1], ch[-1], True)])

    def features(self) -> list[tuple[int, int]]:
        """(width, downscale w.r.t. the control image) of each feature the adapter returns."""
        out, factor = [], self.downscale_factor
        for _, width, pools in self.blocks():
            factor *= 2 if pools else 1
            out.append((width, factor))
        return out

    @property
    def total_downscale_factor(self) -> int:
        """The coarsest feature's downscale w.r.t. the control image (diffusers' total_downscale_factor)."""
        return self.features()[-1][1]


class ResidualUnit(nn.Module):
    """x + conv(ReLU(conv3x3(x))): diffusers AdapterResnetBlock (second conv 1x1) / LightAdapterResnetBlock
    (second conv 3x3)."""

    def __init__(self, channels: int, *, second_kernel: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, second_kernel, padding=second_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


class AdapterBlock(nn.Module):
    """One feature's block: [2x2 average pool] [1x1 in_conv] residual units [1x1 out_conv].
    Full adapters (diffusers AdapterBlock): in_conv only where the width changes, no out_conv. Light adapters
    (LightAdapterBlock): in_conv to a quarter of the width, out_conv back to it."""

    def __init__(self, in_channels: int, out_channels: int, *, res_blocks: int, pools: bool, light: bool):
        super().__init__()
        width = out_channels // 4 if light else out_channels
        # ceil_mode: an odd side keeps its last row (the UNet's strided convs round up the same way)
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if pools else None
        self.in_conv = nn.Conv2d(in_channels, width, 1) if light or in_channels != out_channels else None
        self.resnets = nn.Sequential(*(ResidualUnit(width, second_kernel=3 if light else 1)
                                       for _ in range(res_blocks)))
        self.out_conv = nn.Conv2d(width, out_channels, 1) if light else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        x = self.resnets(x)
        return x if self.out_conv is None else self.out_conv(x)


class AdapterBody(nn.Module):
    """diffusers FullAdapter / FullAdapterXL / LightAdapter: the control image -> one feature per block."""

    def __init__(self, config: T2IAdapterConfig):
        super().__init__()
        light = config.adapter_type == "light_adapter"
        self.unshuffle = nn.PixelUnshuffle(config.downscale_factor)   # space to depth: (C, H, W) -> (C f^2, H/f, W/f)
        self.conv_in = None if light else nn.Conv2d(config.in_channels * config.downscale_factor ** 2,
                                                    config.channels[0], 3, padding=1)
        self.body = nn.ModuleList(AdapterBlock(c_in, c_out, res_blocks=config.num_res_blocks, pools=pools, light=light)
                                  for c_in, c_out, pools in config.blocks())

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor]:
        h = self.unshuffle(hint)
        if self.conv_in is not None:
            h = self.conv_in(h)
        features = []
        for block in self.body:
            h = block(h)
            features.append(h)
        return features


@COMPONENTS.register("t2i_adapter")
class T2IAdapter(ModelMixin[T2IAdapterConfig]):
    """control image -> `Residuals(intrablock=features)` for the UNet's down levels (diffusers T2IAdapter)."""

    config_class = T2IAdapterConfig
    diffusers_class_name = "T2IAdapter"
    diffusers_config = T2I_ADAPTER

    def __init__(self, config: T2IAdapterConfig):
        super().__init__(config)
        self.adapter = AdapterBody(config)

    def forward(self, hint: torch.Tensor) -> Residuals:
        """hint: (B, in_channels, H, W) control image in [0, 1], H and W multiples of downscale_factor (the
        image's size: 8 times the latent's for SD) -> one feature per block, feature i of shape
        (B, channels_i, H / f_i, W / f_i), f_i as `config.features()` lists."""
        self.check_hint(hint)
        return Residuals(intrablock=tuple(self.adapter(hint.to(self.dtype))))

    def check_hint(self, hint: Any, *, size: tuple[int, int] | None = None) -> None:
        """A float (B, in_channels, H, W) tensor whose sides pixel-unshuffle evenly (and are `size`, when given):
        InputError first."""
        cfg = self.config
        if not isinstance(hint, torch.Tensor) or not hint.is_floating_point() or hint.ndim != 4 \
                or hint.shape[1] != cfg.in_channels:
            raise InputError(f"a T2I-Adapter takes a float control image of {cfg.in_channels} channel(s)",
                             where="control_image", expected=f"(B, {cfg.in_channels}, H, W) floats",
                             found=shape_of(hint) if isinstance(hint, torch.Tensor) else type(hint).__name__)
        sides = tuple(hint.shape[2:])
        if size is not None and sides != tuple(size):
            raise InputError("the control image must have the generated image's size", where="control_image",
                             expected=tuple(size), found=sides)
        if any(s % cfg.downscale_factor for s in sides):
            raise InputError(f"a T2I-Adapter's control image sides must be multiples of {cfg.downscale_factor}",
                             where="control_image", expected=f"multiples of {cfg.downscale_factor}", found=sides)

    def check_fits(self, unet_config: UNetConfig, *, latent_factor: int, where: str = "adapter") -> None:
        """ConfigError unless every feature has the width and scale of the UNet level it is added to (the control
        image being `latent_factor` times the latent's side): an adapter for SDXL on SD 1.5, a light adapter
        for a narrower UNet ... are refused before any work."""
        wanted = intrablock_features(unet_config)
        found = [(width, factor / latent_factor) for width, factor in self.config.features()]
        if found not in (wanted, wanted[:-1]):   # the mid level's feature is optional (SDXL adapters add one)
            raise ConfigError("this T2I-Adapter's features do not fit the UNet's levels", where=where,
                              expected=[f"{w} channels at 1/{f:g}" for w, f in wanted],
                              found=[f"{w} channels at 1/{f:g}" for w, f in found])

    # ---- TencentARC's original files (hooks provided by latentdiff.convert.t2i_adapter) ------------------------
    @classmethod
    def from_single_file(cls, path: str | os.PathLike, *, original_config: Any = None, use_ema: bool = True,
                         prediction_type: str | None = None, torch_dtype: torch.dtype | str | None = None,
                         device: str | torch.device | None = None, check_finite_weights: bool = False) -> T2IAdapter:
        """Load a TencentARC T2I-Adapter file (`t2iadapter_*_sd14v1.pth` / `.safetensors`: full or light
        adapters, the architecture read from the tensor shapes; pickles only through weights_only loading), or
        a file `save_single_file` wrote, strictly. `original_config`, `prediction_type`: refused (an adapter file
        has no YAML or schedule); `use_ema`: kept for the shared signature, without effect (an adapter file holds
        one set of weights)."""
        for name, value in (("original_config", original_config), ("prediction_type", prediction_type)):
            if value is not None:
                raise InputError(f"a T2I-Adapter file takes no {name}", where=name, expected=None, found=repr(value))
        path = local_file(path)   # a Hub file URL or "owner/repo/file": the cached download
        torch_dtype = resolve_torch_dtype(torch_dtype, device=device, model=str(path))[0]
        model = SINGLE_FILE.get("t2i_adapter_from_single_file")(cls, path, torch_dtype=torch_dtype, device=device)
        if check_finite_weights:
            numerics.check_finite_weights(model, part=cls.__name__, source=str(path))
        return model

    def save_single_file(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
        """Write the adapter in TencentARC's original key layout (`.safetensors`, atomically; its config in the
        metadata), which A1111's and ComfyUI's adapter loaders read."""
        return SINGLE_FILE.get("t2i_adapter_to_single_file")(self, path, dtype=dtype)


def intrablock_features(unet_config: UNetConfig) -> list[tuple[int, float]]:
    """(width, downscale w.r.t. the latent) of the features the UNet adds T2I-Adapter features to, in order:
    a cross-attention level's output before its downsampler, a plain level's after it (`unet_levels.DownLevel`),
    then the mid level's output (`UNet2DConditional.forward`)."""
    levels, n = unet_config.attention_levels, len(unet_config.channels)
    out = [(width, float(2 ** (level + (not attends and level < n - 1))))
           for level, (width, attends) in enumerate(zip(unet_config.channels, levels, strict=True))]
    return out + [(unet_config.channels[-1], float(2 ** (n - 1)))]

