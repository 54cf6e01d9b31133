"""Tiled and sliced first-stage calls: encode and decode images larger than memory allows in one piece.

A decode of 256x256 latents (2048 px) with the SD VAE holds activations of 128 channels at 2048x2048 and a
65536x65536 mid-block attention matrix (their sizes: benchmarks/RESULTS.md); decoded one overlapping tile at a
time, its peak is that of one tile (512 px by default) whatever the image size. The functions here work on any callable:

    tiled_decode(decode, z, tile=64, overlap=16, factor=8)   # z (B, C, h, w) -> (B, 3, 8h, 8w)
    tiled_encode(encode, x, tile=64, overlap=16, factor=8)   # x (B, 3, H, W) -> (B, 2C, H/8, W/8) moments
    sliced(fn, x)                                            # fn on one sample at a time, concatenated

Tiles lie on a grid of latent pixels (so image tiles start at multiples of f and their latents line up);
neighbouring tiles overlap by at least `overlap` latent pixels and their outputs are blended with linear
ramps across each overlap, normalised so the weights at every output pixel sum to 1 (no seams, no
brightness change). The SD VAE's mid-block attention and its GroupNorms see the whole input, so a tiled
result is close to, not equal to, the untiled one; a function that looks at each pixel alone
(a 1x1 conv, nearest upsampling) gives the untiled result up to rounding, and one tile covering the whole
input gives it exactly.

`TilingMixin` gives a first stage `enable_tiling` / `enable_slicing` and routes its encode/decode through
these functions (diffusers' names: `enable_tiling()`, `enable_slicing()`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

import torch

from ..config import is_int, is_real
from ..errors import InputError

TensorFn: TypeAlias = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TileSettings:
    """Tile size in image pixels, overlap as a fraction of the tile (diffusers: 512 px, 0.25)."""

    tile_sample_size: int = 512
    overlap: float = 0.25

    def check(self, factor: int) -> None:
        """Refuse a tile that is not a positive multiple of the first stage's factor f, or an overlap outside
        [0, 0.5] (more than half would put three tiles over one pixel for no gain)."""
        size = self.tile_sample_size
        if not is_int(size) or size < factor or size % factor:
            raise InputError("tile_sample_size must be a positive multiple of the first stage's factor",
                             where="tile_sample_size", expected=f"a multiple of {factor} (at least {factor})",
                             found=size)
        if not is_real(self.overlap) or not 0.0 <= self.overlap <= 0.5:
            raise InputError("overlap is a fraction of the tile", where="overlap", expected="0 <= overlap <= 0.5",
                             found=self.overlap)

    def in_latent_pixels(self, factor: int) -> tuple[int, int]:
        """(tile, overlap) in latent pixels for a first stage of factor f; the overlap < the tile."""
        tile = self.tile_sample_size // factor
        return tile, min(round(self.overlap * tile), tile - 1)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest tiles of length `tile` that cover [0, size) with neighbours overlapping by at
    least `overlap`, spread evenly so the first starts at 0 and the last ends at `size` (no ragged tile).
    One tile (start 0) when size <= tile."""
    if size <= tile:
        return [0]
    gaps = math.ceil((size - tile) / (tile - overlap))  # tiles - 1
    return [round(k * (size - tile) / gaps) for k in range(gaps + 1)]


def ramp_weights(starts: list[int], tile: int, scale: int, *, like: torch.Tensor) -> list[torch.Tensor]:
    """Blend weights (tile * scale,) per tile along one axis, on `like`'s device and dtype: 1 inside, a linear
    ramp across the part a neighbour overlaps (up on the left, down on the right), never 0 so every output
    pixel has weight. Where two tiles overlap, ramp up + ramp down = 1."""
    length = tile * scale
    weights = []
    for k, start in enumerate(starts):
        w = torch.ones(length, dtype=like.dtype, device=like.device)
        n = (starts[k - 1] + tile - start) * scale if k > 0 else 0  # overlap with the previous tile
        if n > 0:
            w[:n] = torch.minimum(w[:n], (torch.arange(n, dtype=like.dtype, device=like.device) + 0.5) / n)
        n = (start + tile - starts[k + 1]) * scale if k + 1 < len(starts) else 0  # ... with the next one
        if n > 0:
            w[-n:] = torch.minimum(w[-n:], (torch.arange(n, 0, -1, dtype=like.dtype, device=like.device) - 0.5) / n)
        weights.append(w)
    return weights


