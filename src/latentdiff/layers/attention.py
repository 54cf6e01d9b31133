"""Attention layers, all through torch.nn.functional.scaled_dot_product_attention.

Parameter names follow the diffusers layout (to_q, to_k, to_v, to_out.0; ff.net.0.proj, ff.net.2;
proj_in, transformer_blocks.N, proj_out) so checkpoints in that layout load without a key map.

Attention slicing: a kernel that materialises the (B, heads, N, M) score matrix (SDPA's math path: fp32 on
GPUs without a fused kernel, old GPUs, upcast attention) needs B h N M floats at once (gigabytes for one SD
self-attention at 1024 px: benchmarks/RESULTS.md). Each query row attends independently of the others, so SDPA
over chunks of the query rows, concatenated, is the same attention with a score buffer of B h chunk M.
`set_attention_chunking` turns it on for every attention layer of a model: a fixed `chunk_size`, or a `max_bytes`
budget that chunks only a call whose scores would exceed it, with the largest chunk that fits.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..config import is_int
from ..errors import InputError
from .fused import add_output
from .token_merging import Matching, TokenMerging


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, upcast: bool = False,
              chunk_size: int | None = None, max_bytes: int | None = None) -> torch.Tensor:
    """Multi-head attention. q: (B, N, h*d), k/v: (B, M, h*d) -> (B, N, h*d).

    chunk_size: SDPA over that many query rows at a time; max_bytes: the largest chunk whose scores
    (B, h, chunk, M) fit the budget, only when all N rows would not (see the module docstring).
    """
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    dtype = q.dtype
    upcast = upcast and dtype in (torch.float16, torch.bfloat16)
    if upcast:  # SD 2.1 needs fp32 attention scores: in fp16 they overflow.
        q, k, v = q.float(), k.float(), v.float()
    chunk = query_chunk(b * heads, n, k.shape[2], q.element_size(), chunk_size=chunk_size, max_bytes=max_bytes)
    if chunk >= n:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v) for i in range(0, n, chunk)],
                        dim=2)
    if upcast:  # only then: a same-dtype .to() returns its input, but costs an op per call all the same
        out = out.to(dtype)
    return out.transpose(1, 2).reshape(b, n, inner)


def query_chunk(rows: int, n: int, m: int, itemsize: int, *, chunk_size: int | None,
                max_bytes: int | None) -> int:
    """Query rows per SDPA call for `rows` = B * heads score matrices of N x M: chunk_size, else the most whose
    scores fit max_bytes (at least 1), else all N. Python ints only: no device work, static under torch.compile."""
    if chunk_size is not None:
        return chunk_size
    if max_bytes is not None and rows * n * m * itemsize > max_bytes:
        return max(1, max_bytes // (rows * m * itemsize))
    return n


def set_attention_chunking(model: nn.Module, *, chunk_size: int | None = None, max_bytes: int | None = None) -> int:
    """Chunk the queries of every attention layer of `model` (Attention, SpatialSelfAttention); both None:
    unchunked again. chunk_size: query rows per SDPA call; max_bytes: score budget per call. -> layers set."""
    for name, value in (("chunk_size", chunk_size), ("max_bytes", max_bytes)):
        if value is not None and (not is_int(value) or value < 1):
            raise InputError(f"{name} must be a positive integer or None", where=name, expected="int >= 1 or None",
                             found=repr(value))
    layers = [m for m in model.modules() if isinstance(m, (Attention, SpatialSelfAttention))]
    for layer in layers:
        layer.chunk_size, layer.max_bytes = chunk_size, max_bytes
    return len(layers)


class ExtraTokens(Protocol):
    """Attention over tokens a caller appended to the context (IP-Adapter's image tokens, Ye et al. 2023): the
    layer splits the last `count()` tokens off its context (0: none this call), attends over the rest as usual, and
    adds what this returns to the attention output before `to_out`. Installed in `Attention.extra` (a tuple, not a
    submodule: the UNet's state dict and saved files stay the base model's)."""

    def count(self) -> int: ...

    def __call__(self, q: torch.Tensor, tokens: torch.Tensor, layer: Attention) -> torch.Tensor:
        """q: (B, N, h*d) the layer's queries, tokens: (B, count, context_dim) -> (B, N, h*d)."""
        ...


class Attention(nn.Module):
    """Self-attention (context=None) or cross-attention over a context sequence.

    x: (B, N, query_dim), context: (B, M, context_dim) -> (B, N, query_dim)
    """

    def __init__(self, query_dim: int, *, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 bias: bool = False, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.upcast = heads, upcast
        self.chunk_size: int | None = None   # attention slicing (set_attention_chunking): off by default
        self.max_bytes: int | None = None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        self.extra: tuple[ExtraTokens, ...] = ()   # attention over appended context tokens (`ExtraTokens`)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual: added to the output (fused into the output projection where it is packed: layers.fused)."""
        counts = [e.count() for e in self.extra] if context is not None else []
        pieces: list[torch.Tensor] = []
        if any(counts) and context is not None:
            total = sum(counts)
            context, appended = context[:, : context.shape[1] - total], context[:, context.shape[1] - total:]
            pieces = list(appended.split(counts, dim=1))
        context = x if context is None else context
        q = self.to_q(x)
        out = attention(q, self.to_k(context), self.to_v(context), self.heads, upcast=self.upcast,
                        chunk_size=self.chunk_size, max_bytes=self.max_bytes)
        for extra, tokens in zip(self.extra, pieces, strict=True) if pieces else ():
            if tokens.shape[1]:
                out = out + extra(q, tokens, self)
        return self.to_out[0](out) if residual is None else add_output(self.to_out[0], out, residual)


# Inference on the CPU (where activations count in the process's RSS): the feed-forward runs over chunks of
# tokens whose GEGLU projection is at most this size. Not on GPUs: there, whole GEMMs and fewer launches win.
FEED_FORWARD_CHUNK_BYTES = 16 * 2**20


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

    def forward(self, x: torch.Tensor, *, residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual: added to the output (fused into the last projection where it is packed: layers.fused)."""
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            geglu = cast(GEGLU, self.net[0])  # net is built in __init__: [GEGLU, Dropout | Identity, Linear]
            step = max(1, FEED_FORWARD_CHUNK_BYTES // (geglu.proj.out_features * x.element_size()))
            if x.shape[:-1].numel() > step:
                return self._chunked(x, step, residual)
        x = self.net[0](x)
        if self.training and isinstance(self.net[1], nn.Dropout):  # in eval mode dropout is a no-op call
            x = self.net[1](x)
        return self.net[2](x) if residual is None else add_output(self.net[2], x, residual)

    def _chunked(self, x: torch.Tensor, step: int, residual: torch.Tensor | None) -> torch.Tensor:
        """Inference over `step` tokens at a time: the GEGLU's (tokens, 2 x inner) projection, 8x the block's
        width, never exists whole (the transients this saves: benchmarks/RESULTS.md). Each row's result is the
        same computation (the reduction over features is unchanged); only GEMM blocking differs."""
        geglu, out = self.net[0], cast(nn.Linear, self.net[2])
        flat = x.reshape(-1, x.shape[-1])
        skip = residual.reshape(-1, out.out_features) if residual is not None else None
        result = flat.new_empty(flat.shape[0], out.out_features)
        for start in range(0, flat.shape[0], step):
            rows = geglu(flat[start:start + step])
            result[start:start + step] = (out(rows) if skip is None
                                          else add_output(out, rows, skip[start:start + step]))
        return result.view(*x.shape[:-1], out.out_features)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention (if context_dim), feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, context_dim: int | None = None,
                 upcast: bool = False, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, upcast=upcast)
        self.norm2: nn.LayerNorm | None = None  # None, both, without cross-attention
        self.attn2: Attention | None = None
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, context_dim=context_dim, heads=heads, dim_head=dim_head, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)
        self.token_merging: TokenMerging | None = None   # ToMe (`layers.token_merging`): off by default
        self.token_merging_picks: torch.Tensor | None = None   # this call's random cells, drawn ahead (or None)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, N, dim); size: the (h, w) grid of the N tokens, which token merging needs (without it, or
        without `token_merging`, no merging)."""
        tome = self.token_merging
        matching = tome.matching(x, size, picks=self.token_merging_picks) \
            if tome is not None and size is not None else None
        if matching is None:   # each sum fused into its layer's output projection where packed (layers.fused)
            x = self.attn1(self.norm1(x), residual=x)
            if self.attn2 is not None and self.norm2 is not None:
                x = self.attn2(self.norm2(x), context, residual=x)
            return self.ff(self.norm3(x), residual=x)
        assert tome is not None
        x = _merged(self.attn1, self.norm1(x), matching, tome.merge_attn) + x
        if self.attn2 is not None and self.norm2 is not None:
            x = _merged(functools.partial(self.attn2, context=context), self.norm2(x), matching,
                        tome.merge_crossattn) + x
        return _merged(self.ff, self.norm3(x), matching, tome.merge_mlp) + x


def _merged(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, matching: Matching,
            merge: bool) -> torch.Tensor:
    """layer(x), over the merged tokens when `merge` (merged before, unmerged after: `layers.token_merging`)."""
    return matching.unmerge(layer(matching.merge(x))) if merge else layer(x)


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
            x = block(x, context, size=(h, w))
        # contiguous in the input's layout: a permuted tensor makes every later conv copy its weights, and a
        # channels-last input (layers.prepacked's convolutions keep it) stays channels-last without a copy
        layout = _memory_format(residual)
        if self.use_linear:
            x = self.proj_out(x).reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=layout)
            return x + residual
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        return add_output(self.proj_out, x, residual)   # proj_out(x) + residual, one pass where packed


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a (B, C, H, W) tensor laid out channels-last (and not also plainly contiguous)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over pixels, with GroupNorm and a residual (the autoencoder's mid block).

    x: (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, channels: int, *, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.chunk_size: int | None = None   # attention slicing (set_attention_chunking): off by default
        self.max_bytes: int | None = None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        out = attention(self.to_q(t), self.to_k(t), self.to_v(t), 1, chunk_size=self.chunk_size,
                        max_bytes=self.max_bytes)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return out + x
