"""Judge a text-to-image model on shapes captions: generate from held-out prompts and seeds, run the checker.

    report = evaluate_shapes_model("latentdiff/shapes-64", count=200)      # the generate command's defaults
    report["accuracy"]   # {"color": .., "background": .., "shape": .., "position": .., "all": .., "count": 200}

Prompts are `count` captions drawn with `sample_spec` from `np.random.default_rng((prompt_seed, i))`; image i
is generated with seed `seed + i`, each alone in its batch slot with its own generator, at the settings of the
model's `latentdiff_generate.json` (what `latentdiff generate` uses when no flag is given) unless overridden.
The seeds of the built-in model's reported figures (docs/builtin.md) were never used while choosing its
settings: those were tuned on `DEV_SEED`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import is_int
from ..errors import InputError
from .shapes import caption, sample_spec
from .shapes_checker import score

REPORT_SEED = 1_000_000        # seeds (and prompt stream) of the reported figures
DEV_SEED = 500_000             # seeds used while tuning the built-in model's generate settings


def held_out_prompts(count: int, prompt_seed: int = REPORT_SEED) -> list[str]:
    """`count` captions of the data set's grammar, drawn from a stream the training data never used."""
    if not is_int(count) or count < 1:
        raise InputError("count must be a positive integer", where="count", expected=">= 1", found=repr(count))
    return [caption(sample_spec(np.random.default_rng((prompt_seed, i)))) for i in range(count)]


def evaluate_shapes_model(model: Any = "latentdiff/shapes-64", *, count: int = 200, seed: int = REPORT_SEED,
                          prompt_seed: int | None = None, batch_size: int = 50,
                          settings: dict[str, Any] | None = None, grid: str | os.PathLike | None = None,
                          grid_count: int = 40, progress: bool = True) -> dict[str, Any]:
    """Generate `count` images from held-out prompts and score them with the shapes checker.

    model: a pipeline, or anything `LatentDiffusionPipeline.from_pretrained` takes (then its folder's
    `latentdiff_generate.json` gives the defaults; a pipeline object has no folder, so only `settings` and the
    pipeline's own defaults apply). settings: generate settings (num_inference_steps, guidance_scale, sampler,
    eta, ...) replacing the folder's.
    grid: also write a PNG grid of the first `grid_count` images there. Returns {"accuracy", "settings",
    "prompts", "seeds", "failures", "images"} (failures: index, prompt, what the checker found; images: the PIL
    images, in prompt order)."""
    import torch

    from ..builtin import generate_settings
    from ..pipelines.latent_diffusion import LatentDiffusionPipeline
    from ..utils.images import make_grid, save_png
    from .shapes import parse_caption
    from .shapes_checker import analyze, compare

    prompts = held_out_prompts(count, seed if prompt_seed is None else prompt_seed)
    if isinstance(model, LatentDiffusionPipeline):
        pipe, name = model, type(model).__name__
    else:
        from .. import hub

        pipe, name = LatentDiffusionPipeline.from_pretrained(model), str(model)
        settings = {**generate_settings(hub.resolve(model, allow_patterns=["*.json"])), **(settings or {})}
    run = _call_settings(pipe, settings or {})
    images = []
    batches = range(0, count, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="shapes eval", unit="batch")
    for start in batches:
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, generator=generators, progress=False, **run).images
    accuracy = score(images, prompts)
    failures = []
    for i, (image, text) in enumerate(zip(images, prompts, strict=True)):    # score checked the lengths
        result = compare(analyze(image), parse_caption(text))
        if not result.all:
            found = result.found
            failures.append({"index": i, "prompt": text, "found": {k: getattr(found, k, None) for k in
                                                                  ("color", "shape", "where", "background")}})
    if grid is not None:
        save_png(make_grid(images[:grid_count], cols=10), Path(grid),
                 params={"model": name, "seeds": f"{seed}..{seed + min(count, grid_count) - 1}", **run})
    return {"accuracy": accuracy, "settings": run, "prompts": prompts, "seeds": [seed, seed + count - 1],
            "failures": failures, "images": images}


def _call_settings(pipe: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Pipeline __call__ keyword arguments from generate settings (a sampler name builds that sampler)."""
    known = {"num_inference_steps", "guidance_scale", "eta", "height", "width", "sampler", "negative_prompt",
             "cfg_truncation"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InputError("unknown generate settings", where="settings", expected=sorted(known), found=unknown)
    run = {k: v for k, v in settings.items() if k != "sampler" and v is not None}
    if settings.get("sampler"):
        from ..diffusion.samplers.names import sampler_from_name

        # as `latentdiff generate --sampler`: registered names, A1111 labels ("DPM++ 2M Karras"), diffusers classes
        pipe.sampler = sampler_from_name(settings["sampler"], base=pipe.sampler)
    return run


__all__: Sequence[str] = ("REPORT_SEED", "DEV_SEED", "held_out_prompts", "evaluate_shapes_model")
