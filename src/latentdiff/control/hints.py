"""Hints computed from an image without model weights: Canny edges and binary masks, as white-on-black RGB
images (ControlNet's hint layout: three identical channels, 255 where the feature is).

`canny` is OpenCV's `cv2.Canny` re-done in numpy, pixel for pixel (tests/control compare it with cv2 itself), so
that hints match those ControlNets were trained on without making OpenCV a dependency:

1. 3x3 Sobel derivatives dx, dy on the uint8 image, the border replicated (no Gaussian blur: cv2.Canny has none);
2. magnitude |dx| + |dy| (OpenCV's default, L2gradient=False) or dx^2 + dy^2 against squared thresholds;
3. non-maximum suppression in 4 directions, the sector chosen in OpenCV's fixed point (tan 22.5 deg in Q15), with
   OpenCV's tie rules (strictly greater than the left/up neighbour, at least the right/down one; strictly greater
   than both along a diagonal); outside the image the magnitude is 0;
4. double threshold (magnitude > low is a candidate, > high a seed, both strict) and hysteresis: every candidate
   8-connected to a seed is an edge.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError
from ..utils.images import check_image_pixels

TG22_Q15 = int(0.4142135623730950488 * (1 << 15) + 0.5)    # tan(22.5 deg) in OpenCV's Q15 fixed point
GRAY_Q15 = (9798, 19235, 3735)                              # OpenCV's RGB2GRAY weights 0.299, 0.587, 0.114 in Q15


def to_array(image: Any, *, name: str = "image") -> np.ndarray:
    """A PIL image, a path, or a uint8 array (H, W) / (H, W, 3) as a uint8 array (H, W, 3), RGB."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            check_image_pixels(opened.size, where=str(image))
            image = opened.convert("RGB")
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image) if isinstance(image, np.ndarray) else None
    if array is None or array.dtype != np.uint8 or not (
            array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3))):
        found = f"{array.dtype} array of shape {array.shape}" if array is not None else type(image).__name__
        raise InputError("a hint's source image must be a PIL image, a path or a uint8 array", where=name,
                         expected="PIL.Image, str / PathLike, or numpy uint8 of shape (H, W), (H, W, 1), (H, W, 3)",
                         found=found)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def gray(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's COLOR_RGB2GRAY on uint8: (9798 R + 19235 G + 3735 B + 2^14) >> 15, bit for bit (its uint8 path
    rounds in Q15, not the Q14 of older releases' documentation: checked on all 2^24 colours against cv2 4.14)."""
    r, g, b = (rgb[..., i].astype(np.int32) * w for i, w in enumerate(GRAY_Q15))
    return ((r + g + b + (1 << 14)) >> 15).astype(np.uint8)


def _rgb(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat((mask * np.uint8(255))[:, :, None], 3, axis=2), "RGB")


def _sobel(channels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel dx, dy (int32) of (H, W, C) uint8, the border replicated as cv2.Canny does."""
    p = np.pad(channels.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    smooth_rows = p[:-2] + 2 * p[1:-1] + p[2:]                  # [1 2 1] down the columns
    smooth_cols = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]         # [1 2 1] along the rows
    dx = smooth_rows[:, 2:] - smooth_rows[:, :-2]
    dy = smooth_cols[2:] - smooth_cols[:-2]
    return dx, dy


def _suppressed(mag: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Where the magnitude is a local maximum across the edge (OpenCV's sectors and tie rules)."""
    m = np.pad(mag, 1)                                          # 0 outside the image, as OpenCV's buffers are
    centre = m[1:-1, 1:-1]
    left, right, up, down = m[1:-1, :-2], m[1:-1, 2:], m[:-2, 1:-1], m[2:, 1:-1]
    up_left, up_right, down_left, down_right = m[:-2, :-2], m[:-2, 2:], m[2:, :-2], m[2:, 2:]
    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << 15
    tg22x = x * TG22_Q15
    tg67x = tg22x + (x << 16)
    horizontal = y < tg22x                                      # gradient along x: compare left and right
    vertical = ~horizontal & (y > tg67x)
    same_sign = (dx ^ dy) >= 0                                  # the gradient points down-right or up-left
    diagonal = np.where(same_sign, (centre > up_left) & (centre > down_right),
                        (centre > up_right) & (centre > down_left))
    return np.where(horizontal, (centre > left) & (centre >= right),
                    np.where(vertical, (centre > up) & (centre >= down), diagonal))


def _connected_to(candidates: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The candidates 8-connected (through candidates) to a seed: components by vectorised union-find."""
    height, width = candidates.shape
    index = np.arange(height * width).reshape(height, width)
    pairs = []
    whole, head, tail = slice(None), slice(None, -1), slice(1, None)
    for a, b in (((whole, head), (whole, tail)), ((head, whole), (tail, whole)),       # right, down
                 ((head, head), (tail, tail)), ((head, tail), (tail, head))):         # down-right, down-left
        both = candidates[a] & candidates[b]
        pairs.append((index[a][both], index[b][both]))
    first = np.concatenate([p[0] for p in pairs])
    second = np.concatenate([p[1] for p in pairs])
    parent = np.arange(height * width)
    while True:
        root_a, root_b = parent[first], parent[second]
        differ = root_a != root_b
        if not differ.any():
            break
        low, high = np.minimum(root_a[differ], root_b[differ]), np.maximum(root_a[differ], root_b[differ])
        np.minimum.at(parent, high, low)                        # hook each root under the smallest root it meets
        while True:                                             # then point every pixel straight at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    seeded = np.zeros(height * width, dtype=bool)
    seeded[parent[seeds.ravel()]] = True
    return candidates & seeded[parent].reshape(height, width)


def canny(image: Any, *, low: float = 100, high: float = 200, l2_gradient: bool = False,
          grayscale: bool = True) -> Image.Image:
    """Canny edges as a white-on-black RGB hint, equal to `cv2.Canny(gray, low, high, L2gradient=l2_gradient)`
    with `gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)`. `grayscale=False` is cv2.Canny on the RGB array itself
    (as lllyasviel's ControlNet annotator calls it): per pixel the channel of the largest magnitude gives the
    gradient. Thresholds are swapped if low > high, as OpenCV does."""
    rgb = to_array(image)
    if low > high:
        low, high = high, low
    channels = gray(rgb)[:, :, None] if grayscale else rgb
    dx, dy = _sobel(channels)
    if l2_gradient:
        norms = dx * dx + dy * dy
        low, high = (min(32767.0, t) for t in (low, high))
        low, high = (t * t if t > 0 else t for t in (low, high))
    else:
        norms = np.abs(dx) + np.abs(dy)
    pick = np.argmax(norms, axis=2)[:, :, None]                 # the first channel of the largest magnitude
    mag, dx, dy = (np.take_along_axis(a, pick, axis=2)[:, :, 0] for a in (norms, dx, dy))
    lo, hi = int(np.floor(low)), int(np.floor(high))
    candidates = (mag > lo) & _suppressed(mag, dx, dy)
    return _rgb(_connected_to(candidates, candidates & (mag > hi)))


def threshold(image: Any, *, level: int = 128, invert: bool = False) -> Image.Image:
    """A binary hint (scribble, silhouette mask): white where the image's gray value (OpenCV's / ITU-R 601
    weights) is at least `level`, black elsewhere; `invert=True` for dark strokes on a light page."""
    if not 0 <= level <= 256:
        raise InputError("a threshold level is a gray value", where="threshold(level=)", expected="0 ... 256",
                         found=level)
    mask = gray(to_array(image)) >= level
    return _rgb(mask != invert)
