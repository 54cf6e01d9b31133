"""What the command-line tests on the tiny stand-in for the built-in model share: running `latentdiff generate`
in-process, reading an image's pixels, and putting the stand-in in place of the built-in model, offline, in a test's
own folder. tests/cli/conftest.py builds the stand-in and offers that set-up as the `offline_builtin` fixture.

    go_offline(monkeypatch, tmp_path, folder)     # "latentdiff/shapes-64" is `folder`, no Hub, cwd = tmp_path
    assert generate_at_seed_0(PROMPT, "-o", "a.png") == 0
    pixels("a.png")                               # (H, W, 3) uint8
"""
from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import numpy as np
from PIL import Image

from latentdiff.cli import main
from tests._support.tiny_builtin import use_as_builtin

PROMPT = "a red circle on the left, blue background"   # words the stand-in's tokenizer knows
BUILTIN = "latentdiff/shapes-64"


def generate(*argv: object) -> int:
    """`latentdiff generate ARGV` in-process (arguments as strings); its exit status."""
    return main(["generate", *map(str, argv)])


def generate_at_seed_0(*argv: object) -> int:
    """`latentdiff generate` in-process, at seed 0 unless the arguments choose (--seed, --from)."""
    args = [*map(str, argv)]
    seed = [] if "--seed" in args or "--from" in args else ["--seed", "0"]
    return main(["generate", *args, *seed])


def pixels(path: str | Path) -> np.ndarray:
    """The image file's pixels as RGB: (H, W, 3) uint8."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def go_offline(monkeypatch, tmp_path: Path, folder: Path, name: str = BUILTIN) -> None:
    """For the rest of the test: `name` is the model in `folder`, the Hub is offline with an empty cache, and the
    working folder is tmp_path."""
    use_as_builtin(monkeypatch, folder, name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)
