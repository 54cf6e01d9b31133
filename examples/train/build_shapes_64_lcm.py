"""Build the built-in LCM-LoRA latentdiff/shapes-64-lcm-lora from the built-in model (one command):

    OMP_NUM_THREADS=1 python examples/train/build_shapes_64_lcm.py     # ~40 min on 2 shared CPU cores

1. the data: 6,000 shapes images (latentdiff.data.shapes, seed 0, the base model's training stream);
2. `latentdiff train lcm examples/train/shapes-64-lcm.yaml`: latent consistency distillation of latentdiff/shapes-64
   into a LoRA (the base frozen; teacher: the base with guidance 1 + w, w in [w_min, w_max]);
3. the LoRA (kohya format, fp16) written into src/latentdiff/builtin/shapes-64-lcm-lora (--install, '' to skip);
4. the evaluation on --eval-count held-out captions and seeds (`shapes_eval.evaluate_shapes_model`): the checker's
   accuracy and the seconds per image of the LCM-LoRA at 4 (and 2, 8) steps without guidance, of the teacher at its
   own settings (DDIM 50, guidance 1.5) and of the base with the LCM sampler but no LoRA: runs/shapes-64-lcm/eval.json,
   a grid of LCM-LoRA samples (--grid) and one of the teacher's.

Every step is skipped when its output exists (delete it to redo the step); training resumes from its last
checkpoint after an interruption. `--evaluate PATH` only evaluates the LoRA file or folder at PATH (a checkpoint's
`lora` weights exported by hand, or the export), on the tuning seeds (shapes_eval.DEV_SEED) unless --report.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from shapes_build import HERE, builtin_folder, install_folder, parse_args, train, write_data, write_report

RUNS = Path("runs/shapes-64-lcm")
INSTALL = builtin_folder("shapes-64-lcm-lora")
LORA_FILE = "pytorch_lora_weights.safetensors"
LCM = {"sampler": "lcm", "guidance_scale": 1.0}


def install(source: Path, target: Path) -> None:
    """The exported LoRA file into the package with fp16 tensors (half the size; loaded in the UNet's dtype, and the
    figures are measured on these weights), as a temporary folder renamed in place."""
    from safetensors import safe_open

    from latentdiff.hub import load_safetensors, save_safetensors

    with safe_open(str(source / LORA_FILE), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = {k: v.half() if v.is_floating_point() and v.dim() > 0 else v
               for k, v in load_safetensors(source / LORA_FILE).items()}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_safetensors(tensors, tmp / LORA_FILE, metadata=metadata)

    install_folder(target, write)


def checkpoint_lora(pipe: Any, folder: Path) -> Path:
    """A training checkpoint's LoRA (the trainer's module state) written as a kohya file beside it."""
    from latentdiff.hub import load_safetensors
    from latentdiff.training.config import load_train_config
    from latentdiff.training.lora import TrainableLoRA

    lora = load_train_config(HERE / "shapes-64-lcm.yaml", "lcm").model.lora
    assert lora is not None
    module = TrainableLoRA(pipe.unet, rank=lora.rank, alpha=lora.alpha, targets=lora.targets)
    module.load_state_dict(load_safetensors(folder / "lora.safetensors"))
    module.save(folder / LORA_FILE)
    return folder / LORA_FILE


def evaluate(lora: str | None, *, count: int, seed: int, steps: int = 4, grid: str | None = None,
             settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checker's accuracy of latentdiff/shapes-64 (+ the LoRA), and the wall seconds per image it took."""
    import torch

    from latentdiff import LatentDiffusionPipeline
    from latentdiff.data.shapes_eval import evaluate_shapes_model

    pipe = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64")
    if lora is not None:
        pipe.load_lora_weights(checkpoint_lora(pipe, Path(lora)) if (Path(lora) / "lora.safetensors").is_file()
                               else lora)
    run_settings = settings or {**LCM, "num_inference_steps": steps}
    start, cpu = time.monotonic(), time.process_time()
    with torch.inference_mode():
        report = evaluate_shapes_model(pipe, count=count, seed=seed, settings=run_settings, grid=grid,
                                       progress=False)
    wall, cpu = time.monotonic() - start, time.process_time() - cpu
    return {"accuracy": report["accuracy"], "settings": run_settings, "seeds": report["seeds"],
            "seconds_per_image": round(wall / count, 4), "cpu_seconds_per_image": round(cpu / count, 4)}


def own_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", default=str(RUNS / "samples.png"), help="PNG grid of LCM-LoRA samples")
    parser.add_argument("--evaluate", default=None, metavar="PATH", help="only evaluate this LoRA file / folder")
    parser.add_argument("--report", action="store_true", help="with --evaluate: the report seeds, not the dev ones")


def main() -> int:
    args = parse_args(__doc__, images=6_000, install=INSTALL, what="LoRA", more=own_flags)

    from latentdiff.data.shapes_eval import DEV_SEED, REPORT_SEED

    if args.evaluate:
        seed = REPORT_SEED if args.report else DEV_SEED
        print(json.dumps(evaluate(args.evaluate, count=args.eval_count, seed=seed), indent=2))
        return 0

    write_data(RUNS, args.images)
    export = RUNS / "run" / "lcm"
    if not (export / LORA_FILE).is_file():
        train("lcm", "shapes-64-lcm.yaml", args.overrides)
    lora = str(export)
    if args.install:
        install(export, Path(args.install))
        lora = args.install
    if args.eval_count <= 0:
        return 0
    count, seed = args.eval_count, REPORT_SEED
    report = {
        "lcm-lora 4 steps": evaluate(lora, count=count, seed=seed, steps=4, grid=args.grid),
        "lcm-lora 2 steps": evaluate(lora, count=count, seed=seed, steps=2),
        "lcm-lora 8 steps": evaluate(lora, count=count, seed=seed, steps=8),
        "lcm sampler, no lora, 4 steps": evaluate(None, count=count, seed=seed, steps=4),
        "teacher: ddim 50, guidance 1.5": evaluate(None, count=count, seed=seed, grid=str(RUNS / "teacher.png"),
                                                   settings={"sampler": "ddim", "num_inference_steps": 50,
                                                             "guidance_scale": 1.5}),
    }
    write_report(RUNS, report)
    for name, result in report.items():
        print(f"{name}: {json.dumps(result['accuracy'])}, {result['seconds_per_image']} s / image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
