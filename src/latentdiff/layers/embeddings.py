"""Timestep embeddings (Vaswani et al. 2017 sinusoids, as used by DDPM and LDM)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (half, freq_shift, max_period, device) -> (1, half) float32 frequencies. The table depends on no input value,
# so building it (arange, mul, div, exp) on every UNet call is pure per-op overhead; a few entries per process.
_FREQUENCIES: dict[tuple[int, float, float, torch.device], torch.Tensor] = {}


def to_dtype(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """value in dtype; the .to() only when it changes something (a no-op .to() is still an op per call).
    (The one tensor dtype cast of the layers; a state dict's is models.base.cast_state_dict.)"""
    return value if value.dtype == dtype else value.to(dtype)


def timestep_embedding(t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """t: (B,) -> (B, dim) float32: [sin(t w_i), cos(t w_i)] with w_i = max_period^(-i / (half - freq_shift))."""
    t = to_dtype(t, torch.float32)
    angles = t[:, None] * frequencies(dim // 2, freq_shift=freq_shift, max_period=max_period, device=t.device)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)] if flip_sin_to_cos else
                    [torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def frequencies(half: int, *, freq_shift: float, max_period: float, device: torch.device) -> torch.Tensor:
    """(1, half) float32 w_i = exp(-ln(max_period) i / (half - freq_shift)), built once per device and kept
    (shared between calls: never modify it in place)."""
    key = (half, float(freq_shift), float(max_period), device)
    if torch.compiler.is_compiling():  # in a traced graph the table is constant-folded: no cache, no guards on it
        return _frequency_table(*key)
    table = _FREQUENCIES.get(key)
    if table is not None:
        return table
    # outside inference_mode: an inference tensor could not be used by a later call that records autograd
    with torch.inference_mode(False), torch.no_grad():
        table = _frequency_table(*key)
    # not a fake / functional tensor of some tracing mode, and not written by a CUDA graph capture, whose
    # kernels run only at replay: those must not outlive the call that made them
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if type(table) is torch.Tensor and not capturing:
        _FREQUENCIES[key] = table
    return table


def _frequency_table(half: int, freq_shift: float, max_period: float, device: torch.device) -> torch.Tensor:
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / (half - freq_shift)
    return torch.exp(exponent)[None, :]


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear over the sinusoidal embedding."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))
