"""DeepCache (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for Free"), and the walk over a UNet's
levels that both UNets' forward run (`run_levels`): whole, or DeepCache's shallow branch.

Adjacent denoising steps compute nearly the same deep (low-resolution) features. DeepCache picks one skip
branch b of the UNet: skip b is the (b+1)-th of the way down's features, in the order the UNet keeps them (0:
conv_in's output, then each resnet and downsampler output of each level). A full pass stores the running
feature of the way up where it enters the up resnet that concatenates skip b (the paper's U_{m+1} output); a
shallow pass runs only what produces skips 0 .. b on the way down and the way up from that resnet on, starting
from the stored feature:

    full:     conv_in, D_1 .. D_L, mid, U_L .. U_1        stores h entering the resnet that takes skip b
    shallow:  conv_in, the parts of D_1.. giving skips 0..b  ->  h = stored  ->  that resnet, the rest of U_1

The numbering is that of DeepCache's diffusers helper (`DeepCacheSDHelper.set_params(cache_branch_id=b)`: on
SD 1.x branch 0 keeps conv_in's skip alone, the default; branch 1 adds the first resnet of the first level, ...).
Which step is full is the caller's business (`pipelines.step_cache`: every `cache_interval` steps, or the paper's
non-uniform choice): a `DeepCacheState` carries the decision (`full`) and the stored features into the call.
Several model calls in one step (Heun's two, MultiDiffusion windows) each keep their own feature (`slot`: the
call's position in its step); a call whose input shape differs from the stored feature's runs full.

ControlNet / T2I residuals on a shallow pass: the down residuals of the skips that are computed, and the
adapter features of the levels that run to their point of addition; the mid residual lives in the stored feature.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, cast

import torch
from torch import nn

from ..errors import InputError
from .freeu import FreeU
from .residuals import Residuals
from .unet_levels import DownLevel, UpLevel

Features = dict[int, tuple[tuple[int, ...], torch.Tensor]]


@dataclasses.dataclass(eq=False)
class DeepCacheState:
    """One DeepCache run, handed to the UNet's forward (`cache=`): the skip branch, whether this call is a full
    pass (set by the caller before each call), the call's slot, and what full passes stored (slot -> (input shape,
    feature)). The UNet counts its full and shallow passes. One state per run and thread: it is written to."""

    branch: int = 0
    full: bool = True
    slot: int = 0
    features: Features = dataclasses.field(default_factory=dict)
    full_passes: int = 0
    shallow_passes: int = 0


class LevelledUNet(Protocol):
    """What `run_levels` walks: the levels of UNet2DConditional and UNet2D, under diffusers' names."""

    @property
    def down_blocks(self) -> nn.ModuleList: ...

    @property
    def mid_block(self) -> nn.Module | None: ...

    @property
    def up_blocks(self) -> nn.ModuleList: ...


@dataclasses.dataclass(frozen=True)
class BranchPoint:
    """Where skip branch b leaves the way down and joins the way up: the last down level that runs (-1: none,
    conv_in alone) and how many of its parts (`DownLevel.skip_count`); the up level and resnet taking skip b."""

    down_level: int
    down_stop: int
    up_level: int
    up_start: int


def skip_count(down_blocks: Iterable[nn.Module]) -> int:
    """How many skips a UNet keeps: conv_in's output and every part of every down level. DeepCache's branches are
    0 .. skip_count - 1."""
    return 1 + sum(cast(DownLevel, down).skip_count for down in down_blocks)


def branch_point(down_blocks: Iterable[nn.Module], up_blocks: Iterable[nn.Module], branch: int) -> BranchPoint:
    """The BranchPoint of skip branch `branch`; InputError outside 0 .. skip_count - 1."""
    total = skip_count(down_blocks)
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < total:
        raise InputError("DeepCache's branch must be one of the UNet's skips", where="cache_branch_id",
                         expected=f"an int in 0 .. {total - 1}", found=branch)
    down_level, down_stop, remaining = -1, 0, branch
    for level, down in enumerate(cast(Iterable[DownLevel], down_blocks)):
        if remaining == 0:
            break
        if remaining <= down.skip_count:
            down_level, down_stop = level, remaining
            break
        remaining -= down.skip_count
    pops = total - 1 - branch           # the skips the way up takes before skip `branch` (it pops from the end)
    for level, up in enumerate(cast(Iterable[UpLevel], up_blocks)):
        if pops < len(up.resnets):
            return BranchPoint(down_level, down_stop, level, pops)
        pops -= len(up.resnets)
    raise AssertionError("the up levels take every skip")  # UNet construction: as many up resnets as skips


