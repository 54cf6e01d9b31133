"""What the build_shapes_64*.py scripts share: their common flags, the shapes data written once, `latentdiff train`
run as a subprocess (resuming its last checkpoint), an output folder put into the package atomically, and the
evaluation report. Each script keeps its own stages; this module holds only the skeleton around them.

    from shapes_build import builtin_folder, install_folder, parse_args, train, write_data, write_report
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LATENTDIFF = (sys.executable, "-m", "latentdiff")


def builtin_folder(name: str) -> Path:
    """Where the built-in `latentdiff/<name>` lives in this checkout: src/latentdiff/builtin/<name>."""
    return HERE.parents[1] / "src" / "latentdiff" / "builtin" / name


def parse_args(doc: str, *, images: int, install: Path, what: str, eval_count: int = 200, overrides: bool = True,
               more: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The flags every build has (--images, --install, --eval-count and, with `overrides`, --set), then the
    script's own (`more` adds them). doc: the script's docstring (its first line is the description)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--images", type=int, default=images, help="training images")
    parser.add_argument("--install", default=str(install), help=f"where the packaged {what} goes ('' to skip)")
    parser.add_argument("--eval-count", type=int, default=eval_count, help="held-out images judged (0: no evaluation)")
    if overrides:
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                            help="override a value of the training config (repeatable)")
    if more is not None:
        more(parser)
    return parser.parse_args()


def run(*command: str) -> None:
    """Run a command, echoed, and print how long it took; a failure stops the build."""
    print("$", " ".join(command), flush=True)
    start = time.monotonic()
    subprocess.run(command, check=True)
    print(f"({time.monotonic() - start:.0f} s)", flush=True)


def train(kind: str, config: str, overrides: list[str]) -> None:
    """`latentdiff train KIND examples/train/CONFIG --resume latest --set ...` (from its last checkpoint, if any)."""
    sets = [arg for value in overrides for arg in ("--set", value)]
    run(*LATENTDIFF, "train", kind, str(HERE / config), "--resume", "latest", *sets)


def write_data(runs: Path, images: int, **options: Any) -> Path:
    """runs/data: `images` shapes images (latentdiff.data.shapes, seed 0: the base model's training stream) unless
    it is there already; options: write_imagefolder's (conditioning=...)."""
    from latentdiff.data.shapes import write_imagefolder

    if not (runs / "data").is_dir():
        write_imagefolder(runs / "data", images, seed=0, **options)
    return runs / "data"


def install_folder(target: Path, write: Callable[[Path], Any]) -> None:
    """Put a folder into the package atomically: `write` fills a temporary folder beside `target` (it does not
    exist yet), which then replaces `target`."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    print(f"installed {target}")


def write_report(runs: Path, report: dict[str, Any]) -> Path:
    """runs/eval.json."""
    path = runs / "eval.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
