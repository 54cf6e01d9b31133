"""Build the built-in model latentdiff/shapes-64 from nothing, with latentdiff's own commands (one command):

    python examples/train/build_shapes_64.py                      # ~1.5 h on 2 CPU cores; faster on a GPU

1. the data: 20,000 shapes images (latentdiff.data.shapes, seed 0) and the captions' word-level tokenizer;
2. `latentdiff train autoencoder examples/train/shapes-64-autoencoder.yaml`  (KL, f = 4: 64 px -> 4 x 16 x 16);
3. `latentdiff train diffusion examples/train/shapes-64-ldm.yaml`  (UNet + LDM-BERT trained jointly);
   `latentdiff train autoencoder examples/train/shapes-64-decoder.yaml`  (decoder-only fine-tuning: the
   latents stay as they were, so it may run before, after or beside the LDM; it replaces the pipeline's VAE);
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
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = Path("runs/shapes-64")
INSTALL = HERE.parents[1] / "src" / "latentdiff" / "builtin" / "shapes-64"
# What `latentdiff generate` uses for this model when no flag is given (chosen on DEV_SEED, see docs/builtin.md).
GENERATE_SETTINGS = {"num_inference_steps": 50, "guidance_scale": 2.0, "sampler": "ddim", "height": 64, "width": 64}


def run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000, help="training images")
    parser.add_argument("--install", default=str(INSTALL), help="where the packaged model goes ('' to skip)")
    parser.add_argument("--eval-count", type=int, default=200)
    args = parser.parse_args()

    from latentdiff.data.shapes import write_imagefolder, write_tokenizer

    if not (RUNS / "data").is_dir():
        write_imagefolder(RUNS / "data", args.images, seed=0)
    if not (RUNS / "tokenizer").is_dir():
        write_tokenizer(RUNS / "tokenizer")
    if not (RUNS / "autoencoder" / "config.json").is_file():
        run("latentdiff", "train", "autoencoder", str(HERE / "shapes-64-autoencoder.yaml"), "--resume", "latest")
    if not (RUNS / "pipeline" / "model_index.json").is_file():
        run("latentdiff", "train", "diffusion", str(HERE / "shapes-64-ldm.yaml"), "--resume", "latest")
    if not (RUNS / "autoencoder-ft" / "config.json").is_file():
        run("latentdiff", "train", "autoencoder", str(HERE / "shapes-64-decoder.yaml"), "--resume", "latest")
    model = RUNS / "pipeline"
    replace_decoder(model / "vqvae", RUNS / "autoencoder-ft")
    # Zero terminal SNR: sample from t = T (trailing spacing), the one step where x_T holds no signal at all.
    scheduler = model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "timestep_spacing": "trailing"},
                                    indent=2) + "\n")
    (model / "latentdiff_generate.json").write_text(json.dumps(GENERATE_SETTINGS, indent=2) + "\n")
    if args.install:
        install(model, Path(args.install))
        model = Path(args.install)

    from latentdiff.data.shapes_eval import evaluate_shapes_model

    report = evaluate_shapes_model(str(model), count=args.eval_count, grid=RUNS / "samples.png")
    (RUNS / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
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
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("*.tmp", "*.png", "*.md5"))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    print(f"installed {target}")


if __name__ == "__main__":
    sys.exit(main())