def run_levels(unet: LevelledUNet, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
               upsample_sizes: Sequence[tuple[int, int] | None], *, mid_args: tuple[Any, ...],
               residuals: Residuals | None = None, cache: DeepCacheState | None = None,
               freeu: FreeU | None = None) -> torch.Tensor:
    """conv_in's output h (B, C0, H, W) -> the way up's output (B, C0, H, W), through `unet`'s down_blocks,
    mid_block (if any; called as mid_block(h, *mid_args): (emb, context), or (emb,) for UNet2D's) and up_blocks.
    residuals: ControlNet / T2I-Adapter features (`residuals.Residuals`); cache: a DeepCache run (module
    docstring), None: the plain walk; freeu: FreeU's factors on the way up (`freeu.FreeU`), None: off."""
    point = None if cache is None else branch_point(unet.down_blocks, unet.up_blocks, cache.branch)
    if cache is not None and point is not None and not cache.full:
        stored = cache.features.get(cache.slot)
        if stored is not None and stored[0] == tuple(h.shape):
            cache.shallow_passes += 1
            return _shallow(unet, h, emb, context, upsample_sizes, point, stored[1], residuals=residuals,
                            freeu=freeu)
    skips = [h]
    intrablock = list(residuals.intrablock or ()) if residuals is not None else []
    for down in unet.down_blocks:
        h = down(h, emb, context, skips, intrablock.pop(0) if intrablock else None)
    if residuals is not None and residuals.down is not None:
        residuals.check(skips)
        skips = [s + r for s, r in zip(skips, residuals.down, strict=True)]
    if unet.mid_block is not None:
        h = unet.mid_block(h, *mid_args)
        if intrablock and intrablock[0].shape == h.shape:   # SDXL T2I-Adapters: one for the mid level
            h = h + intrablock.pop(0)
    if intrablock:
        raise InputError("more T2I-Adapter features than this UNet has down levels", where="residuals.intrablock",
                         expected=len(unet.down_blocks), found=len(residuals.intrablock or ()) if residuals else 0)
    if residuals is not None and residuals.mid is not None:
        h = h + residuals.mid
    for level, (up, size) in enumerate(zip(unet.up_blocks, upsample_sizes, strict=True)):
        factors = None if freeu is None else freeu.level(level)
        if cache is not None and point is not None and level == point.up_level:
            shape = tuple(skips[0].shape)
            h = up(h, emb, context, skips, size, stop=point.up_start, freeu=factors)
            cache.features[cache.slot] = (shape, h)
            cache.full_passes += 1
            h = up(h, emb, context, skips, size, start=point.up_start, freeu=factors)
        else:
            h = up(h, emb, context, skips, size, freeu=factors)
    return h


def _shallow(unet: LevelledUNet, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
             upsample_sizes: Sequence[tuple[int, int] | None], point: BranchPoint, stored: torch.Tensor, *,
             residuals: Residuals | None, freeu: FreeU | None) -> torch.Tensor:
    """DeepCache's shallow pass: the parts of the way down that give skips 0 .. b, then the way up from the
    resnet taking skip b, entered with the stored feature."""
    skips = [h]
    intrablock = list(residuals.intrablock or ()) if residuals is not None else []
    for level in range(point.down_level + 1):
        stop = point.down_stop if level == point.down_level else None
        h = unet.down_blocks[level](h, emb, context, skips, intrablock.pop(0) if intrablock else None, stop=stop)
    if residuals is not None and residuals.down is not None:
        total = skip_count(unet.down_blocks)
        if len(residuals.down) != total:
            raise InputError("residuals.down must have one tensor per UNet skip", where="residuals.down",
                             expected=total, found=len(residuals.down))
        Residuals(down=residuals.down[:len(skips)]).check(skips)
        skips = [s + r for s, r in zip(skips, residuals.down[:len(skips)], strict=True)]   # a shallow pass's skips
    h = stored
    for level in range(point.up_level, len(unet.up_blocks)):
        start = point.up_start if level == point.up_level else 0
        h = unet.up_blocks[level](h, emb, context, skips, upsample_sizes[level], start=start,
                                  freeu=None if freeu is None else freeu.level(level))
    return h
