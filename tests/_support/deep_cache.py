"""DeepCache's published procedure driven by hand over a diffusers UNet's blocks (UNet2DConditionModel or
UNet2DModel): the independent reference of tests/models/test_deep_cache.py.

The UNet is flattened into its skip-producing parts (conv_in; each down resnet (+ attention); each downsampler)
and its up resnets (pop a skip, concatenate, resnet (+ attention)) with the upsamplers after each up block.
Branch b (DeepCache's `cache_branch_id`): a full pass records the running feature entering the up resnet that pops
skip b; a shallow pass computes skips 0 .. b and runs the way up from that resnet, starting at the recorded feature.
ControlNet residuals are added to the skips (all of them on a full pass, the computed ones on a shallow pass) and
the mid residual to the mid output, as diffusers' UNet2DConditionModel adds them.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _attend(attn: Any, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    if context is None:       # UNet2DModel's Attention (group norm, residual inside)
        return attn(h)
    return attn(h, encoder_hidden_states=context, return_dict=False)[0]


def _emb(unet: Any, x: torch.Tensor, t: torch.Tensor, added_cond: dict | None) -> torch.Tensor:
    emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
    if added_cond is not None:   # SDXL text_time
        ids = unet.add_time_proj(added_cond["time_ids"].flatten()).reshape(x.shape[0], -1)
        emb = emb + unet.add_embedding(torch.cat([added_cond["text_embeds"], ids], dim=-1).to(emb.dtype))
    return emb


def run(unet: Any, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None, *, branch: int,
        stored: torch.Tensor | None = None, added_cond: dict | None = None,
        down_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, the feature at branch `branch`): a full pass when `stored` is None, else the shallow pass from
    `stored` (whose returned feature is `stored`)."""
    emb = _emb(unet, x, t, added_cond)
    h = unet.conv_in(x)
    skips = [h]
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attn in zip(block.resnets, attentions, strict=True):
            if stored is not None and len(skips) > branch:
                break
            h = resnet(h, emb)
            h = h if attn is None else _attend(attn, h, context)
            skips.append(h)
        if block.downsamplers is not None and not (stored is not None and len(skips) > branch):
            h = block.downsamplers[0](h)
            skips.append(h)
    if down_residuals is not None:
        skips = [s + r for s, r in zip(skips, down_residuals, strict=False)]
    if stored is None:
        h = unet.mid_block(h, emb, encoder_hidden_states=context) if context is not None else unet.mid_block(h, emb)
        if mid_residual is not None:
            h = h + mid_residual
    total = _skip_total(unet)
    pops, feature = 0, stored
    for block in unet.up_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attn in zip(block.resnets, attentions, strict=True):
            if pops == total - 1 - branch:       # the resnet that takes skip `branch`
                if stored is None:
                    feature = h
                else:
                    h = stored
            pops += 1
            if stored is not None and pops <= total - 1 - branch:
                continue
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            h = h if attn is None else _attend(attn, h, context)
        if block.upsamplers is not None and not (stored is not None and pops <= total - 1 - branch):
            h = block.upsamplers[0](h)
    out = unet.conv_out(F.silu(unet.conv_norm_out(h)))
    assert feature is not None
    return out, feature


def _skip_total(unet: Any) -> int:
    """conv_in's skip and one per down resnet and downsampler."""
    return 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in unet.down_blocks)
