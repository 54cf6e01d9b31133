"""Build the built-in silhouette ControlNet latentdiff/shapes-64-silhouette from the built-in model (one command):

    OMP_NUM_THREADS=1 python examples/train/build_shapes_64_silhouette.py     # ~1 h on 2 shared CPU cores

1. the data: 6,000 shapes images (latentdiff.data.shapes, seed 0, the base model's training stream) with their
   silhouettes (white shape on black, from the generator's geometry) as control images;
2. `latentdiff train controlnet examples/train/shapes-64-silhouette.yaml`: a ControlNet initialised from
   latentdiff/shapes-64's UNet, the base frozen;
3. the export (a diffusers ControlNetModel folder) written with fp16 weights into
   src/latentdiff/builtin/shapes-64-silhouette (--install, '' to skip);
4. the evaluation on --eval-count held-out captions and seeds (`shapes_silhouette.evaluate_silhouette_controlnet`):
   mean IoU of the checker's mask against the silhouette, the checker's accuracy, with and without the ControlNet;
   runs/shapes-64-silhouette/eval.json and a grid of (silhouette, image) pairs (--grid).

Every step is skipped when its output exists (delete it to redo the step); training resumes from its last
checkpoint after an interruption. On a machine whose cores other processes share, one torch thread
(OMP_NUM_THREADS=1) was measured faster per step than two (docs/control.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shapes_build import builtin_folder, install_folder, parse_args, train, write_data, write_report

RUNS = Path("runs/shapes-64-silhouette")
INSTALL = builtin_folder("shapes-64-silhouette")


def install(source: Path, target: Path) -> None:
    """Write the exported ControlNet into the package with fp16 weights (4.5 MB instead of 9; loaded as fp32, and
    the figures are measured on these weights), as a temporary folder renamed in place."""
    import torch

    from latentdiff import ControlNet

    install_folder(target, ControlNet.from_pretrained(source).to(torch.float16).save_pretrained)


def own_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", default=str(RUNS / "samples.png"), help="PNG of (silhouette, image) pairs")


def main() -> int:
    args = parse_args(__doc__, images=6_000, install=INSTALL, what="ControlNet", eval_count=100, more=own_flags)

    from latentdiff.data.shapes_silhouette import silhouette

    write_data(RUNS, args.images, conditioning=silhouette)
    export = RUNS / "run" / "controlnet"
    if not (export / "config.json").is_file():
        train("controlnet", "shapes-64-silhouette.yaml", args.overrides)
    model = export
    if args.install:
        install(export, Path(args.install))
        model = Path(args.install)
    if args.eval_count <= 0:
        return 0

    from latentdiff.data.shapes_silhouette import evaluate_silhouette_controlnet

    report = {"controlnet": evaluate_silhouette_controlnet(str(model), count=args.eval_count, grid=args.grid),
              "base alone": evaluate_silhouette_controlnet(count=args.eval_count, conditioning_scale=None)}
    write_report(RUNS, report)
    for name, result in report.items():
        print(f"{name}: IoU {result['iou']:.3f}, checker {json.dumps(result['accuracy'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
