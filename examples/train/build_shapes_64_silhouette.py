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
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = Path("runs/shapes-64-silhouette")
INSTALL = HERE.parents[1] / "src" / "latentdiff" / "builtin" / "shapes-64-silhouette"
LATENTDIFF = (sys.executable, "-m", "latentdiff")


def run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    start = time.monotonic()
    subprocess.run(command, check=True)
    print(f"({time.monotonic() - start:.0f} s)", flush=True)


def install(source: Path, target: Path) -> None:
    """Write the exported ControlNet into the package with fp16 weights (4.5 MB instead of 9; loaded as fp32, and
    the figures are measured on these weights), as a temporary folder renamed in place."""
    import torch

    from latentdiff import ControlNet

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ControlNet.from_pretrained(source).to(torch.float16).save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    print(f"installed {target}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=6_000, help="training images")
    parser.add_argument("--install", default=str(INSTALL), help="where the packaged ControlNet goes ('' to skip)")
    parser.add_argument("--eval-count", type=int, default=100, help="held-out images judged (0: no evaluation)")
    parser.add_argument("--grid", default=str(RUNS / "samples.png"), help="PNG of (silhouette, image) pairs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a value of the training config (repeatable)")
    args = parser.parse_args()

    from latentdiff.data.shapes import write_imagefolder
    from latentdiff.data.shapes_silhouette import silhouette

    if not (RUNS / "data").is_dir():
        write_imagefolder(RUNS / "data", args.images, seed=0, conditioning=silhouette)
    export = RUNS / "run" / "controlnet"
    if not (export / "config.json").is_file():
        sets = [arg for value in args.overrides for arg in ("--set", value)]
        run(*LATENTDIFF, "train", "controlnet", str(HERE / "shapes-64-silhouette.yaml"), "--resume", "latest", *sets)
    model = export
    if args.install:
        install(export, Path(args.install))
        model = Path(args.install)
    if args.eval_count <= 0:
        return 0

    from latentdiff.data.shapes_silhouette import evaluate_silhouette_controlnet

    report = {"controlnet": evaluate_silhouette_controlnet(str(model), count=args.eval_count, grid=args.grid),
              "base alone": evaluate_silhouette_controlnet(count=args.eval_count, conditioning_scale=None)}
    (RUNS / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, result in report.items():
        print(f"{name}: IoU {result['iou']:.3f}, checker {json.dumps(result['accuracy'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
