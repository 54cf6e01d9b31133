"""Attention layers, all through torch.nn.functional.scaled_dot_product_attention.

Parameter names follow the diffusers layout (to_q, to_k, to_v, to_out.0; ff.net.0.proj, ff.net.2;
proj_in, transformer_blocks.N, proj_out) so checkpoints in that layout load without a key map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, upcast: bool = False) -> torch.Tensor:
    """Multi-head attention. q: (B, N, h*d), k/v: (B, M, h*d) -> (B, N, h*d)."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        # SD 2.1 needs fp32 attention scores: in fp16 they overflow.
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v)
    return out.to(dtype).transpose(1, 2).reshape(b, n, inner)


class Attention(nn.Module):
    """Self-attention (context=None) or cross-attention over a context sequence.

    x: (B, N, query_dim), context: (B, M, context_dim) -> (B, N, query_dim)
    """

    def __init__(self, query_dim: int, *, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 bias: bool = False, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, upcast=self.upcast)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): proj to 2*dim_out, gate one half with GELU of the other."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU -> (dropout) -> Linear; net.1 is an identity slot so keys read net.0.proj / net.2."""

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
                                  nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention (if context_dim), feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, context_dim: int | None = None,
                 upcast: bool = False, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, upcast=upcast)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, context_dim=context_dim, heads=heads, dim_head=dim_head, upcast=upcast)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        if self.attn2 is not None:
            x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """LDM's spatial transformer: GroupNorm, project in, `depth` transformer blocks, project out, + input.

    SD 1.x projects with 1x1 convolutions, SD 2.x with linear layers (`use_linear`).
    x: (B, C, H, W), context: (B, M, context_dim) -> (B, C, H, W)
    """

    def __init__(self, channels: int, heads: int, dim_head: int, *, depth: int = 1, context_dim: int | None = None,
                 use_linear: bool = False, groups: int = 32, upcast: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim=context_dim, upcast=upcast, dropout=dropout)
            for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, c))
        else:
            x = self.proj_in(x)
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, x.shape[1])
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            # contiguous: a permuted (channels-last) tensor makes every later conv copy its weights
            x = self.proj_out(x).reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        else:
            x = self.proj_out(x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous())
        return x + residual


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over pixels, with GroupNorm and a residual (the autoencoder's mid block).

    x: (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, channels: int, *, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        out = attention(self.to_q(t), self.to_k(t), self.to_v(t), 1)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return out + x
