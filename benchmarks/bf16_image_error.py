"""The bf16-vs-fp32 image error behind `latentdiff.utils.dtypes.BF16_IMAGE_ERROR` (docs/fast.md "## CPU"):
the same prompts, seeds and sampler in both dtypes; mean, 99th percentile and max of |bf16 - fp32| over the
pixels in [0, 1]. Families: the built-in latentdiff/shapes-64 (4 prompts, DDIM 50 steps, guidance 1.5, with the
shapes checker's scores in both dtypes) and the tests' tiny random-weight SD folder (DDIM 20, guidance 7.5).

    python benchmarks/bf16_image_error.py [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests._support: the tiny SD folder

PROMPTS = ["a red circle on the left, blue background", "a yellow square at the top, black background",
           "a green triangle at the bottom, white background", "a black circle in the center, red background"]


def images(pipe, prompts: list[str], steps: int, guidance: float) -> np.ndarray:
    return pipe(prompts, guidance_scale=guidance, num_inference_steps=steps, output_type="np", progress=False,
                generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images


def report(name: str, fp32: np.ndarray, bf16: np.ndarray) -> None:
    d = np.abs(fp32 - bf16)
    print(f"| {name} | {d.mean():.4f} | {np.quantile(d, 0.99):.4f} | {d.max():.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from PIL import Image
    from tests._support.sd import tiny_diffusers_pipeline

    from latentdiff import LatentDiffusionPipeline, Pipeline
    from latentdiff.data.shapes_checker import score

    print("| family | mean abs error | p99 | max |\n|---|---|---|---|")
    shapes = {dt: images(LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64", torch_dtype=dt), PROMPTS,
                         50, 1.5) for dt in (torch.float32, torch.bfloat16)}
    report("latentdiff/shapes-64", shapes[torch.float32], shapes[torch.bfloat16])
    with tempfile.TemporaryDirectory() as tmp:
        tiny_diffusers_pipeline(Path(tmp) / "src").save_pretrained(Path(tmp) / "sd")
        sd = {dt: images(Pipeline.from_pretrained(Path(tmp) / "sd", torch_dtype=dt), ["a cat", "a dog"], 20, 7.5)
              for dt in (torch.float32, torch.bfloat16)}
    report("stable-diffusion (tiny random)", sd[torch.float32], sd[torch.bfloat16])
    for dt, found in shapes.items():
        pils = [Image.fromarray((a * 255).round().astype(np.uint8)) for a in found]
        print(f"\nshapes checker, {dt}: {score(pils, PROMPTS)}")


if __name__ == "__main__":
    main()
