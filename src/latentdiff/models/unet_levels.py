"""The resolution levels of the conditional UNet (diffusers' CrossAttn/plain Down, Mid and Up blocks), shared by
`unet.UNet2DConditional`, its ControlNet (`controlnet.ControlNet`) and the unconditional `unet2d.UNet2D`."""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, TypeAlias

import torch
from torch import nn

from ..errors import InputError
from ..layers.resnet import Downsample, ResnetBlock, Upsample
from .freeu import FreeUFactors

Attend: TypeAlias = Callable[[int], nn.Module]  # channels -> SpatialTransformer


class DownLevel(nn.Module):
    """diffusers CrossAttnDownBlock2D (with `attend`) / DownBlock2D: resnets (+ transformers) (+ downsample)."""

    # The downsampler is a ResnetBlock(down=True), which takes the time embedding (unet2d.ResnetDownLevel);
    # False: a strided conv (Downsample).
    resnet_resampler: ClassVar[bool] = False

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, resnet: Callable[..., ResnetBlock],
                 attend: Attend | None, downsample: bool, padding: int):
        super().__init__()
        self.resnets = nn.ModuleList(resnet(in_channels if i == 0 else out_channels, out_channels)
                                     for i in range(layers))
        self.attentions = nn.ModuleList(attend(out_channels) for _ in range(layers)) if attend else None
        self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=padding)]) if downsample else None

    @property
    def skip_count(self) -> int:
        """How many skips the level appends: one per resnet, one more for a downsampler."""
        return len(self.resnets) + (self.downsamplers is not None)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                skips: list[torch.Tensor], intrablock: torch.Tensor | None = None, *,
                stop: int | None = None) -> torch.Tensor:
        """h: (B, C_in, H, W) -> (B, C_out, H', W'); appends every intermediate to `skips`.
        emb: SiLU(time embedding), (B, temb), as every level takes it (see UNet2DConditional.forward).
        intrablock: a T2I-Adapter's feature for this level (`residuals.Residuals`), added where diffusers adds it:
        after the last resnet + transformer pair of a cross-attention level, after a plain level's downsampler
        (both times the last skip carries it); not at all when `stop` ends the level before that point.
        stop: run only the first `stop` of the level's skip_count parts (DeepCache's shallow branch, `deep_cache`);
        None: all of them."""
        last, stop = len(self.resnets) - 1, self.skip_count if stop is None else stop
        for i in range(min(stop, len(self.resnets))):
            h = self.resnets[i](h, emb, temb_activated=True)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
                if i == last and intrablock is not None:
                    h = h + _checked(intrablock, h)
            skips.append(h)
        if stop < self.skip_count:
            return h
        if self.downsamplers is not None:
            down = self.downsamplers[0]
            h = down(h, emb, temb_activated=True) if self.resnet_resampler else down(h)
            skips.append(h)
        if self.attentions is None and intrablock is not None:
            h = skips[-1] = h + _checked(intrablock, h)
        return h


def _checked(residual: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """An intrablock residual must have the features' shape where it is added: InputError, not a broadcast."""
    if residual.shape != h.shape:
        raise InputError("a T2I-Adapter feature does not match the UNet level it is added to",
                         where="residuals.intrablock", expected=tuple(h.shape), found=tuple(residual.shape))
    return residual


class MidLevel(nn.Module):
    """diffusers UNetMidBlock2DCrossAttn (resnet, transformer, resnet) or UNetMidBlock2D (one resnet)."""

    def __init__(self, channels: int, *, resnet: Callable[..., ResnetBlock], attend: Attend | None):
        super().__init__()
        self.resnets = nn.ModuleList([resnet(channels, channels)] + ([resnet(channels, channels)] if attend else []))
        self.attentions = nn.ModuleList([attend(channels)]) if attend else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        h = self.resnets[0](h, emb, temb_activated=True)
        if self.attentions is not None:
            h = self.resnets[1](self.attentions[0](h, context), emb, temb_activated=True)
        return h


class UpLevel(nn.Module):
    """diffusers CrossAttnUpBlock2D / UpBlock2D: (resnet on [h, skip]) (+ transformer), x layers, (+ upsample).

    `in_channels` is the width coming up from the previous (coarser) level; `skip_channels` the width of the
    next finer level, whose downsampler output (conv_in's output, for level 0) is this level's last skip.
    """

    # The upsampler is a ResnetBlock(up=True), which takes the time embedding (unet2d.ResnetUpLevel); False:
    # nearest x2 and a conv (Upsample).
    resnet_resampler: ClassVar[bool] = False

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int, *, layers: int,
                 resnet: Callable[..., ResnetBlock], attend: Attend | None, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            resnet((in_channels if i == 0 else out_channels) + (skip_channels if i == layers - 1 else out_channels),
                   out_channels) for i in range(layers))
        self.attentions = nn.ModuleList(attend(out_channels) for _ in range(layers)) if attend else None
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None, skips: list[torch.Tensor],
                upsample_size: tuple[int, int] | None = None, *, start: int = 0, stop: int | None = None,
                freeu: FreeUFactors | None = None) -> torch.Tensor:
        """Pops one skip per resnet from the end of `skips`. start / stop: run resnets start .. stop - 1 only, the
        upsampler only when stop is None (DeepCache enters or leaves a level at a resnet, `deep_cache`).
        freeu: FreeU's (backbone, skip) factors for this level (`freeu.apply`), None: off."""
        for i in range(start, len(self.resnets) if stop is None else stop):
            skip = skips.pop()
            if freeu is not None:
                h, skip = freeu.apply(h, skip)
            h = self.resnets[i](torch.cat([h, skip], dim=1), emb, temb_activated=True)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if stop is not None:
            return h
        if self.upsamplers is not None:
            up = self.upsamplers[0]
            h = up(h, emb, upsample_size=upsample_size, temb_activated=True) if self.resnet_resampler \
                else up(h, upsample_size)
        return h
