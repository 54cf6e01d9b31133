"""Build the built-in model latentdiff/shapes-64 from nothing, with latentdiff's own commands (one command):

    python examples/train/build_shapes_64.py                      # < 2 h on 2 CPU cores (bf16 autocast)
    python examples/train/build_shapes_64.py --gpu                # CUDA: more data per step

1. the data: 20,000 shapes images (latentdiff.data.shapes, seed 0) and the captions' word-level tokenizer;
2. `latentdiff train autoencoder examples/train/shapes-64-autoencoder.yaml`  (KL, f = 4: 64 px -> 4 x 16 x 16);
3. `latentdiff train diffusion examples/train/shapes-64-ldm.yaml`  (UNet + LDM-BERT trained jointly);
   with --finetune-decoder also `latentdiff train autoencoder examples/train/shapes-64-decoder.yaml`
   (decoder-only fine-tuning: the latents stay as they were, so the LDM trained on them still fits; it
   replaces the pipeline's VAE decoder. Off by default: the cosine-decayed autoencoder does not need it);
4. the exported pipeline + its generate settings copied into src/latentdiff/builtin/shapes-64 (--install);
5. the shapes checker on 200 images from held-out prompts and seeds, at those settings: a JSON report and a
   PNG grid in runs/shapes-64/ (latentdiff.data.shapes_eval).

Every step is skipped when its output exists (delete runs/shapes-64/<step> to redo it); training resumes
from its last checkpoint after an interruption. Outputs go to runs/shapes-64/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from shapes_build import builtin_folder, install_folder, parse_args, train, write_data, write_report

RUNS = Path("runs/shapes-64")
INSTALL = builtin_folder("shapes-64")
# What `latentdiff generate` uses for this model when no flag is given (chosen on DEV_SEED, see docs/builtin.md).
GENERATE_SETTINGS = {"num_inference_steps": 50, "guidance_scale": 1.5, "sampler": "ddim", "height": 64, "width": 64}


# `--gpu`: the same configs on a CUDA device, with more data per step and more steps (what a GPU buys). Not
# what the shipped weights were trained with (2 CPU cores, the configs as they are): on one H200 these small
# models are host-bound, and the step times and this recipe's length there are in docs/builtin.md.
# `--fit-seconds S` scales the step counts to a time budget instead.
GPU_RECIPE = {
    "autoencoder": ["train.cpu=false", "data.num_workers=8", "train.batch_size=64", "train.max_steps=12000",
                    "optim.lr_schedule=cosine", "optim.warmup_steps=200", "optim.min_lr_ratio=0.05",
                    "checkpoint.every_n_steps=2000"],
    "decoder": ["train.cpu=false", "data.num_workers=8", "train.batch_size=64", "train.max_steps=3000",
                "checkpoint.every_n_steps=1000"],
    "ldm": ["train.cpu=false", "data.num_workers=2", "train.batch_size=128", "train.max_steps=12000",
            "checkpoint.every_n_steps=2000", "sample.every_n_steps=2000"],
}
STEP_LIMITS = {"autoencoder": (2000, 20000), "decoder": (500, 4000), "ldm": (4000, 20000)}  # for --fit-seconds


def train_stage(stage: str, config: str, overrides: list[str]) -> None:
    train("diffusion" if stage == "ldm" else "autoencoder", config, overrides)


def seconds_per_step(stage: str, config: str, overrides: list[str], steps: int = 150) -> tuple[float, Path]:
    """Train `steps` steps into RUNS/probe-<stage> and read the time per step off its loss log (startup excluded)."""
    import csv

    probe = RUNS / f"probe-{stage}"
    shutil.rmtree(probe, ignore_errors=True)
    train_stage(stage, config, overrides + [f"train.max_steps={steps}", f"train.output_dir={probe}/run",
                                            f"checkpoint.export_dir={probe}/export", "logging.every_n_steps=25",
                                            "checkpoint.every_n_steps=100000", "sample.every_n_steps=0"])
    with open(probe / "run" / "logs" / "losses.csv") as f:
        rows = sorted({(int(r["step"]), float(r["wall_time"])) for r in csv.DictReader(f)})
    (s0, t0), (s1, t1) = rows[0], rows[-1]
    return (t1 - t0) / (s1 - s0), probe


def with_steps(overrides: list[str], steps: int) -> list[str]:
    return [o for o in overrides if not o.startswith("train.max_steps=")] + [f"train.max_steps={steps}"]


def fitted(stage: str, per_step: float, seconds: float) -> int:
    low, high = STEP_LIMITS[stage]
    return int(min(high, max(low, seconds / per_step // 500 * 500)))


def own_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", action="store_true", help="train on CUDA with the GPU recipe (GPU_RECIPE)")
    parser.add_argument("--finetune-decoder", action="store_true",
                        help="also fine-tune the decoder alone (examples/train/shapes-64-decoder.yaml) and put it "
                             "into the pipeline")
    parser.add_argument("--fit-seconds", type=float, default=None,
                        help="with --gpu: measure each stage's speed and size its steps so that the whole build "
                             "ends within about this many seconds (the step counts used are printed)")


def main() -> int:
    args = parse_args(__doc__, images=20_000, install=INSTALL, what="model", overrides=False, more=own_flags)
    tune = args.finetune_decoder
    start = time.monotonic()

    from latentdiff.data.shapes import write_tokenizer

    recipe = GPU_RECIPE if args.gpu else {stage: [] for stage in GPU_RECIPE}
    used: dict[str, int] = {}
    write_data(RUNS, args.images)
    if not (RUNS / "tokenizer").is_dir():
        write_tokenizer(RUNS / "tokenizer")
    if args.fit_seconds and not (RUNS / "autoencoder" / "config.json").is_file():
        per_step, _ = seconds_per_step("autoencoder", "shapes-64-autoencoder.yaml", recipe["autoencoder"])
        left = args.fit_seconds - (time.monotonic() - start)
        used["autoencoder"] = fitted("autoencoder", per_step, (0.30 if tune else 0.35) * left)
        if tune:
            used["decoder"] = fitted("decoder", per_step, 0.05 * left)
        print(f"autoencoder: {per_step * 1e3:.1f} ms per step; steps {used}", flush=True)
    for stage in used:
        recipe[stage] = with_steps(recipe[stage], used[stage])
    if not (RUNS / "autoencoder" / "config.json").is_file():
        train_stage("autoencoder", "shapes-64-autoencoder.yaml", recipe["autoencoder"])
    if tune and args.gpu and not (RUNS / "autoencoder-ft" / "config.json").is_file():  # it does not need the LDM
        train_stage("decoder", "shapes-64-decoder.yaml", recipe["decoder"])
    if args.fit_seconds and not (RUNS / "pipeline" / "model_index.json").is_file():
        per_step, probe = seconds_per_step("ldm", "shapes-64-ldm.yaml", recipe["ldm"], steps=100)
        cache = probe / "run" / "latent_cache.safetensors"  # same data and autoencoder: the same cache
        if cache.is_file():
            (RUNS / "ldm-run").mkdir(parents=True, exist_ok=True)
            shutil.copy2(cache, RUNS / "ldm-run" / cache.name)
        left = args.fit_seconds - (time.monotonic() - start) - 60  # export, sample grids, install
        used["ldm"] = fitted("ldm", per_step * 1.04, left)          # + the sample grids every 2000 steps
        recipe["ldm"] = with_steps(recipe["ldm"], used["ldm"])
        print(f"ldm: {per_step * 1e3:.1f} ms per step; steps {used}", flush=True)
    if not (RUNS / "pipeline" / "model_index.json").is_file():
        train_stage("ldm", "shapes-64-ldm.yaml", recipe["ldm"])
    if tune and not (RUNS / "autoencoder-ft" / "config.json").is_file():
        train_stage("decoder", "shapes-64-decoder.yaml", recipe["decoder"])
    if used:
        (RUNS / "steps.json").write_text(json.dumps(used, indent=2) + "\n")
        print(f"steps used: {used}", flush=True)
    model = RUNS / "pipeline"
    if tune:
        replace_decoder(model / "vqvae", RUNS / "autoencoder-ft")
    # Zero terminal SNR: sample from t = T (trailing spacing), the one step where x_T holds no signal at all.
    scheduler = model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "timestep_spacing": "trailing"},
                                    indent=2) + "\n")
    (model / "latentdiff_generate.json").write_text(json.dumps(GENERATE_SETTINGS, indent=2) + "\n")
    if args.install:
        install(model, Path(args.install))
        model = Path(args.install)
    if args.eval_count <= 0:
        return 0

    from latentdiff.data.shapes_eval import evaluate_shapes_model

    report = evaluate_shapes_model(str(model), count=args.eval_count, grid=RUNS / "samples.png")
    write_report(RUNS, report)
    print(json.dumps(report["accuracy"], indent=2))
    return 0


def replace_decoder(vae_folder: Path, tuned: Path) -> None:
    """Put the fine-tuned autoencoder into the pipeline: same encoder and scaling factor, better decoder."""
    import torch

    from latentdiff import AutoencoderKL

    before, after = AutoencoderKL.from_pretrained(vae_folder), AutoencoderKL.from_pretrained(tuned)
    old, new = before.state_dict(), after.state_dict()
    if before.config.scaling_factor != after.config.scaling_factor or any(
            not torch.equal(old[k], new[k]) for k in old if k.startswith(("encoder.", "quant_conv."))):
        raise SystemExit(f"{tuned} is not a decoder-only fine-tuning of {vae_folder}")
    after.save_pretrained(vae_folder)


def install(source: Path, target: Path) -> None:
    """Copy the exported pipeline folder into the package (atomically: a temporary copy renamed in place)."""
    install_folder(target, lambda tmp: shutil.copytree(source, tmp,
                                                        ignore=shutil.ignore_patterns("*.tmp", "*.png", "*.md5")))


if __name__ == "__main__":
    sys.exit(main())
