"""Token merging (ToMe for SD, Bolya & Hoffman 2023) as a pipeline switch, off by default:

    pipe.enable_tome(0.5)          # merge half the tokens of the full-resolution levels' self-attention
    image = pipe("a red circle").images[0]
    pipe.disable_tome()

The settings go on the UNet's transformer blocks (`BasicTransformerBlock.token_merging`, see
`layers.token_merging` for the algorithm): a block of a level whose latent is downsampled at most
`max_downsample` times merges, the others do not. tomesd's defaults: max_downsample=1 (SD 1.x / 2.x: the 4 of
16 transformer blocks at the latent's full resolution carry most of the attention cost; SDXL has no attention
there, so max_downsample=2 is its first level that merges: with 1, `enable_tome` is a UsageError saying so),
sx = sy = 2, random destinations, merging around the self-attention only. A ControlNet's own blocks never merge
(its residuals must match the plain UNet's).

The random destination choice draws from a generator seeded with `seed` at the start of each denoising run
(`restart`), so one call gives the same image again; two threads sharing a pipeline with ToMe on share it. The
draw happens before each UNet call, in a forward pre-hook of the UNet (`draw_ahead`: one row of cell positions
per merging block, `TokenMerging.draw_picks`), never inside the UNet's forward: a compiled forward
(`pipe.compile()`, fullgraph) then holds no generator, and gives the eager images.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from ..config import is_int
from ..errors import InputError, UsageError
from ..layers.attention import BasicTransformerBlock
from ..layers.token_merging import TokenMerging, check_settings


def level_blocks(unet: nn.Module) -> Iterator[tuple[int, BasicTransformerBlock]]:
    """(downsampling factor of its level, block) for every transformer block of a UNet's down, mid and up levels
    (diffusers' layout: up level j has down level n-1-j's resolution)."""
    downs = list(getattr(unet, "down_blocks", ()))
    factors, factor = [], 1
    for level in downs:
        factors.append(factor)
        factor *= 2 if getattr(level, "downsamplers", None) is not None else 1
    levels: list[tuple[int, nn.Module | None]] = list(zip(factors, downs, strict=True))
    levels.append((factor, getattr(unet, "mid_block", None)))
    levels += zip(reversed(factors), getattr(unet, "up_blocks", ()), strict=False)   # a network without a way up: none
    for f, level in levels:
        for module in level.modules() if level is not None else ():
            if isinstance(module, BasicTransformerBlock):
                yield f, module


def enable_tome(unet: nn.Module, ratio: float = 0.5, *, max_downsample: int = 1, sx: int = 2, sy: int = 2,
                use_rand: bool = True, merge_attn: bool = True, merge_crossattn: bool = False,
                merge_mlp: bool = False, seed: int = 0) -> int:
    """Merge tokens in the transformer blocks of `unet`'s levels downsampled at most `max_downsample` times
    (replacing earlier settings). -> the number of blocks that merge; none would (SDXL with max_downsample=1):
    a UsageError naming the smallest max_downsample that merges, before anything changes."""
    check_settings(ratio=ratio, sx=sx, sy=sy)
    if not is_int(max_downsample) or max_downsample < 1:
        raise InputError("max_downsample must be a positive integer", where="max_downsample",
                         expected="1, 2, 4 or 8 (1: the full-resolution levels only)", found=repr(max_downsample))
    blocks = list(level_blocks(unet))
    if not blocks:
        raise UsageError("this UNet has no transformer blocks to merge tokens in", where="enable_tome",
                         expected="a UNet with spatial transformers (Stable Diffusion, SDXL, LDM text-to-image)",
                         found=type(unet).__name__)
    settings = TokenMerging(ratio=float(ratio), sx=int(sx), sy=int(sy), use_rand=bool(use_rand),
                            merge_attn=bool(merge_attn), merge_crossattn=bool(merge_crossattn),
                            merge_mlp=bool(merge_mlp), seed=int(seed))
    merging = [block for factor, block in blocks if factor <= max_downsample]
    if not merging:   # SDXL's first attention level is downsampled twice: tomesd's default merges nothing there
        raise UsageError(f"no transformer block of this UNet is on a level downsampled at most {max_downsample} "
                         "time(s): token merging would change nothing", where="max_downsample",
                         expected=f"max_downsample >= {min(f for f, _ in blocks)} (its first level with attention)",
                         found=max_downsample)
    disable_tome(unet)
    for block in merging:
        block.token_merging = settings
    setattr(unet, HOOK, unet.register_forward_pre_hook(draw_ahead, with_kwargs=True))
    return len(merging)


HOOK = "token_merging_hook"   # the UNet's attribute holding the handle of its `draw_ahead` hook


def draw_ahead(unet: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The UNet forward pre-hook that draws the random cells of every merging block for the coming call (an even
    batch: `TokenMerging.matching` merges randomly only then) and sets them on the blocks. It reads the blocks
    and settings from `unet` at each call, so a copy of the UNet draws for its own blocks. A block's cells are
    written into the tensor it holds from the call before when they fit (same latent size)."""
    merging = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock) and m.token_merging is not None]
    if not merging:
        return
    settings = merging[0].token_merging
    x = args[0] if args else kwargs.get("x")
    picks = None
    if settings is not None and settings.use_rand and isinstance(x, torch.Tensor) and x.shape[0] % 2 == 0:
        picks = settings.draw_picks(len(merging), (x.shape[-2], x.shape[-1]), x.device)
    for i, block in enumerate(merging):
        held = block.token_merging_picks
        if picks is None:
            block.token_merging_picks = None
        elif held is not None and held.shape == picks[i].shape and held.device == picks.device:
            held.copy_(picks[i])   # in place: the address a compiled (CUDA-graph) forward read stays valid
        else:
            block.token_merging_picks = picks[i].clone()


