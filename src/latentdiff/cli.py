"""The `latentdiff` command: generate images, show versions and devices, list registered parts.

Errors print one readable line and a hint, exit non-zero, and show a traceback only with --debug.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .version import __version__
from .cli_generate import DTYPES, add_generate_parser, cmd_generate
from .errors import LatentDiffError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description="Latent diffusion toolkit.")
    parser.add_argument("--version", action="version", version=f"latentdiff {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    add_generate_parser(sub)

    train = sub.add_parser("train", help="train a stage from a YAML config (run under `accelerate launch` for many GPUs)")
    train.add_argument("stage", choices=["autoencoder", "diffusion"], help="first stage or latent diffusion")
    train.add_argument("config", help="the YAML train config (see examples/train/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    train.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (= --set checkpoint.resume=...)")

    add_convert_parser(sub)
    add_eval_parser(sub)
    sub.add_parser("info", help="versions, devices and dtype support")
    sub.add_parser("models", help="built-in models, registered components, samplers and pipelines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "info": cmd_info, "models": cmd_models,
                "train": cmd_train, "convert": cmd_convert, "eval": cmd_eval}[args.command](args)
    except (LatentDiffError, OSError) as e:
        if args.debug:
            raise
        hint = getattr(e, "hint", None) or "run with --debug for the traceback"
        print(f"latentdiff: error: {e}\nhint: {hint}", file=sys.stderr)
        return 2


def cmd_train(args: argparse.Namespace) -> int:
    from .training.run import train_from_file

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    folder, is_main = train_from_file(args.stage, args.config, overrides=overrides)
    if is_main:
        print(folder)
    return 0


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    conv = sub.add_parser("convert", help="original single file <-> diffusers folder",
                          description="Convert an original single-file checkpoint (.safetensors / .ckpt) to a "
                                      "diffusers folder, or a diffusers folder to one original-layout .safetensors.")
    conv.add_argument("src", help="a .safetensors / .ckpt file, or a diffusers folder")
    conv.add_argument("dst", help="the folder (or .safetensors file) to write; must not exist")
    conv.add_argument("--to", choices=("diffusers", "single-file"), default=None,
                      help="target format (default: the other one than SRC's)")
    conv.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                      help="cast floating-point weights (default: keep the source's)")
    conv.add_argument("--original-config", default=None,
                      help="the model's original YAML, or a shipped one (v1-inference, v2-inference-v ...)")
    conv.add_argument("--no-ema", action="store_true", help="use the live weights, not the EMA ones")
    conv.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample"), default=None,
                      help="override the inferred prediction type (SD 2.x 512px base files: epsilon)")
    conv.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (single files carry none)")
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .convert.checkpoints import convert_checkpoint

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    dst = convert_checkpoint(args.src, args.dst, to=args.to, dtype=dtype, original_config=args.original_config,
                             use_ema=not args.no_ema, prediction_type=args.prediction_type, tokenizer=args.tokenizer,
                             overwrite=args.overwrite)
    print(dst)
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="FID, KID, IS, precision/recall, PSNR, SSIM over image folders",
                        description="Sample-quality and reconstruction metrics (see docs/metrics.md).")
    metric = ev.add_subparsers(dest="metric", required=True)
    net = argparse.ArgumentParser(add_help=False)
    net.add_argument("--batch-size", type=int, default=50, help="images per Inception batch")
    net.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    net.add_argument("--workers", type=int, default=0, help="image-decoding processes")
    net.add_argument("--inception-weights", default=None, metavar="PATH",
                     help="FID Inception weights (.pth / .safetensors); default: the release, downloaded once "
                          "(the value 'random' is an untrained network, for testing only)")
    two = {"fid": "Frechet Inception distance (REAL or FAKE may be an .npz of mu, sigma)",
           "kid": "kernel Inception distance", "pr": "improved precision and recall (k-NN manifolds)"}
    for name, text in two.items():
        parser = metric.add_parser(name, parents=[net], help=text, description=text)
        or_stats = " (or its .npz statistics)" if name == "fid" else ""
        parser.add_argument("real", help="folder of real images" + or_stats)
        parser.add_argument("fake", help="folder of generated images" + or_stats)
        if name == "kid":
            parser.add_argument("--subsets", type=int, default=100, help="number of random subsets")
            parser.add_argument("--subset-size", type=int, default=1000, help="images per subset")
        if name == "pr":
            parser.add_argument("--k", type=int, default=3, help="neighbourhood size of the manifold balls")
    score = metric.add_parser("is", parents=[net], help="Inception Score of a folder of generated images")
    score.add_argument("dir")
    score.add_argument("--splits", type=int, default=10)
    stats = metric.add_parser("stats", parents=[net], help="save a folder's FID statistics (mu, sigma) as .npz")
    stats.add_argument("dir")
    stats.add_argument("output", help="the .npz file to write")
    for name in ("psnr", "ssim"):
        paired = metric.add_parser(name, help=f"mean {name.upper()} of images paired by file name")
        paired.add_argument("dir_a")
        paired.add_argument("dir_b")


def cmd_eval(args: argparse.Namespace) -> int:
    from .metrics.evaluate import run_eval

    return run_eval(args)


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    print(f"latentdiff {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    for name in ("transformers", "accelerate", "safetensors", "huggingface_hub", "diffusers"):
        try:
            from importlib.metadata import version

            print(f"{name} {version(name)}")
        except Exception:
            print(f"{name} not installed")
    print(f"cpu threads: {torch.get_num_threads()}; bf16 matmul on cpu: supported")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i} {torch.cuda.get_device_name(i)}, bf16: {torch.cuda.is_bf16_supported()}")
    else:
        print("cuda: not available")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .builtin import BUILTIN_MODELS, ROOT, builtin_names, builtin_path
    from .registry import COMPONENTS, PIPELINES, SAMPLERS

    for name in builtin_names():
        folder = builtin_path(name)
        where = f"installed at {folder}" if folder else f"not installed (no {ROOT / BUILTIN_MODELS[name]})"
        print(f"built-in model {name}: {where}")
    for registry in (COMPONENTS, SAMPLERS, PIPELINES):
        print(f"{registry.kind}s: {', '.join(registry.names())}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
