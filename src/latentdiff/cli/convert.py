"""`latentdiff convert SRC DST`: an original single-file checkpoint to a diffusers folder, or back
(docs/single_file.md); everything is read and checked before anything is written."""
from __future__ import annotations

import argparse

from .generate_settings import DTYPES


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
    conv.add_argument("--tokenizer-2", default=None,
                      help="SDXL's second tokenizer (OpenCLIP bigG's) folder or Hub id, as --tokenizer")
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from ..convert.checkpoints import convert_checkpoint

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    dst = convert_checkpoint(args.src, args.dst, to=args.to, dtype=dtype, original_config=args.original_config,
                             use_ema=not args.no_ema, prediction_type=args.prediction_type, tokenizer=args.tokenizer,
                             tokenizer_2=args.tokenizer_2, overwrite=args.overwrite)
    print(dst)
    return 0
