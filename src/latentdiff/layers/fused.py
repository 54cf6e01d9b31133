"""`layer(x) + residual`, as one oneDNN call where the layer's forward can fuse the sum (layers.prepacked).

The UNet's residual sums (a ResBlock's conv2 + skip, a spatial transformer's proj_out + input, attention's and the
feed-forward's output projections + the block input) each read and write one more activation-sized tensor after
the layer wrote its output. A prepacked convolution or linear layer adds the residual in the same pass, as a
oneDNN binary post-op (`mkldnn._convolution_pointwise.binary` / `_linear_pointwise.binary` with "add"): the same
sum, rounded once where eager bf16 rounds the layer's output and then the sum. Any other layer (plain, training,
on a GPU) runs as `layer(x) + residual`, and so does a layer with forward hooks (an unfused LoRA's, the adapters'
runtime): the fused call would bypass them.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as torch_module


def add_output(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor, *, in_place: bool = False
               ) -> torch.Tensor:
    """layer(x) + residual; fused when the layer's forward has an `add(x, residual)` (layers.prepacked) and no
    hook would be skipped. in_place: unfused, the sum is written into layer(x)'s own output (a temporary)."""
    fused = getattr(layer.__dict__.get("forward"), "add", None)
    if fused is not None and not _hooked(layer):
        out = fused(x, residual)
        if out is not None:
            return out
    out = layer(x)
    return out.add_(residual) if in_place else out + residual


def _hooked(layer: nn.Module) -> bool:
    """Whether calling the layer would run hooks (its own, or global ones) that a direct fused call skips."""
    return bool(layer._forward_hooks or layer._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)
