"""A deterministic checker of a 64x64 shapes image against its caption (the built-in model's quality test).

`analyze(image)` measures what the image shows, `check(image, caption)` compares that with the caption,
`score(images, captions)` gives the accuracy of each attribute. The steps (details in docs/shapes.md):

1. background: the per-channel median of the one-pixel border (shapes never reach it) -> nearest palette entry.
2. foreground: pixels farther than ROUGH_THRESHOLD from the measured background (RGB Euclidean); the largest
   8-connected component; its color is the per-channel median of its farthest quarter (the interior, not
   the anti-aliased rim) -> nearest palette entry. Fewer than MIN_AREA pixels: no shape found.
3. refined mask: each pixel's coverage t = its projection on the background -> shape-color axis (0 at the
   background, 1 at the median color of the component's farther half), so noise across the axis does not
   count and blur moves the rim symmetrically; mask = t >= 0.5, the largest component, holes filled.
   The soft coverage (t clipped to [0, 1] on the mask and a RIM-pixel band around it) gives area and centroid.
4. shape: two robust features of the coverage (`shape_features`): the fill ratio of its bounding box, taken
   from the row and column projections (square 1, circle pi/4, triangle 1/2), and its skewness (a triangle
   is lopsided, a circle or square is not); `classify_shape` thresholds them halfway between ideal values.
5. position: `shapes.where_of` of the centroid, the very rule that defines the data set's regions.

Nearest palette entries are by Euclidean RGB distance. Everything is numpy on one image: no randomness,
no learned parts, the same answer on every machine.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..errors import InputError, describe
from .shapes import IMAGE_SIZE, PALETTE, Attributes, parse_caption, where_of

ROUGH_THRESHOLD = 50.0   # RGB distance from the background; the closest palette pair (green/black) is 150 apart
MIN_AREA = 12            # pixels; the smallest rendered shape (a triangle of side 12) covers ~62
RIM = 2                  # pixels around the mask whose partial coverage counts (anti-aliasing, blur)
TRIANGLE_SKEWNESS = 0.2  # symmetric shapes measure < 0.09 even blurred; an apex-up triangle 0.566 (> 0.4 blurred)
TRIANGLE_FILL = 0.643    # halfway between a triangle's fill ratio (1/2) and a circle's (pi/4)
SQUARE_FILL = 0.893      # halfway between a circle's fill ratio (pi/4) and a square's (1)
PALETTE_NAMES = tuple(PALETTE)
PALETTE_RGB = np.array([PALETTE[name] for name in PALETTE_NAMES], dtype=np.float64)
ATTRIBUTES = ("color", "background", "shape", "position")


@dataclasses.dataclass(frozen=True)
class Findings:
    """What an image shows. color, shape, where and centroid are None when no shape was found.

    centroid: (x, y) of the soft coverage, continuous pixel coordinates (image center (32, 32)); area: the
    summed coverage in pixels; fill_ratio, skewness: see `shape_features`.
    """

    background: str
    color: str | None
    shape: str | None
    where: str | None
    centroid: tuple[float, float] | None = None
    area: float = 0.0
    fill_ratio: float = 0.0
    skewness: float = 0.0
    # (64, 64) bool: the refined mask of step 3 (None when no shape was found); what a silhouette ControlNet is
    # judged by (`shapes_silhouette.mask_iou`). Not compared: findings are equal when their measurements are.
    mask: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One image against one caption: a bool per attribute (True: the image shows what the caption says)."""

    expected: Attributes
    found: Findings
    color: bool
    background: bool
    shape: bool
    position: bool

    @property
    def all(self) -> bool:
        return self.color and self.background and self.shape and self.position


# ---- image -> findings -----------------------------------------------------------------------------------
def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(64, 64, 3) float64 in [0, 255] from a PIL image or a uint8 (64, 64, 3) array."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        array = image
    else:
        raise InputError("the checker takes an RGB image", where="image",
                         expected="a PIL image or a uint8 (H, W, 3) array", found=describe(image))
    if array.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        raise InputError("the checker measures 64x64 images", where="image",
                         expected=f"{IMAGE_SIZE}x{IMAGE_SIZE}", found=f"{array.shape[1]}x{array.shape[0]}")
    return array.astype(np.float64)


def nearest_color(rgb: np.ndarray) -> str:
    """The palette name nearest to an RGB triple (Euclidean)."""
    return PALETTE_NAMES[int(np.argmin(((PALETTE_RGB - rgb) ** 2).sum(axis=1)))]


NEIGHBOURS_4 = ((-1, 0), (1, 0), (0, -1), (0, 1))
NEIGHBOURS_8 = NEIGHBOURS_4 + ((-1, -1), (-1, 1), (1, -1), (1, 1))


