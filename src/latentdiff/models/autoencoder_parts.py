"""Encoder and decoder of the LDM first stage (Rombach et al. 2022, sec. 3.1 and app. G).

Shared by the KL-regularised autoencoder and the VQ autoencoder: both map an image x (B, C, H, W)
to a latent of spatial size (H/f, W/f) with f = 2^(levels - 1), and back. Parameter names follow the
diffusers layout (down_blocks.i.resnets.j, down_blocks.i.attentions.j, mid_block.attentions.0,
up_blocks.i.upsamplers.0 ...) so diffusers checkpoints load with no key map.

Some first stages (kl-f16, kl-f32, vq-f16 ...) add single-head self-attention after every resnet of
the levels listed in the original YAML's `attn_resolutions`; here that is `attention_levels`, one
flag per level (level 0 = full resolution), used by encoder and decoder alike, as in the original.
`FirstStage` is the base of every first stage (AutoencoderKL, VQModel, IdentityFirstStage): the
downsampling factor, the image check and the scaled-latent decode, written once.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import limits
from ..config import ComponentConfig
from ..errors import InputError
from ..layers.attention import SpatialSelfAttention
from ..layers.resnet import Downsample, ResnetBlock, Upsample
from . import structure
from .base import ModelMixin

# What the first stages' encode_latents take: one generator for the batch, or one per sample.
Generator: TypeAlias = torch.Generator | Sequence[torch.Generator] | None

# The autoencoder's GroupNorms all use eps=1e-6 (the original `Normalize`), not PyTorch's 1e-5.
NORM_EPS = 1e-6


def _resnet(in_channels: int, out_channels: int, groups: int) -> ResnetBlock:
    # No timestep in the first stage: temb_channels=None drops time_emb_proj.
    return ResnetBlock(in_channels, out_channels, temb_channels=None, groups=groups, eps=NORM_EPS)


def _attentions(channels: int, count: int, groups: int, attention: bool) -> nn.ModuleList | None:
    # One single-head attention per resnet (the original AttnBlock); None, not an empty list, so that
    # forward() skips the level with one test and the state dict has no attention keys, as in diffusers.
    return nn.ModuleList(SpatialSelfAttention(channels, groups=groups, eps=NORM_EPS) for _ in range(count)) \
        if attention else None


class DownEncoderBlock(nn.Module):
    """`layers` resnet blocks (each followed by self-attention if `attention`), then (except at the last
    level) a stride-2 conv. diffusers calls the two variants DownEncoderBlock2D / AttnDownEncoderBlock2D.

    x: (B, C_in, H, W) -> (B, C_out, H/2, W/2), or (B, C_out, H, W) without downsampling.
    """

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, groups: int, downsample: bool,
                 attention: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(in_channels if j == 0 else out_channels, out_channels, groups)
                                     for j in range(layers))
        self.attentions = _attentions(out_channels, layers, groups, attention)
        # padding=0: the original pads right/bottom only (asymmetric), so keep it for weight compatibility.
        self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[j](x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nn.Module):
    """`layers` resnet blocks (each followed by self-attention if `attention`), then (except at the last
    level) nearest x2 upsampling and a conv. diffusers: UpDecoderBlock2D / AttnUpDecoderBlock2D.

    x: (B, C_in, h, w) -> (B, C_out, 2h, 2w), or (B, C_out, h, w) without upsampling.
    """

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, groups: int, upsample: bool,
                 attention: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(in_channels if j == 0 else out_channels, out_channels, groups)
                                     for j in range(layers))
        self.attentions = _attentions(out_channels, layers, groups, attention)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[j](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """resnet -> (single-head self-attention over pixels) -> resnet, at the lowest resolution.

    x: (B, C, h, w) -> (B, C, h, w)
    """

    def __init__(self, channels: int, *, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(channels, channels, groups), _resnet(channels, channels, groups)])
        # Without attention the list is empty, so there are no attention keys, as in diffusers.
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups=groups, eps=NORM_EPS)] if attention
                                        else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


def _level_flags(attention_levels: tuple[bool, ...] | None, levels: int) -> tuple[bool, ...]:
    return attention_levels if attention_levels is not None else (False,) * levels


class Encoder(nn.Module):
    """Image -> latent moments: conv_in, one DownEncoderBlock per level, mid block, norm, SiLU, conv_out.

    x: (B, in_channels, H, W) -> (B, z_channels * (2 if double_z else 1), H/f, W/f), f = 2^(len(channels)-1).
    `double_z` makes room for the mean and log-variance of the KL model's posterior.
    `attention_levels[i]` adds self-attention after each resnet of level i (None: none outside the mid block).
    """

    def __init__(self, *, in_channels: int, z_channels: int, channels: tuple[int, ...], layers_per_level: int,
                 groups: int, mid_block_attention: bool = True, double_z: bool = True,
                 attention_levels: tuple[bool, ...] | None = None):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        levels = len(channels)
        attention = _level_flags(attention_levels, levels)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(channels[max(i - 1, 0)], channels[i], layers=layers_per_level, groups=groups,
                             downsample=i < levels - 1, attention=attention[i])
            for i in range(levels))
        self.mid_block = MidBlock(channels[-1], groups=groups, attention=mid_block_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image: conv_in, mid block, one UpDecoderBlock per level (widest first), norm, SiLU, conv_out.

    z: (B, z_channels, h, w) -> (B, out_channels, h*f, w*f). Each up level has layers_per_level + 1
    resnets, one more than the encoder, as in the original. `attention_levels` is indexed like the
    encoder's (level 0 = full resolution), so up_blocks[i] serves level len(channels) - 1 - i.
    """

    def __init__(self, *, z_channels: int, out_channels: int, channels: tuple[int, ...], layers_per_level: int,
                 groups: int, mid_block_attention: bool = True, attention_levels: tuple[bool, ...] | None = None):
        super().__init__()
        widths = tuple(reversed(channels))
        attention = tuple(reversed(_level_flags(attention_levels, len(channels))))
        self.conv_in = nn.Conv2d(z_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups=groups, attention=mid_block_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(widths[max(i - 1, 0)], widths[i], layers=layers_per_level + 1, groups=groups,
                           upsample=i < len(widths) - 1, attention=attention[i])
            for i in range(len(widths)))
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


