"""Residual blocks and resampling layers shared by the UNet and the autoencoders.

Parameter names follow the diffusers layout (norm1, conv1, time_emb_proj, ...) so that
checkpoints in that layout load without a key map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .fused import add_output


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> (resample) -> conv, (+ time embedding), GroupNorm -> SiLU -> dropout -> conv, + skip.

    `time_scale_shift` (LDM use_scale_shift_norm, diffusers time_embedding_norm="scale_shift"): the time
    embedding is projected to 2 * C_out and modulates the second norm, h = norm2(h) * (1 + scale) + shift,
    instead of being added before it. `up` / `down` (LDM resblock_updown, diffusers ResnetBlock2D(up/down=True)):
    the block resamples by 2, nearest-neighbour up or 2x2 average-pool down, on both the hidden path (after
    norm1 and SiLU) and the skip input; these resamplers have no parameters.

    x: (B, C_in, H, W), temb: (B, temb_channels) or None -> (B, C_out, H', W'), H' = 2H (up), H // 2 (down), else H.
    The block applies SiLU to temb itself; a UNet, whose blocks all take the same embedding, passes SiLU(temb)
    once with `temb_activated=True` instead (one SiLU per call, not one per block).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int | None = 512,
                 groups: int = 32, eps: float = 1e-6, dropout: float = 0.0, output_scale_factor: float = 1.0,
                 time_scale_shift: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        if up and down:
            raise ConfigError("a ResnetBlock resamples one way", where="ResnetBlock(up, down)",
                              expected="at most one of up / down", found=(up, down))
        out_channels = out_channels or in_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        emb_width = 2 * out_channels if time_scale_shift else out_channels  # (scale, shift) or one shift
        self.time_emb_proj = nn.Linear(temb_channels, emb_width) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        # Dropout only where it can do something: in eval mode a p=0 Dropout is a wasted op per call.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor
        self.time_scale_shift = time_scale_shift
        self.up, self.down = up, down

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None, *,
                upsample_size: tuple[int, int] | None = None, temb_activated: bool = False) -> torch.Tensor:
        """`upsample_size`: with `up`, the exact output size (odd skip shapes); None doubles H and W.
        `temb_activated`: temb is already SiLU(time embedding). Without autograd (inference) the SiLUs and the
        residual sum work in place on the block's own temporaries: the same values, one activation fewer alive
        at a time (what that saves in SD 1.5's widest blocks: benchmarks/RESULTS.md)."""
        in_place = not torch.is_grad_enabled()
        h = F.silu(self.norm1(x), inplace=in_place)
        if self.up:  # the skip input is resampled too, so that it still adds to h
            h, x = _nearest_up(h, upsample_size), _nearest_up(x, upsample_size)
        elif self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.conv1(h)
        if self.time_emb_proj is not None and temb is not None:
            emb = self.time_emb_proj(temb if temb_activated else F.silu(temb)).unflatten(1, (-1, 1, 1))
            if self.time_scale_shift:
                scale, shift = emb.chunk(2, dim=1)
                h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + emb)
        else:
            h = self.norm2(h)
        h = F.silu(h, inplace=in_place)
        if self.dropout is not None and self.training:  # in eval mode dropout is a no-op call
            h = self.dropout(h)
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = add_output(self.conv2, h, skip, in_place=in_place)   # conv2(h) + skip, one pass where packed
        if self.output_scale_factor == 1.0:
            return out
        return out.div_(self.output_scale_factor) if in_place else out / self.output_scale_factor


def _nearest_up(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Nearest-neighbour x2, or to an explicit size."""
    if size is None:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, size=size, mode="nearest")


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
        return self.conv(_nearest_up(x, size))