def tiled_map(fn: TensorFn, x: torch.Tensor, *, tile: int, overlap: int, in_scale: int = 1,
              out_scale: int = 1) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of x and blend the outputs.

    The grid is in units of which one is `in_scale` input pixels and `out_scale` output pixels (decode: 1 and
    f; encode: f and 1). x: (B, C, H, W), H and W multiples of in_scale; fn: (B, C, t*in_scale, t*in_scale)
    -> (B, C', t*out_scale, t*out_scale). tile, overlap: in units. -> (B, C', H/in_scale*out_scale, ...).
    Peak memory: one call of fn on one tile, plus the output and its 1-D weight sums.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise InputError("a tile must be at least one unit and overlap less than a tile", where="tiled_map",
                         expected="tile >= 1 and 0 <= overlap < tile", found=f"tile={tile}, overlap={overlap}")
    height, width = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows, cols = tile_starts(height, tile_h, overlap), tile_starts(width, tile_w, overlap)
    out: torch.Tensor | None = None
    row_w: list[torch.Tensor] = []
    col_w: list[torch.Tensor] = []
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            piece = fn(x[..., top * in_scale:(top + tile_h) * in_scale, left * in_scale:(left + tile_w) * in_scale])
            if out is None:  # now the output's channels, dtype and device are known
                out = piece.new_zeros((*piece.shape[:-2], height * out_scale, width * out_scale))
                row_w = ramp_weights(rows, tile_h, out_scale, like=piece)
                col_w = ramp_weights(cols, tile_w, out_scale, like=piece)
            y, x0 = top * out_scale, left * out_scale
            out[..., y:y + piece.shape[-2], x0:x0 + piece.shape[-1]].addcmul_(
                piece, row_w[i][:, None] * col_w[j][None, :])
            del piece  # free this tile's output before the next tile is computed
    assert out is not None  # for the type checker: rows and cols are never empty
    # The tiles form a grid, so sum_ij w_i(y) w_j(x) = (sum_i w_i(y)) (sum_j w_j(x)): normalise with 1-D sums.
    return out.div_(_weight_sum(rows, row_w, out_scale, tile_h, out.shape[-2])[:, None]
                    * _weight_sum(cols, col_w, out_scale, tile_w, out.shape[-1])[None, :])


def _weight_sum(starts: list[int], weights: list[torch.Tensor], scale: int, tile: int, size: int) -> torch.Tensor:
    total = weights[0].new_zeros(size)
    for start, w in zip(starts, weights, strict=True):
        total[start * scale:(start + tile) * scale] += w
    return total


def tiled_decode(decode: TensorFn, z: torch.Tensor, *, tile: int, overlap: int, factor: int) -> torch.Tensor:
    """decode (B, C, t, t) -> (B, C', t*f, t*f) on latent tiles of `tile` latent pixels, overlapping by at least
    `overlap`. z: (B, C, h, w) -> (B, C', h*f, w*f)."""
    return tiled_map(decode, z, tile=tile, overlap=overlap, in_scale=1, out_scale=factor)


def tiled_encode(encode: TensorFn, x: torch.Tensor, *, tile: int, overlap: int, factor: int) -> torch.Tensor:
    """encode (B, C, t*f, t*f) -> (B, C', t, t) on image tiles of `tile` latent pixels (tile * f image pixels),
    blended in latent space. x: (B, C, H, W), H and W multiples of f -> (B, C', H/f, W/f)."""
    return tiled_map(encode, x, tile=tile, overlap=overlap, in_scale=factor, out_scale=1)


def sliced(fn: TensorFn, x: torch.Tensor) -> torch.Tensor:
    """fn on one sample at a time, concatenated: x (B, ...) -> cat_i fn(x[i:i+1]). The peak memory of batch 1."""
    if x.shape[0] <= 1:
        return fn(x)
    return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure: torch.OutOfMemoryError (CUDA, XPU), or the RuntimeError of the CPU ("can't
    allocate memory") and MPS ("out of memory") allocators."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


class TilingMixin:
    """enable/disable tiling and slicing on a first stage (a module with `downsample_factor`).

    Subclasses route their calls through `run_encode(fn, x)` / `run_decode(fn, z)`, where fn is the plain
    encoder / decoder path on a tensor. Off by default: tiled output differs slightly from untiled (see the
    module docstring), and a batch is fastest decoded at once.
    """

    tiling: TileSettings | None = None   # class defaults, so the mixin needs no __init__
    slicing: bool = False

    if TYPE_CHECKING:  # what the mixin needs of the first stage it is mixed into (FirstStage has it)
        @property
        def downsample_factor(self) -> int: ...

    def enable_tiling(self, *, tile_sample_size: int = 512, overlap: float = 0.25) -> None:
        """Encode and decode images larger than `tile_sample_size` pixels (a multiple of f) in overlapping tiles
        of that size, `overlap` (a fraction, 0 to 0.5) of a tile shared with each neighbour and blended."""
        settings = TileSettings(tile_sample_size=tile_sample_size, overlap=overlap)
        settings.check(self.downsample_factor)
        self.tiling = settings

    def disable_tiling(self) -> None:
        self.tiling = None

    def enable_slicing(self) -> None:
        """Encode and decode a batch one sample at a time: the same outputs, the peak memory of batch 1."""
        self.slicing = True

    def disable_slicing(self) -> None:
        self.slicing = False

    def run_decode(self, decode: TensorFn, z: torch.Tensor) -> torch.Tensor:
        """decode(z) for z (B, C, h, w), tiled when tiling is on and z is larger than a tile, sliced when on."""
        return self._run(decode, z, tiled_decode, unit=1)

    def run_encode(self, encode: TensorFn, x: torch.Tensor) -> torch.Tensor:
        """encode(x) for x (B, C, H, W), tiled when tiling is on and x is larger than a tile, sliced when on."""
        return self._run(encode, x, tiled_encode, unit=self.downsample_factor)

    def _run(self, fn: TensorFn, x: torch.Tensor, tiled: Callable[..., torch.Tensor], *, unit: int) -> torch.Tensor:
        settings = self.tiling
        if settings is not None:
            factor = self.downsample_factor
            tile, overlap = settings.in_latent_pixels(factor)
            if max(x.shape[-2:]) > tile * unit:  # only when one tile does not cover x: otherwise the plain call
                fn = _bind(tiled, fn, tile=tile, overlap=overlap, factor=factor)
        return sliced(fn, x) if self.slicing else fn(x)


def _bind(tiled: Callable[..., torch.Tensor], fn: TensorFn, **options: int) -> TensorFn:
    return lambda x: tiled(fn, x, **options)
