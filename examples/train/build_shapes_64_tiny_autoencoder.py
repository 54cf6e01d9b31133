"""Build the built-in tiny autoencoder latentdiff/shapes-64-tiny-vae from the built-in model (one command):

    OMP_NUM_THREADS=1 python examples/train/build_shapes_64_tiny_autoencoder.py    # ~25 min on 2 loaded CPU cores

1. the data: 4,000 shapes images (latentdiff.data.shapes, seed 0, the base model's training stream);
2. `latentdiff train tiny-autoencoder examples/train/shapes-64-tiny-autoencoder.yaml`: an AutoencoderTiny (TAESD
   architecture, 32 channels, f = 4, 4 latent channels) distilled from latentdiff/shapes-64's own first stage;
3. the export written with fp16 weights into src/latentdiff/builtin/shapes-64-tiny-vae (--install, '' to skip);
4. the evaluation on --eval-count held-out captions and seeds (`data.shapes_eval`'s report stream): the base model
   generates latents once; the full and the tiny decoder each decode them; PSNR of tiny vs full, the shapes
   checker's scores on both image sets, the tiny encoder's round trip on held-out data images, and a figure
   (top row full decode, bottom row tiny decode) for docs/ (--figure). runs/shapes-64-tiny-autoencoder/eval.json.

Every step is skipped when its output exists (delete it to redo the step); training resumes from its last
checkpoint after an interruption.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from shapes_build import HERE, builtin_folder, install_folder, parse_args, train, write_data, write_report

RUNS = Path("runs/shapes-64-tiny-autoencoder")
INSTALL = builtin_folder("shapes-64-tiny-vae")
FIGURE = HERE.parents[1] / "docs" / "images" / "fast-tiny-vae.png"


def install(source: Path, target: Path) -> None:
    """The export with fp16 weights (loaded as fp32; the figures are measured on these weights), written to a
    temporary folder renamed in place."""
    import torch

    from latentdiff import AutoencoderTiny

    install_folder(target, AutoencoderTiny.from_pretrained(source).to(torch.float16).save_pretrained)


def evaluate(tiny_path: Path, *, count: int, figure: Path | None) -> dict:
    """Full vs tiny decode of the base model's latents for held-out prompts and seeds; the tiny round trip."""
    import numpy as np
    import torch

    from latentdiff import AutoencoderTiny, LatentDiffusionPipeline
    from latentdiff.builtin import builtin_path, generate_settings
    from latentdiff.data.shapes import ShapesDataset
    from latentdiff.data.shapes_checker import score
    from latentdiff.data.shapes_eval import REPORT_SEED, held_out_prompts
    from latentdiff.metrics.image import psnr
    from latentdiff.pipelines.base import to_output
    from latentdiff.utils.images import make_grid, save_png

    pipe = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64")
    tiny = AutoencoderTiny.from_pretrained(tiny_path).eval()
    settings = generate_settings(builtin_path("latentdiff/shapes-64"))
    call = dict(num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"])
    prompts = held_out_prompts(count)
    latents = []
    for start in range(0, count, 50):
        chunk = prompts[start:start + 50]
        generators = [torch.Generator().manual_seed(REPORT_SEED + start + i) for i in range(len(chunk))]
        latents.append(pipe(chunk, generator=generators, output_type="latent", progress=False, **call).images)
        print(f"generated {start + len(chunk)} / {count} latents", flush=True)
    z = torch.cat(latents)
    with torch.no_grad():
        started = time.perf_counter()
        full = pipe.vae.decode_latents(z).clamp(-1, 1)
        full_s = time.perf_counter() - started
        started = time.perf_counter()
        fast = tiny.decode_latents(z).clamp(-1, 1)
        tiny_s = time.perf_counter() - started
        decode_psnr = psnr((fast + 1) / 2, (full + 1) / 2, data_range=1.0)
        # the tiny encoder: held-out data images (a stream the training data never used), round trips
        data = ShapesDataset(count, seed=REPORT_SEED)
        x = torch.stack([torch.from_numpy(np.asarray(data[i][0], dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                         for i in range(count)])
        full_round = pipe.vae.decode_latents(pipe.vae.encode_latents(x, sample=False)).clamp(-1, 1)
        tiny_round = tiny.decode_latents(tiny.encode_latents(x)).clamp(-1, 1)
        round_psnr = psnr((tiny_round + 1) / 2, (x + 1) / 2, data_range=1.0)
        full_round_psnr = psnr((full_round + 1) / 2, (x + 1) / 2, data_range=1.0)
    full_images, tiny_images = to_output(full, "pil"), to_output(fast, "pil")
    report = {
        "count": count, "settings": call,
        "decode_psnr_tiny_vs_full_db": {"mean": float(decode_psnr.mean()), "min": float(decode_psnr.min())},
        "checker_full_decode": score(full_images, prompts), "checker_tiny_decode": score(tiny_images, prompts),
        "round_trip_psnr_vs_image_db": {"tiny": float(round_psnr.mean()), "full": float(full_round_psnr.mean())},
        "decode_seconds": {"full": full_s, "tiny": tiny_s, "note": "one batch, 2 shared CPU cores under load"},
        "parameters": {"full_vae": sum(p.numel() for p in pipe.vae.parameters()),
                       "tiny_vae": sum(p.numel() for p in tiny.parameters())},
    }
    if figure is not None:
        k = min(10, count)
        save_png(make_grid(full_images[:k] + tiny_images[:k], cols=k), figure,
                 params={"rows": "full decode / tiny decode", "seeds": f"{REPORT_SEED}..{REPORT_SEED + k - 1}"})
    return report


def own_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--figure", default=str(FIGURE), help="PNG: full decode (top) vs tiny decode (bottom)")


def main() -> int:
    args = parse_args(__doc__, images=4_000, install=INSTALL, what="autoencoder", more=own_flags)
    write_data(RUNS, args.images)
    export = RUNS / "tiny_autoencoder"
    if not (export / "config.json").is_file():
        train("tiny-autoencoder", "shapes-64-tiny-autoencoder.yaml", args.overrides)
    model = export
    if args.install:
        install(export, Path(args.install))
        model = Path(args.install)
    if args.eval_count <= 0:
        return 0
    report = evaluate(model, count=args.eval_count, figure=Path(args.figure) if args.figure else None)
    write_report(RUNS, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
