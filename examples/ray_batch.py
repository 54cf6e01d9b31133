"""Generate a prompts data set with Ray Data: Parquet (id, prompt, seed, image PNG bytes) and PNG files.

    pip install "latentdiff[ray]"
    python examples/ray_batch.py --out ray-out                  # 16 prompts, the built-in model, a local Ray
    python examples/ray_batch.py --out ray-out --count 64 --steps 50 --concurrency 4

Runs offline: the prompts come from the shapes vocabulary of the built-in model `latentdiff/shapes-64`. On a
cluster, call `ray.init(address="auto")` instead and give each actor a GPU (`--gpus 1`); each actor loads the
pipeline once. Row i has seed `--seed + i`, so the image of a row is the one
`pipe(prompt, generator=torch.Generator().manual_seed(seed))` gives, whatever actor or batch made it.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

from latentdiff.data import COLORS, SHAPES, WHERE
from latentdiff.integrations.ray import LatentDiffusionPredictor


def shape_prompts(count: int) -> list[str]:
    """`count` captions of the kind shapes-64 was trained on, varied in color, shape, place and background."""
    combos = itertools.product(SHAPES, WHERE, COLORS)
    prompts = []
    for k, (shape, where, color) in enumerate(combos):
        if len(prompts) == count:
            break
        background = COLORS[(COLORS.index(color) + 1 + k % (len(COLORS) - 1)) % len(COLORS)]
        prompts.append(f"a {color} {shape} {where}, {background} background")
    return prompts


def generate(out: Path, *, count: int = 16, steps: int = 20, seed: int = 0, batch_size: int = 4,
             concurrency: int = 1, gpus: float = 0, batch_images: bool = True) -> Any:
    """Run the data set through `concurrency` actors; write out/parquet/ and out/png/. Returns the Ray dataset
    (materialized: writing it again does not generate again)."""
    import ray

    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(shape_prompts(count))])
    images = ds.map_batches(
        LatentDiffusionPredictor,
        fn_constructor_kwargs={"model": "latentdiff/shapes-64", "steps": steps, "seed": seed,
                               "batch_images": batch_images, "output_dir": str(out / "png")},
        batch_size=batch_size, batch_format="numpy", num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
    ).materialize()
    images.drop_columns(["path"]).write_parquet(str(out / "parquet"))
    return images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("ray-out"))
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=1, help="actors, each with its own pipeline")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs per actor (1 on a GPU cluster)")
    args = parser.parse_args(argv)

    import ray

    ray.init(num_cpus=2, include_dashboard=False)     # a local Ray; ray.init(address="auto") on a cluster
    try:
        images = generate(args.out, count=args.count, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                          concurrency=args.concurrency, gpus=args.gpus)
        print(f"{images.count()} images: {args.out / 'parquet'} and {args.out / 'png'}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
