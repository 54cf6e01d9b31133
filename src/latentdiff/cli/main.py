"""The `latentdiff` command: its parser and the dispatch to one module per command (generate, train, convert,
eval, info, models).

Errors print one readable line and a hint, exit non-zero, and show a traceback only with --debug.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import LatentDiffError
from ..version import __version__
from .convert import add_convert_parser, cmd_convert
from .eval import add_eval_parser, cmd_eval
from .generate import add_generate_parser, cmd_generate
from .info import add_info_parsers, cmd_info, cmd_models
from .train import add_train_parser, cmd_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description="Latent diffusion toolkit.")
    parser.add_argument("--version", action="version", version=f"latentdiff {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_train_parser(sub)
    add_convert_parser(sub)
    add_eval_parser(sub)
    add_info_parsers(sub)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
