"""`latentdiff generate --lora FILE[:W]` (repeatable): LoRA / LyCORIS files loaded onto the pipeline before the
run, each at its weight (default 1). FILE may also be a folder holding diffusers' `pytorch_lora_weights.safetensors`
or a built-in LoRA's name (`latentdiff/shapes-64-lcm-lora`): its file is used. The PNG records each as
{"path": absolute path, "weight": W, "sha256": ...};
`--from` loads the same files again (a warning when a file's sha256 changed since).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any

from ..errors import LatentDiffError, UsageError
from .generate_settings import GenerateSettings, warn

FLAG = "--lora"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"   # adapters.api's default file name in a folder


def add_lora_flags(gen: argparse.ArgumentParser) -> None:
    gen.add_argument(FLAG, action="append", default=None, metavar="FILE[:W]",
                     help="a LoRA / LyCORIS file (kohya / A1111 or diffusers) applied at weight W (default 1); "
                          "repeat for several")


def file_sha256(path: Path) -> str:
    """The file's sha256 (hex), read in 1 MiB blocks: what the PNGs record of every input file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse_flag(text: str) -> tuple[str, float]:
    """"FILE[:W]" -> (FILE, W); a tail that is no number belongs to the file name."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _entry(value: Any, *, where: str) -> tuple[str, float, str | None]:
    """A --lora flag or a recorded entry -> (path, weight, recorded sha256)."""
    if isinstance(value, str):
        path, weight = _parse_flag(value)
        return path, weight, None
    if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"].strip() \
            and isinstance(value.get("weight"), (int, float)) and not isinstance(value.get("weight"), bool) \
            and (value.get("sha256") is None or isinstance(value.get("sha256"), str)):
        return value["path"], float(value["weight"]), value.get("sha256")
    raise UsageError("bad LoRA entry", where=where, expected='FILE[:W], or {"path", "weight", "sha256"} in a PNG',
                     found=repr(value)[:200])


def lora_file(text: str) -> Path:
    """The LoRA file a --lora value names: a file; a folder's (or a built-in LoRA's) diffusers weight file."""
    from ..builtin import builtin_path

    path = Path(text).expanduser().resolve()
    folder = path if path.is_dir() else builtin_path(text)
    return (folder / DIFFUSERS_WEIGHT_NAME).resolve() if folder is not None else path


def settle_loras(args: argparse.Namespace, stored: dict[str, Any], settings: GenerateSettings) -> GenerateSettings:
    """--lora flags (or the --from PNG's record when none are given) checked: each file exists, its weight is a
    finite number; recorded as absolute paths with their sha256."""
    given = getattr(args, "lora", None)
    entries, where = (given, FLAG) if given else (stored.get("lora"), f"{args.from_png}: lora")
    if not entries:
        return dataclasses.replace(settings, lora=None)
    if not isinstance(entries, list):
        raise UsageError("bad LoRA list", where=where, expected="a list of LoRA entries", found=repr(entries)[:200])
    recorded = []
    for i, value in enumerate(entries):
        path_text, weight, old = _entry(value, where=f"{where}[{i}]")
        path = lora_file(path_text)
        if not path.is_file():
            raise UsageError("no such LoRA file", where=f"{where}[{i}]", expected="an existing file", found=str(path))
        if not math.isfinite(weight):
            raise UsageError("a LoRA weight must be a finite number", where=f"{where}[{i}]", expected="W in FILE:W",
                             found=weight)
        digest = file_sha256(path)
        if old is not None and old != digest:
            warn(f"{path} changed since {args.from_png} was made (its sha256 differs): the image will differ")
        recorded.append({"path": str(path), "weight": weight, "sha256": digest})
    return dataclasses.replace(settings, lora=recorded)


def apply_loras(pipe: Any, settings: GenerateSettings) -> None:
    """Load each recorded LoRA and activate them all at their weights."""
    if not settings.lora:
        return
    names = []
    for i, entry in enumerate(settings.lora):
        try:
            names.append(pipe.load_lora_weights(entry["path"], adapter_name=f"lora{i}_{Path(entry['path']).stem}"))
        except LatentDiffError as e:
            raise UsageError(e.message, where=f"{FLAG} {entry['path']}: {e.where}", expected=e.expected,
                             found=e.found) from None
    pipe.set_adapters(names, adapter_weights=[entry["weight"] for entry in settings.lora])
