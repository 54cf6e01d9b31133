"""The silhouette control image of a shapes item, and how well a generated image lands on it.

    silhouette(spec)                  # 64x64 RGB: the shape white on black, from the generator's geometry
    write_imagefolder(folder, n, conditioning=silhouette)   # training data for `latentdiff train controlnet`

A silhouette ControlNet (`latentdiff/shapes-64-silhouette`) is told *where* the shape is and what outline it
has; the prompt still says its color and the background. It is judged by the shapes checker's mask of the
generated image (`shapes_checker.analyze(image).mask`) against the silhouette: their intersection over union.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .shapes import ShapeSpec, coverage

COVERED = 0.5   # a pixel belongs to the silhouette when at least half of it is covered (as the checker's t >= 0.5)


def silhouette_mask(spec: ShapeSpec) -> np.ndarray:
    """(64, 64) bool: the pixels the shape covers at least half of (the exact supersampled coverage)."""
    return coverage(spec.shape, spec.size, spec.center) >= COVERED


def silhouette(spec: ShapeSpec) -> Image.Image:
    """The control image: the shape's mask white (255) on black (0), in all 3 channels."""
    mask = silhouette_mask(spec).astype(np.uint8) * 255
    return Image.fromarray(np.repeat(mask[..., None], 3, axis=2), mode="RGB")


def mask_iou(found: np.ndarray | None, expected: np.ndarray) -> float:
    """|found & expected| / |found | expected| of two (H, W) bool masks; no mask found scores 0."""
    if found is None:
        return 0.0
    union = int(np.logical_or(found, expected).sum())
    return float(np.logical_and(found, expected).sum()) / union if union else 1.0