def component_labels(mask: np.ndarray, *, diagonal: bool) -> np.ndarray:
    """(H, W) int64: each mask pixel labelled with the smallest flat index of its 4- or 8-connected
    component, mask.size elsewhere. Min-label propagation with pointer jumping: no per-component loop, so a
    speckled image costs no more than a clean one."""
    h, w = mask.shape
    outside = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(h, w), outside)
    padded = np.full((h + 2, w + 2), outside, dtype=labels.dtype)
    while True:
        padded[1:-1, 1:-1] = labels
        smallest = labels.copy()
        for dy, dx in NEIGHBOURS_8 if diagonal else NEIGHBOURS_4:
            np.minimum(smallest, padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w], out=smallest)
        smallest[~mask] = outside
        # a label is a pixel of the same component: take that pixel's label too (halves the path each pass)
        flat = np.append(smallest.ravel(), outside)
        smallest = np.minimum(smallest, flat[smallest])
        if np.array_equal(smallest, labels):
            return labels
        labels = smallest


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (the first in raster order on a tie)."""
    if not mask.any():
        return mask.copy()
    labels = component_labels(mask, diagonal=True)
    sizes = np.bincount(labels[mask], minlength=mask.size)
    return labels == int(np.argmax(sizes))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every pixel the border cannot reach (4-connected) without crossing it."""
    labels = component_labels(~mask, diagonal=False)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return ~np.isin(labels, border[border < mask.size])


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """The mask grown by `steps` pixels (8-connected, i.e. a (2 steps + 1)^2 square)."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=bool)
    for _ in range(steps):
        padded[1:-1, 1:-1] = mask
        grown = mask.copy()
        for dy, dx in NEIGHBOURS_8:
            grown |= padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        mask = grown
    return mask


def shape_features(weight: np.ndarray) -> tuple[float, float]:
    """(fill_ratio, skewness) of a coverage map (H, W) >= 0.

    fill_ratio: area / (tallest column x widest row), the bounding box's fill measured on the projections, so a
    stray pixel cannot stretch the box and blur (which keeps a straight edge's plateau) barely moves it:
    square 1, circle pi/4, apex-up triangle 1/2. skewness: the larger |third standardized moment| of the x and
    y marginals: 0 for any mirror-symmetric shape, 2 sqrt(2) / 5 = 0.566 for a triangle along its axis.
    """
    area = float(weight.sum())
    columns, rows = weight.sum(axis=0), weight.sum(axis=1)
    centers = np.arange(weight.shape[0]) + 0.5
    skews = []
    for marginal in (columns, rows):
        offset = centers - marginal @ centers / area
        variance = marginal @ offset ** 2 / area
        skews.append(abs(float(marginal @ offset ** 3 / area / variance ** 1.5)) if variance > 0 else 0.0)
    return area / float(columns.max() * rows.max()), max(skews)


def classify_shape(fill_ratio: float, skewness: float) -> str:
    """Triangle when the shape is lopsided or fills half its box; else square or circle by the fill ratio
    (thresholds halfway between the ideal values; see docs/shapes.md for the measured spreads)."""
    if skewness >= TRIANGLE_SKEWNESS or fill_ratio < TRIANGLE_FILL:
        return "triangle"
    return "square" if fill_ratio >= SQUARE_FILL else "circle"


def analyze(image: Image.Image | np.ndarray) -> Findings:
    """Measure background, shape color, shape class and region of one 64x64 image."""
    pixels = _as_array(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    background = nearest_color(background_rgb)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    rough = largest_component(distance > ROUGH_THRESHOLD)
    if rough.sum() < MIN_AREA:
        return Findings(background, None, None, None)
    # the color's name from the farthest quarter (a small blurred shape may have no pure pixel), the coverage
    # axis from the farther half (noise would push the farthest pixels beyond the true color and shrink t)
    far_quarter, far_half = np.percentile(distance[rough], [75, 50])
    color = nearest_color(np.median(pixels[rough & (distance >= far_quarter)], axis=0))
    axis = np.median(pixels[rough & (distance >= far_half)], axis=0) - background_rgb
    if np.linalg.norm(axis) < ROUGH_THRESHOLD / 2:   # a mottled region with no one color: no shape to measure
        return Findings(background, color, None, None)
    t = (pixels - background_rgb) @ axis / float(axis @ axis)      # coverage estimate, (64, 64)
    mask = fill_holes(largest_component(t >= 0.5))
    if mask.sum() < MIN_AREA:
        return Findings(background, color, None, None)
    # soft coverage on the mask and its rim (where anti-aliasing and blur put partial pixels); filled holes count
    # as covered. Area and centroid from it are sub-pixel exact on clean renders and unbiased by symmetric blur.
    weight = np.clip(t, 0.0, 1.0) * dilate(mask, RIM)
    weight[mask & (t < 0.5)] = 1.0
    area = float(weight.sum())
    centers = np.arange(IMAGE_SIZE) + 0.5
    centroid = (float(weight.sum(axis=0) @ centers / area), float(weight.sum(axis=1) @ centers / area))
    fill_ratio, skewness = shape_features(weight)
    return Findings(background=background, color=color,
                    shape=classify_shape(fill_ratio, skewness), where=where_of(centroid), centroid=centroid,
                    area=area, fill_ratio=fill_ratio, skewness=skewness, mask=mask)


# ---- findings -> verdicts ----------------------------------------------------------------------------------
def compare(found: Findings, expected: Attributes) -> CheckResult:
    """The verdicts of `found` against a caption's attributes (to test one image against many captions)."""
    return CheckResult(expected=expected, found=found, color=found.color == expected.color,
                       background=found.background == expected.background, shape=found.shape == expected.shape,
                       position=found.where == expected.where)


def check(image: Image.Image | np.ndarray, caption: str) -> CheckResult:
    """Does `image` show what `caption` says? The caption is parsed first (InputError outside the grammar)."""
    expected = parse_caption(caption)
    return compare(analyze(image), expected)


def score(images: Sequence[Image.Image | np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """Accuracy in [0, 1] of each attribute over image/caption pairs: {"color", "background", "shape",
    "position", "all", "count"} ("all": every attribute right; "count": the number of pairs)."""
    if len(images) != len(captions):
        raise InputError("one caption per image", where="score", expected=f"{len(images)} captions",
                         found=len(captions))
    if not images:
        raise InputError("nothing to score", where="score", expected="at least one image", found=0)
    expected = [parse_caption(text) for text in captions]       # every caption checked before any image
    results = [compare(analyze(image), attributes) for image, attributes in zip(images, expected, strict=True)]
    accuracy = {name: sum(getattr(r, name) for r in results) / len(results) for name in ATTRIBUTES}
    accuracy["all"] = sum(r.all for r in results) / len(results)
    accuracy["count"] = len(results)
    return accuracy
