"""The silhouette control image of a shapes item, and how well a generated image lands on it.

    silhouette(spec)                  # 64x64 RGB: the shape white on black, from the generator's geometry
    write_imagefolder(folder, n, conditioning=silhouette)   # training data for `latentdiff train controlnet`

A silhouette ControlNet (`latentdiff/shapes-64-silhouette`) is told *where* the shape is and what outline it
has; the prompt still says its color and the background. It is judged by the shapes checker's mask of the
generated image (`shapes_checker.analyze(image).mask`) against the silhouette: their intersection over union.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .shapes import ShapeSpec, caption, coverage, sample_spec
from .shapes_checker import score
from .shapes_eval import REPORT_SEED, _call_settings, held_out_prompts

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


def held_out_specs(count: int, prompt_seed: int = REPORT_SEED) -> list[ShapeSpec]:
    """The geometry behind `shapes_eval.held_out_prompts(count, prompt_seed)`: the same draws, in the same order."""
    held_out_prompts(count, prompt_seed)   # the same checks of count
    return [sample_spec(np.random.default_rng((prompt_seed, i))) for i in range(count)]


def evaluate_silhouette_controlnet(controlnet: Any = "latentdiff/shapes-64-silhouette",
                                   base: str | os.PathLike = "latentdiff/shapes-64", *, count: int = 100,
                                   seed: int = REPORT_SEED, batch_size: int = 25,
                                   conditioning_scale: float | None = 1.0, settings: dict[str, Any] | None = None,
                                   grid: str | os.PathLike | None = None, grid_count: int = 20,
                                   progress: bool = True) -> dict[str, Any]:
    """Generate `count` images from held-out captions with their silhouettes as control images, and judge them.

    Image i: the caption and silhouette of held-out spec i (`held_out_specs`), seed `seed + i`, by the base
    pipeline's call with the ControlNet (`controlnet=` / `control_image=`), at the base folder's
    `latentdiff_generate.json` settings unless `settings` replace them. conditioning_scale None: the base model
    alone, the same captions and seeds (what the ControlNet adds is the difference).
    Returns {"iou": mean IoU of the checker's mask against the silhouette, "accuracy": the checker's score
    (color, background, shape, position, all, count), "ious": per image, "settings", "seeds"}; grid: a PNG of
    the first `grid_count` (silhouette, image) pairs, five pairs a row."""
    import torch

    from .. import hub
    from ..builtin import generate_settings
    from ..models.controlnet import ControlNet
    from ..pipelines.latent_diffusion import LatentDiffusionPipeline
    from ..utils.images import make_grid, save_png
    from .shapes_checker import analyze

    specs = held_out_specs(count, seed)
    control: dict[str, Any] = {}
    if conditioning_scale is not None:
        net = controlnet if isinstance(controlnet, ControlNet) else ControlNet.from_pretrained(controlnet)
        control = {"controlnet": net}
    pipe = LatentDiffusionPipeline.from_pretrained(base, **control)
    settings = {**generate_settings(hub.resolve(base, allow_patterns=["*.json"])), **(settings or {})}
    run = _call_settings(pipe, settings)
    hints, images = [silhouette(spec) for spec in specs], []
    batches = range(0, count, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="silhouette eval", unit="batch")
    for start in batches:
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(start, min(start + batch_size, count))]
        extra: dict[str, Any] = {}
        if control:
            extra = {"control_image": hints[chunk], "controlnet_conditioning_scale": conditioning_scale}
        images += pipe([caption(spec) for spec in specs[chunk]], generator=generators, progress=False, **run,
                       **extra).images
    ious = [mask_iou(analyze(image).mask, silhouette_mask(spec)) for image, spec in zip(images, specs, strict=True)]
    if grid is not None:
        pairs = [im for pair in zip(hints[:grid_count], images[:grid_count], strict=True) for im in pair]
        save_png(make_grid(pairs, cols=10), Path(grid),
                 params={"controlnet": str(controlnet) if control else "none",
                         "seeds": f"{seed}..{seed + min(count, grid_count) - 1}", **run})
    return {"iou": float(np.mean(ious)), "accuracy": score(images, [caption(spec) for spec in specs]),
            "ious": ious, "settings": run, "seeds": [seed, seed + count - 1]}