def check_image(x: torch.Tensor, *, channels: int, factor: int, where: str) -> None:
    """Refuse anything but (B, channels, H, W) with H and W positive multiples of `factor`, before any work."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise InputError("images have the wrong shape", where=where, expected=f"(B, {channels}, H, W)",
                         found=tuple(x.shape))
    height, width = x.shape[-2:]
    if height % factor or width % factor or height == 0 or width == 0:
        raise InputError(f"image height and width must be positive multiples of the downsampling factor {factor}",
                         where=where, expected=f"H, W in {factor}, {2 * factor}, {3 * factor}, ...",
                         found=f"H={height}, W={width}")


class LevelsConfig(Protocol):
    """The fields of a first stage's config that FirstStage reads (AutoencoderKLConfig and VQModelConfig have
    them; IdentityFirstStage overrides the properties that read them)."""

    @property
    def channels(self) -> tuple[int, ...]: ...
    @property
    def in_channels(self) -> int: ...


def _levels(config: ComponentConfig) -> LevelsConfig:
    levels: Any = config  # AutoencoderKLConfig or VQModelConfig, both a LevelsConfig (not a common base class)
    return levels


FirstStageConfigT = TypeVar("FirstStageConfigT", bound=ComponentConfig)


class FirstStage(ModelMixin[FirstStageConfigT]):
    """Base of the first stages: image (B, image_channels, H, W) <-> latent (B, latent_channels, H/f, W/f).

    Subclasses give `encode`, `decode`, `encode_latents` and `scale_latents` / `unscale_latents`.
    """

    @property
    def downsample_factor(self) -> int:
        """f: the image is f times the latent's height and width (one halving per level after the first)."""
        return 2 ** (len(_levels(self.config).channels) - 1)

    @property
    def image_channels(self) -> int:
        """Channels of the images encode takes."""
        return _levels(self.config).in_channels

    def check_image(self, x: torch.Tensor, *, where: str | None = None) -> None:
        """Refuse anything but (B, image_channels, H, W) with H and W positive multiples of f, before any work."""
        check_image(x, channels=self.image_channels, factor=self.downsample_factor,
                    where=where or f"{type(self).__name__}.encode(x)")

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, latent_channels, h, w) -> image (B, C, h*f, w*f)."""
        return self.decode(self.unscale_latents(z))

    # ---- what each first stage gives (`encode` too, whose result differs: a posterior, a latent) ----------
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (B, latent_channels, h, w) -> image (B, C, h*f, w*f)."""
        raise NotImplementedError

    def encode_latents(self, x: torch.Tensor, *, generator: Generator = None, sample: bool = True) -> torch.Tensor:
        """Image (B, image_channels, H, W) -> scaled latent (B, latent_channels, H/f, W/f)."""
        raise NotImplementedError

    def scale_latents(self, latent: torch.Tensor) -> torch.Tensor:
        """The first stage's latent -> the diffusion model's."""
        raise NotImplementedError

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of `scale_latents`."""
        raise NotImplementedError


# ---- the architecture fields AutoencoderKLConfig and VQModelConfig share ----------------------------
def validate_first_stage(config: ComponentConfig, bad: Callable[[str, str, Any], None]) -> None:
    """Check the fields both first-stage configs have; `bad(field, expected, found)` raises.

    An all-False `attention_levels` becomes None: one spelling per architecture, so configs that build
    the same model (and the config read back from the file written for it) compare equal.
    """
    c: Any = config
    for name in ("in_channels", "out_channels", "latent_channels", "layers_per_level", "norm_num_groups"):
        if getattr(c, name) < 1:
            bad(name, "a positive integer", getattr(c, name))
    if c.sample_size is not None and c.sample_size < 1:
        bad("sample_size", "a positive integer or None", c.sample_size)
    if not c.channels or any(w < 1 for w in c.channels):
        bad("channels", "one positive width per level (at least one level)", c.channels)
    structure.check_levels(c.channels)
    structure.check_counts([("layers_per_level", c.layers_per_level, limits.MAX_LAYERS_PER_LEVEL),
                            *((name, getattr(c, name), limits.MAX_CHANNELS)
                              for name in ("in_channels", "out_channels", "latent_channels"))])
    structure.check_parameters(structure.estimate_autoencoder_parameters(c.channels, c.layers_per_level),
                               what=f"this {type(config).__name__}", key="channels")
    if any(w % c.norm_num_groups for w in c.channels):
        bad("channels", f"widths divisible by norm_num_groups={c.norm_num_groups}", c.channels)
    if c.attention_levels is not None:
        if len(c.attention_levels) != len(c.channels):
            bad("attention_levels", f"one flag per level ({len(c.channels)}), or None", c.attention_levels)
        if not any(c.attention_levels):
            object.__setattr__(config, "attention_levels", None)
    if not (math.isfinite(c.scaling_factor) and c.scaling_factor > 0):
        bad("scaling_factor", "a finite positive number", c.scaling_factor)
