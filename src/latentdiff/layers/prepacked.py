"""Convolutions with their weights reordered once into oneDNN's blocked layout (CPU).

An `nn.Conv2d` on the CPU hands oneDNN a plain (O, I, kh, kw) weight, and oneDNN reorders it into the blocked
layout its kernels read (for AMX bf16: VNNI-packed tiles) on every call: in one bf16 SD 1.5 UNet call at 256 px
that reorder was 248 ms of 587 ms of oneDNN time. `prepack_convolutions` makes the reorder once
(`torch.ops.mkldnn._reorder_convolution_weight`, the op inductor's freezing pass uses) and calls
`mkldnn._convolution_pointwise` with the packed weight; the result is the same convolution (fp32: to rounding
order; bf16: the same rounding of inputs, the same fp32 accumulation).

The module stays an `nn.Conv2d` with its parameters, so `state_dict`, saving, LoRA fusing and `.to()` are
unchanged; the packed copy (as large again as the convolution weights) lives outside the parameters and is
rebuilt when the weight is changed in place or moved (its version, storage, dtype or device differ), so it is
never stale. `unpack_convolutions` drops it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def can_prepack(conv: nn.Module) -> bool:
    """A 2-d convolution oneDNN runs from a packed weight: on the CPU, float32 or bfloat16, zero padding, no
    gradient wanted (the packed op has no backward)."""
    return (type(conv) is nn.Conv2d and conv.weight.device.type == "cpu"
            and conv.weight.dtype in (torch.float32, torch.bfloat16) and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and torch.backends.mkldnn.is_available())


class PackedForward:
    """The replacement `forward` of one Conv2d: the oneDNN convolution on a weight packed once per version."""

    def __init__(self, conv: nn.Conv2d):
        self.conv = conv
        self.key: tuple[Any, ...] | None = None
        self.packed: torch.Tensor | None = None
        self.latentdiff_prepacked = True

    def weight(self) -> torch.Tensor:
        w = self.conv.weight
        # an inference tensor keeps no version counter: its storage, dtype and device still tell a move or a swap
        key = (None if w.is_inference() else w._version, w.data_ptr(), w.dtype, w.device)
        if key != self.key or self.packed is None:
            conv = self.conv
            self.packed = torch.ops.mkldnn._reorder_convolution_weight(
                w.detach(), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
            self.key = key
        return self.packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad) or x.dtype != conv.weight.dtype:
            return nn.Conv2d.forward(conv, x)   # training, or a dtype oneDNN's packed call does not mix: as before
        bias = conv.bias.detach() if conv.bias is not None else None
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight(), bias, list(conv.padding),
                                                       list(conv.stride), list(conv.dilation), conv.groups,
                                                       "none", [], "")


def prepack_convolutions(module: nn.Module) -> int:
    """Give every CPU Conv2d inside `module` a prepacked forward (see the module docstring); -> how many."""
    count = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and can_prepack(conv) and not is_prepacked(conv):
            conv.forward = PackedForward(conv)  # type: ignore[method-assign,assignment]
            count += 1
    return count


def is_prepacked(conv: nn.Module) -> bool:
    return getattr(conv.__dict__.get("forward"), "latentdiff_prepacked", False)


def unpack_convolutions(module: nn.Module) -> int:
    """Back to the plain Conv2d forward (the packed copies are freed); -> how many."""
    count = 0
    for conv in module.modules():
        if is_prepacked(conv):
            del conv.__dict__["forward"]
            count += 1
    return count
