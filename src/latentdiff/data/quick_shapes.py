"""The quick shapes data set of the tiny training examples: one PIL-drawn shape on a plain background, any size.

`latentdiff data shapes DIR -n 512 --size 32` writes it (cli/data.py); the tiny configs under examples/train/
train on it. It draws the words of `latentdiff.data.shapes` (its palette, shapes and regions) with PIL at any
size, from Python's `random.Random(seed)`: quick, and byte for byte what the repository script
examples/train/make_shapes.py wrote before this command replaced it. The built-in model learns from the exact
64 x 64 set instead (`latentdiff.data.shapes.write_imagefolder`: exact geometry, the checker's regions).

Labels: "text" writes captions in the Hugging Face `imagefolder` convention (metadata.jsonl with file_name and
text: "a red circle on the left, blue background"); "classes" writes one folder per shape (circle/, square/,
triangle/). `write_word_tokenizer` writes a word-level BERT vocabulary of the caption words, for an LDM-BERT
text encoder trained from scratch (examples/train/tiny-text2img-ldm-bert.yaml).

A data set is never mixed with another: the folder is written under a temporary name and renamed into place,
and a folder that already holds files is replaced only with overwrite=True, and then only if everything in it
is what this module writes (PNGs, metadata.jsonl, the shape folders): an overwrite never deletes other files.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from .. import limits
from ..errors import InputError
from ..hub import atomic_folder
from .shapes import PALETTE, SHAPES, WHERE

# the centre (x, y) of each region, as fractions of the image side
PLACES = dict(zip(WHERE, ((0.28, 0.5), (0.72, 0.5), (0.5, 0.28), (0.5, 0.72), (0.5, 0.5)), strict=True))
LABELS = ("text", "classes")
LABEL_ALIASES = {"captions": "text"}                 # the old script's spelling
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json")
TOKENIZER_MAX_LENGTH = 16


def draw_shape(size: int, shape: str, color: tuple[int, int, int], background: tuple[int, int, int],
               center: tuple[float, float], radius: float) -> Image.Image:
    """A size x size RGB image: `shape` of half-width radius * size around center * size, filled with `color`."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cx, cy, r = center[0] * size, center[1] * size, radius * size
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return image


def check_labels(labels: str) -> str:
    """"text" or "classes" (the old script's "captions" is "text"), else an InputError naming the argument."""
    labels = LABEL_ALIASES.get(labels, labels)
    if labels not in LABELS:
        raise InputError("unknown labels", where="labels", expected=f"one of {LABELS}", found=repr(labels))
    return labels


def check_target(folder: Path, *, overwrite: bool, allowed: Callable[[Path], bool]) -> None:
    """Refuse a folder that holds anything unless overwrite=True, and then anything that `allowed` refuses
    (an overwrite replaces a data set, it never deletes other files); a path that is a file is refused too."""
    if folder.exists() and not folder.is_dir():
        raise InputError("the output path is a file, not a folder", where=str(folder),
                         expected="a new or empty folder", found="a file")
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise InputError("the output folder is not empty: a data set is never mixed with other files",
                         where=str(folder), expected="a new or empty folder (or --overwrite / overwrite=True to "
                         "replace the data set in it)", found=f"{len(entries)} entries, e.g. {entries[0].name!r}")
    foreign = [e for e in entries if not allowed(e)]
    if foreign:
        raise InputError("the folder holds files that this command does not write, so overwriting it would "
                         "delete them", where=str(folder / foreign[0].name),
                         expected="only PNG images, metadata.jsonl and the shape folders (remove the rest yourself)",
                         found=f"{len(foreign)} other entries")


def _is_data_set_entry(entry: Path) -> bool:
    if entry.is_symlink():
        return False
    if entry.is_file():
        return entry.suffix == ".png" or entry.name == "metadata.jsonl"
    return entry.is_dir() and entry.name in SHAPES and all(
        p.is_file() and not p.is_symlink() and p.suffix == ".png" for p in entry.iterdir())


def write_shapes_folder(folder: str | Path, count: int, *, size: int = 32, seed: int = 0, labels: str = "text",
                        overwrite: bool = False, progress: bool = False) -> Path:
    """Write `count` images (size x size) to `folder`, with metadata.jsonl captions (labels="text") or one folder
    per shape (labels="classes"); deterministic from `seed`. The bounds (limits.MAX_SHAPES_IMAGES,
    MIN_SHAPES_SIZE..MAX_SHAPES_SIZE) and the folder are checked before anything is drawn. progress: a bar on
    a terminal."""
    from tqdm import tqdm

    limits.check_count(count, key="count", at_least=1, at_most=limits.MAX_SHAPES_IMAGES, where="count (-n)",
                       error=InputError)
    limits.check_count(size, key="size", at_least=limits.MIN_SHAPES_SIZE, at_most=limits.MAX_SHAPES_SIZE,
                       where="size (--size)", error=InputError)
    limits.check_count(seed, key="seed", at_most=2**63 - 1, where="seed (--seed)", error=InputError)
    labels = check_labels(labels)
    folder = Path(folder)
    check_target(folder, overwrite=overwrite, allowed=_is_data_set_entry)
    rng = random.Random(seed)
    colors, places = sorted(PALETTE), sorted(PLACES)
    rows = []
    with atomic_folder(folder) as tmp:
        for i in tqdm(range(count), desc="shapes", unit="img", disable=None if progress else True,
                      mininterval=0.5):
            color, background = rng.sample(colors, 2)
            shape, place = rng.choice(SHAPES), rng.choice(places)
            x, y = PLACES[place]
            center = (x + rng.uniform(-0.04, 0.04), y + rng.uniform(-0.04, 0.04))
            image = draw_shape(size, shape, PALETTE[color], PALETTE[background], center, rng.uniform(0.14, 0.2))
            name = f"{shape}/{i:05d}.png" if labels == "classes" else f"{i:05d}.png"
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            image.save(tmp / name)
            rows.append({"file_name": name, "text": f"a {color} {shape} {place}, {background} background"})
        if labels == "text":
            (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def check_tokenizer_folder(folder: Path, *, overwrite: bool) -> None:
    """`check_target` for `write_word_tokenizer`: an overwrite may replace only its two files."""
    check_target(folder, overwrite=overwrite,
                 allowed=lambda e: e.is_file() and not e.is_symlink() and e.name in TOKENIZER_FILES)


def write_word_tokenizer(folder: str | Path, *, overwrite: bool = False) -> Path:
    """A BERT word-piece vocabulary holding every caption word (lower case), loadable by BertTokenizer:
    vocab.txt and tokenizer_config.json (16 positions). A folder holding other files is refused."""
    folder = Path(folder)
    check_tokenizer_folder(folder, overwrite=overwrite)
    words = {"a", "background", ","} | set(PALETTE) | set(SHAPES) | {w for p in PLACES for w in p.split()}
    with atomic_folder(folder) as tmp:
        (tmp / "vocab.txt").write_text("\n".join([*BERT_SPECIAL_TOKENS, *sorted(words)]) + "\n")
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"do_lower_case": True, "model_max_length": TOKENIZER_MAX_LENGTH, "tokenizer_class": "BertTokenizer"}))
    return folder
