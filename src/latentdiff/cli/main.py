"""The `latentdiff` command: its parser and the dispatch to one module per command (generate, train, convert,
eval, info, models, data, serve).

Errors print one line `latentdiff: error: ...` and a `hint: ...` line, and never a traceback unless asked for
(`--debug`, or LATENTDIFF_DEBUG=1). Exit codes:

    0    success
    1    an unexpected error (a bug, or an input latentdiff does not check yet): its type and message
    2    a latentdiff error (bad input, file, config or model), an OS error (a missing file, a full disk), or a
         usage error from the argument parser
    130  interrupted (Ctrl-C)
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

from ..errors import LatentDiffError
from ..version import __version__
from .convert import add_convert_parser, cmd_convert
from .data import add_data_parser, cmd_data
from .eval import add_eval_parser, cmd_eval
from .generate import add_generate_parser, cmd_generate
from .info import add_info_parsers, cmd_info, cmd_models
from .serve import add_serve_parser, cmd_serve
from .train import add_train_parser, cmd_train

EXIT_UNEXPECTED, EXIT_ERROR, EXIT_INTERRUPTED = 1, 2, 130
DEBUG_ENV = "LATENTDIFF_DEBUG"
DEBUG_HINT = f"run with --debug (or {DEBUG_ENV}=1) for the traceback"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description="Latent diffusion toolkit.")
    parser.add_argument("--version", action="version", version=f"latentdiff {__version__}")
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks on errors (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_train_parser(sub)
    add_convert_parser(sub)
    add_eval_parser(sub)
    add_info_parsers(sub)
    add_data_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    commands = {"generate": cmd_generate, "info": cmd_info, "models": cmd_models,
                "train": cmd_train, "convert": cmd_convert, "eval": cmd_eval, "data": cmd_data,
                "serve": cmd_serve}
    try:
        with warnings.catch_warnings():   # restored after the command (main() also runs in-process, in tests)
            if not debug:
                warnings.showwarning = show_warning
            return commands[args.command](args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("\nlatentdiff: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (LatentDiffError, OSError) as e:
        if debug:
            raise
        report(str(e), getattr(e, "hint", None) or DEBUG_HINT)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 -- whatever escapes, one line and a hint, never a traceback
        if debug:
            raise
        known = describe_foreign(e)
        if known is not None:
            report(*known)
            return EXIT_ERROR
        report(f"unexpected {type(e).__module__}.{type(e).__qualname__}: {e}",
               f"this is a bug or an input latentdiff does not check yet; {DEBUG_HINT}")
        return EXIT_UNEXPECTED


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    """A warning in the command's one-line format, `latentdiff: warning: ...` (no file path or source line: those
    are for --debug, which shows Python's own format)."""
    print(f"latentdiff: warning: {one_line(str(message))}", file=file or sys.stderr)


def report(message: str, hint: str) -> None:
    """The two lines every error prints: the message on one line (however many the exception had), the hint."""
    print(f"latentdiff: error: {one_line(message)}\nhint: {one_line(hint)}", file=sys.stderr)


def one_line(text: str, limit: int = 2000) -> str:
    line = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def describe_foreign(error: BaseException) -> tuple[str, str] | None:
    """(message, hint) for errors of the libraries latentdiff uses that say enough by themselves, else None."""
    name = type(error).__name__
    if name == "DecompressionBombError":  # PIL's guard (kept on): an image claims more pixels than it may
        return f"image too large ({error})", "the image decoder refuses images past PIL's decompression-bomb limit"
    if name == "SafetensorError":  # e.g. a write that ran out of disk space
        return f"safetensors error ({error})", "check the free disk space and that the file is a complete download"
    if any(cls.__name__ == "YAMLError" for cls in type(error).__mro__):
        from ..config import yaml_problem

        return f"not valid YAML ({yaml_problem(error)})", "fix the file at that line and column"
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
