"""TencentARC's original T2I-Adapter layouts, written out here from the original networks' definitions
(ldm/modules/encoders/adapter.py: `Adapter(sk=True, use_conv=False, ksize=1)` and `Adapter_light`), independently
of latentdiff's key tables, so that a test of those tables can fail."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def original_full_shapes(channels: Sequence[int], nums_rb: int, cin: int) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of `Adapter(channels, nums_rb, cin, ksize=1, sk=True, use_conv=False)`: a flat
    list of residual units, a unit's in_conv only where the width changes (sk=True), block2 of kernel ksize."""
    shapes: dict[str, tuple[int, ...]] = {"conv_in.weight": (channels[0], cin, 3, 3), "conv_in.bias": (channels[0],)}
    for i, c in enumerate(channels):
        for j in range(nums_rb):
            k = i * nums_rb + j
            c_in = channels[i - 1] if i and not j else c
            if c_in != c:
                shapes |= {f"body.{k}.in_conv.weight": (c, c_in, 1, 1), f"body.{k}.in_conv.bias": (c,)}
            shapes |= {f"body.{k}.block1.weight": (c, c, 3, 3), f"body.{k}.block1.bias": (c,),
                       f"body.{k}.block2.weight": (c, c, 1, 1), f"body.{k}.block2.bias": (c,)}
    return shapes


def original_light_shapes(channels: Sequence[int], nums_rb: int, cin: int) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of `Adapter_light(channels, nums_rb, cin)`: one extractor per level, working at a
    quarter of the level's width."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, c in enumerate(channels):
        c_in, inner = channels[i - 1] if i else cin, c // 4
        shapes |= {f"body.{i}.in_conv.weight": (inner, c_in, 1, 1), f"body.{i}.in_conv.bias": (inner,),
                   f"body.{i}.out_conv.weight": (c, inner, 1, 1), f"body.{i}.out_conv.bias": (c,)}
        for j in range(nums_rb):
            for conv in ("block1", "block2"):
                shapes |= {f"body.{i}.body.{j}.{conv}.weight": (inner, inner, 3, 3),
                           f"body.{i}.body.{j}.{conv}.bias": (inner,)}
    return shapes


def to_original(diffusers_state: Mapping[str, torch.Tensor], *, light: bool,
                nums_rb: int) -> dict[str, torch.Tensor]:
    """A diffusers T2IAdapter state dict -> TencentARC's keys (the reverse of diffusers'
    scripts/convert_original_t2i_adapter.py, written from the layouts above)."""
    out = {}
    for key, value in diffusers_state.items():
        parts = key.split(".")
        assert parts[0] == "adapter", key
        if parts[1] == "conv_in":
            out[".".join(parts[1:])] = value
            continue
        level = int(parts[2])
        if light:   # adapter.body.i.resnets.j.x -> body.i.body.j.x
            rest = ["body", *parts[4:]] if parts[3] == "resnets" else parts[3:]
            out[".".join(["body", str(level), *rest])] = value
        elif parts[3] == "in_conv":   # a level's first unit
            out[".".join(["body", str(level * nums_rb), *parts[3:]])] = value
        else:   # adapter.body.level.resnets.j.x -> body.(level * nums_rb + j).x
            out[".".join(["body", str(level * nums_rb + int(parts[4])), *parts[5:]])] = value
    return out