def tome_settings(unet: nn.Module) -> TokenMerging | None:
    """The token merging settings of `unet`'s merging blocks (None: no block merges)."""
    return next((m.token_merging for m in unet.modules()
                 if isinstance(m, BasicTransformerBlock) and m.token_merging is not None), None)


def disable_tome(unet: nn.Module) -> None:
    """No token merging in `unet` again."""
    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock):
            module.token_merging, module.token_merging_picks = None, None
    handle = getattr(unet, HOOK, None)
    if handle is not None:
        handle.remove()
        setattr(unet, HOOK, None)


def restart(unet: nn.Module) -> None:
    """Re-seed the destination choice of `unet`'s token merging (each denoising run starts the same)."""
    for settings in {id(m.token_merging): m.token_merging for m in unet.modules()
                     if isinstance(m, BasicTransformerBlock) and m.token_merging is not None}.values():
        settings.restart()


class HasUNet(Protocol):
    @property
    def unet(self) -> nn.Module: ...


class TokenMergingMixin:
    """`enable_tome` / `disable_tome` on a pipeline with a `unet` (the text-guided pipelines)."""

    def enable_tome(self: HasUNet, ratio: float = 0.5, *, max_downsample: int = 1, sx: int = 2, sy: int = 2,
                    use_rand: bool = True, merge_attn: bool = True, merge_crossattn: bool = False,
                    merge_mlp: bool = False, seed: int = 0) -> int:
        """Token merging in the UNet's self-attention (tomesd's `apply_patch` arguments; `pipelines.token_merging`).
        ratio: the fraction of a block's tokens merged (0: none; < 1). -> the number of blocks that merge."""
        return enable_tome(self.unet, ratio, max_downsample=max_downsample, sx=sx, sy=sy, use_rand=use_rand,
                           merge_attn=merge_attn, merge_crossattn=merge_crossattn, merge_mlp=merge_mlp, seed=seed)

    def disable_tome(self: HasUNet) -> None:
        disable_tome(self.unet)
