"""Encoder and decoder of the LDM first stage (Rombach et al. 2022, sec. 3.1 and app. G).

Shared by the KL-regularised autoencoder and the VQ autoencoder: both map an image x (B, C, H, W)
to a latent of spatial size (H/f, W/f) with f = 2^(levels - 1), and back. Parameter names follow the
diffusers layout (down_blocks.i.resnets.j, mid_block.attentions.0, up_blocks.i.upsamplers.0 ...) so
diffusers checkpoints load with no key map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.attention import SpatialSelfAttention
from ..layers.resnet import Downsample, ResnetBlock, Upsample

# The autoencoder's GroupNorms all use eps=1e-6 (the original `Normalize`), not PyTorch's 1e-5.
NORM_EPS = 1e-6


def _resnet(in_channels: int, out_channels: int, groups: int) -> ResnetBlock:
    # No timestep in the first stage: temb_channels=None drops time_emb_proj.
    return ResnetBlock(in_channels, out_channels, temb_channels=None, groups=groups, eps=NORM_EPS)


class DownEncoderBlock(nn.Module):
    """`layers` resnet blocks, then (except at the last level) a stride-2 conv.

    x: (B, C_in, H, W) -> (B, C_out, H/2, W/2), or (B, C_out, H, W) without downsampling.
    """

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(in_channels if j == 0 else out_channels, out_channels, groups)
                                     for j in range(layers))
        # padding=0: the original pads right/bottom only (asymmetric), so keep it for weight compatibility.
        self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nn.Module):
    """`layers` resnet blocks, then (except at the last level) nearest x2 upsampling and a conv.

    x: (B, C_in, h, w) -> (B, C_out, 2h, 2w), or (B, C_out, h, w) without upsampling.
    """

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(in_channels if j == 0 else out_channels, out_channels, groups)
                                     for j in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
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


class Encoder(nn.Module):
    """Image -> latent moments: conv_in, one DownEncoderBlock per level, mid block, norm, SiLU, conv_out.

    x: (B, in_channels, H, W) -> (B, z_channels * (2 if double_z else 1), H/f, W/f), f = 2^(len(channels)-1).
    `double_z` makes room for the mean and log-variance of the KL model's posterior.
    """

    def __init__(self, *, in_channels: int, z_channels: int, channels: tuple[int, ...], layers_per_level: int,
                 groups: int, mid_block_attention: bool = True, double_z: bool = True):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        levels = len(channels)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(channels[max(i - 1, 0)], channels[i], layers=layers_per_level, groups=groups,
                             downsample=i < levels - 1)
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
    resnets, one more than the encoder, as in the original.
    """

    def __init__(self, *, z_channels: int, out_channels: int, channels: tuple[int, ...], layers_per_level: int,
                 groups: int, mid_block_attention: bool = True):
        super().__init__()
        widths = tuple(reversed(channels))
        self.conv_in = nn.Conv2d(z_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups=groups, attention=mid_block_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(widths[max(i - 1, 0)], widths[i], layers=layers_per_level + 1, groups=groups,
                           upsample=i < len(widths) - 1)
            for i in range(len(widths)))
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))
