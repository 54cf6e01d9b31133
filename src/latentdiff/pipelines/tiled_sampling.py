"""Sampling beyond the training size: MultiDiffusion (Bar-Tal et al. 2023) as a denoiser wrapper.

A UNet trained at 64 x 64 latents applied whole to a 128 x 128 latent sees a scene at a scale it never saw
(repeated objects, broken layouts). MultiDiffusion instead denoises overlapping windows of the training
size and, at every step, takes for each latent pixel the weighted average of the predictions of the windows
that cover it. That average is the closed-form solution of their fusion objective (Bar-Tal et al. 2023,
eq. 5) for per-pixel weights W_i:

    pred(x_t)[p] = sum_i W_i[p] * denoise(crop_i(x_t), t)[p] / sum_i W_i[p]

Every sampler in latentdiff steps linearly in the model's prediction (eps, v or x0) given x_t, so averaging
the predictions equals averaging each window's update, and the wrapper is just another
`denoise(x_t, t)`: it works with every sampler, with guidance inside it (each window is guided), and the
sampler never knows. The noise of stochastic samplers is drawn once for the whole latent.

Windows and overlaps are counted in latent pixels here (`LatentTiling`); pipelines take them in image
pixels and divide by the autoencoder factor f. One window covering the whole latent is plain sampling,
bit for bit. Weights: "uniform" (the paper's W_i = 1) or "linear" (default): each window's weight ramps
up across its overlap with a neighbour, so no window's border is a hard edge in the blend.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from ..config import is_int
from ..diffusion.samplers import Denoiser
from ..errors import InputError

Blend = Literal["linear", "uniform"]
BLENDS: tuple[str, ...] = ("linear", "uniform")
Size = int | tuple[int, int]


@dataclasses.dataclass(frozen=True)
class LatentTiling:
    """MultiDiffusion windows in latent pixels: (h, w) window size and (h, w) overlap between neighbours."""

    size: tuple[int, int]
    overlap: tuple[int, int]
    blend: Blend = "linear"

    def __post_init__(self) -> None:
        for side in range(2):
            if not 0 <= self.overlap[side] < self.size[side]:
                raise InputError("the tile overlap must be smaller than the tile", where="tile_overlap",
                                 expected=f"0 <= overlap < {self.size[side]} latent pixels",
                                 found=self.overlap[side])
        if self.blend not in BLENDS:
            raise InputError("unknown tile blend", where="blend", expected=list(BLENDS), found=repr(self.blend))


class Window(NamedTuple):
    """One window: rows top .. top + height - 1, columns left .. left + width - 1 of the latent."""

    top: int
    left: int
    height: int
    width: int


def window_starts(length: int, size: int, overlap: int) -> list[int]:
    """Starts of windows of `size` along a side of `length`, stride size - overlap, the last flush with the end
    (so every pixel is covered and no window leaves the latent). A side no longer than one window: [0]."""
    if size >= length:
        return [0]
    return list(range(0, length - size, size - overlap)) + [length - size]


def window_layout(height: int, width: int, tiling: LatentTiling) -> list[Window]:
    """The windows tiling an (height, width) latent, row by row; windows larger than the latent are clamped."""
    h, w = min(tiling.size[0], height), min(tiling.size[1], width)
    return [Window(top, left, h, w) for top in window_starts(height, h, tiling.overlap[0])
            for left in window_starts(width, w, tiling.overlap[1])]


def ramp(length: int, size: int, start: int, overlap: int, blend: Blend) -> torch.Tensor:
    """A window's 1-D weight along one side: 1, rising as 1/(o+1) .. o/(o+1) across the first `overlap`
    pixels when a window precedes it, falling likewise at its end when one follows ("linear")."""
    weight = torch.ones(size, dtype=torch.float64)
    if blend == "uniform" or overlap == 0:
        return weight
    edge = torch.arange(1, overlap + 1, dtype=torch.float64) / (overlap + 1)
    if start > 0:
        weight[:overlap] = torch.minimum(weight[:overlap], edge)
    if start + size < length:
        weight[-overlap:] = torch.minimum(weight[-overlap:], edge.flip(0))
    return weight


def blend_weights(height: int, width: int, tiling: LatentTiling) -> tuple[list[Window], list[torch.Tensor]]:
    """-> (windows, each window's weight (h, w) divided by the sum over windows at each pixel). float64, CPU;
    the normalised weights of the windows covering a pixel sum to 1."""
    windows = window_layout(height, width, tiling)
    overlap = [min(o, s - 1) for o, s in zip(tiling.overlap, (windows[0].height, windows[0].width), strict=True)]
    raw = [torch.outer(ramp(height, win.height, win.top, overlap[0], tiling.blend),
                       ramp(width, win.width, win.left, overlap[1], tiling.blend)) for win in windows]
    total = torch.zeros(height, width, dtype=torch.float64)
    for win, weight in zip(windows, raw, strict=True):
        total[win.top:win.top + win.height, win.left:win.left + win.width] += weight
    return windows, [weight / total[win.top:win.top + win.height, win.left:win.left + win.width]
                     for win, weight in zip(windows, raw, strict=True)]


def tiled_denoiser(denoise: Denoiser, tiling: LatentTiling, *,
                   on_window: Callable[[tuple[slice, slice] | None], None] | None = None) -> Denoiser:
    """Wrap `denoise(x_t, t)` into MultiDiffusion over the windows of `tiling`: x_t (B, C, H, W) -> the
    blended prediction (B, C', H, W). Windows run one after another (memory of one window's forward); the
    weights are built once per latent size, device and dtype, and the blend accumulates in float32 at least.
    on_window(rows, cols) is told each window before its call, and None after the last (control hints cropped
    per window: `control.Controlled.on_window`)."""
    cache: dict[tuple, tuple[list[Window], list[torch.Tensor]]] = {}

    def denoise_tiled(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        height, width = x_t.shape[-2:]
        acc_dtype = torch.promote_types(x_t.dtype, torch.float32)
        key = (height, width, x_t.device, acc_dtype)
        if key not in cache:
            windows, weights = blend_weights(height, width, tiling)
            cache[key] = windows, [w.to(device=x_t.device, dtype=acc_dtype) for w in weights]
        windows, weights = cache[key]
        out = None
        for win, weight in zip(windows, weights, strict=True):
            rows, cols = slice(win.top, win.top + win.height), slice(win.left, win.left + win.width)
            if on_window is not None:
                on_window((rows, cols))
            pred = denoise(x_t[..., rows, cols], t)
            if out is None:
                out = torch.zeros((*pred.shape[:-2], height, width), dtype=acc_dtype, device=pred.device)
            out[..., rows, cols] += pred.to(acc_dtype) * weight
        assert out is not None  # window_layout gives at least one window
        if on_window is not None:
            on_window(None)
        return out.to(pred.dtype)

    return denoise_tiled


# ---- pixel-space settings as pipelines take them ----------------------------------------------------------
def _pair(value: Size, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else value   # a bool: refused by is_int below
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(is_int(v) for v in pair)):
        raise InputError(f"{name} must be an int or a (height, width) pair of ints", where=name,
                         expected="int | (int, int)", found=repr(value))
    return int(pair[0]), int(pair[1])


def latent_tiling(tile_size: Size, tile_overlap: Size | None, *, factor: int, blend: Blend = "linear") -> LatentTiling:
    """Pixel tile size and overlap (multiples of the autoencoder factor f) -> LatentTiling in latent pixels.
    tile_overlap None: half the tile (rounded down to a multiple of f)."""
    size = _pair(tile_size, "tile_size")
    if any(s <= 0 or s % factor for s in size):
        raise InputError(f"tile_size must be positive multiples of the autoencoder factor {factor}",
                         where="tile_size", expected=f"multiples of {factor} (pixels)", found=size)
    overlap = tuple(s // 2 // factor * factor for s in size) if tile_overlap is None \
        else _pair(tile_overlap, "tile_overlap")
    if any(o < 0 or o % factor for o in overlap):
        raise InputError(f"tile_overlap must be non-negative multiples of the autoencoder factor {factor}",
                         where="tile_overlap", expected=f"multiples of {factor} (pixels)", found=overlap)
    return LatentTiling(size=(size[0] // factor, size[1] // factor),
                        overlap=(overlap[0] // factor, overlap[1] // factor), blend=blend)


UPSCALE_MODES: tuple[str, ...] = ("latent", "image")


def upscale_latents(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """z (B, C, h, w) -> (B, C, H, W) by bicubic interpolation (in float32; returned in z's dtype)."""
    return F.interpolate(z.float(), size=size, mode="bicubic", align_corners=False).to(z.dtype)


def check_upscale(upscale: str) -> None:
    if upscale not in UPSCALE_MODES:
        raise InputError("unknown upscale mode", where="upscale", expected=list(UPSCALE_MODES), found=repr(upscale))
