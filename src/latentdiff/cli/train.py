"""`latentdiff train autoencoder|diffusion|controlnet|tiny-autoencoder|lcm CONFIG.yaml`: one stage from a YAML config
(docs/training.md); under `accelerate launch` on many processes, the main one prints the run's folder."""
from __future__ import annotations

import argparse


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train",
                           help="train a stage from a YAML config (run under `accelerate launch` for many GPUs)")
    train.add_argument("stage", choices=["autoencoder", "diffusion", "controlnet", "tiny-autoencoder", "lcm"],
                       help="first stage, latent diffusion, a ControlNet on a frozen text-to-image pipeline, a "
                            "tiny autoencoder (TAESD) distilled from a first stage, or latent consistency "
                            "distillation (an LCM-LoRA or a full LCM) of a text-to-image pipeline")
    train.add_argument("config", help="the YAML train config (see examples/train/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    train.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (= --set checkpoint.resume=...)")
    train.add_argument("--overwrite", action="store_true",
                       help="let a fresh run replace the model an earlier run exported to its output folder "
                            "(= --set train.overwrite=true)")


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.run import train_from_file

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else []) \
        + (["train.overwrite=true"] if args.overwrite else [])
    folder, is_main = train_from_file(args.stage, args.config, overrides=overrides)
    if is_main:
        print(folder)
    return 0
