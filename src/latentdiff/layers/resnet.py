"""Residual blocks and resampling layers shared by the UNet and the autoencoders.

Parameter names follow the diffusers layout (norm1, conv1, time_emb_proj, ...) so that
checkpoints in that layout load without a key map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, (+ time embedding), GroupNorm -> SiLU -> dropout -> conv, + skip.

    x: (B, C_in, H, W), temb: (B, temb_channels) or None -> (B, C_out, H, W)
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int | None = 512,
                 groups: int = 32, eps: float = 1e-6, dropout: float = 0.0, output_scale_factor: float = 1.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        # Dropout only where it can do something: in eval mode a p=0 Dropout is a wasted op per call.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = F.silu(self.norm2(h))
        if self.dropout is not None:
            h = self.dropout(h)
        h = self.conv2(h)
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = skip + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample(nn.Module):
    """Stride-2 3x3 conv. padding=0 pads right/bottom only, as the original autoencoder does."""

    def __init__(self, channels: int, out_channels: int | None = None, *, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to an explicit size, for odd skip shapes), then a 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
