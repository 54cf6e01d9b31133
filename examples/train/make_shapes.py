"""A small procedural data set for the tiny training configs: one colored shape on a plain background.

A quick, PIL-drawn variant for smoke runs at any size; the built-in model learns from `latentdiff.data.shapes`
(exact geometry, the checker's regions), written by `latentdiff.data.shapes.write_imagefolder`.

    python examples/train/make_shapes.py data/shapes --count 512 --size 32                 # captions
    python examples/train/make_shapes.py data/shapes-classes --count 512 --labels classes  # class folders
    python examples/train/make_shapes.py data/shapes --count 512 --write-tokenizer data/shapes-tokenizer

Captions follow the Hugging Face `imagefolder` convention (metadata.jsonl with file_name and text):
"a red circle on the left, blue background". With --labels classes the images go to one folder per shape.
--write-tokenizer writes a word-level BERT vocabulary of the caption words, for an LDM-BERT text encoder
trained from scratch (examples/train/tiny-text2img-ldm-bert.yaml). Deterministic from --seed.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 40),
          "white": (240, 240, 240), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"on the left": (0.28, 0.5), "on the right": (0.72, 0.5), "at the top": (0.5, 0.28),
          "at the bottom": (0.5, 0.72), "in the center": (0.5, 0.5)}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def draw_shape(size: int, shape: str, color: tuple[int, int, int], background: tuple[int, int, int],
               center: tuple[float, float], radius: float) -> Image.Image:
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


def make_shapes(folder: str | Path, *, count: int = 256, size: int = 32, seed: int = 0,
                labels: str = "captions") -> Path:
    """Write `count` images (size x size) to `folder`, with metadata.jsonl captions or class folders."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        color, background = rng.sample(sorted(COLORS), 2)
        shape, place = rng.choice(SHAPES), rng.choice(sorted(PLACES))
        x, y = PLACES[place]
        center = (x + rng.uniform(-0.04, 0.04), y + rng.uniform(-0.04, 0.04))
        image = draw_shape(size, shape, COLORS[color], COLORS[background], center, rng.uniform(0.14, 0.2))
        name = f"{shape}/{i:05d}.png" if labels == "classes" else f"{i:05d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / name)
        rows.append({"file_name": name, "text": f"a {color} {shape} {place}, {background} background"})
    if labels == "captions":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def write_word_tokenizer(folder: str | Path) -> Path:
    """A BERT word-piece vocabulary holding every caption word (lower case), loadable by BertTokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = {"a", "background", ","} | set(COLORS) | set(SHAPES) | {w for p in PLACES for w in p.split()}
    (folder / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, *sorted(words)]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 16,
                                                              "tokenizer_class": "BertTokenizer"}))
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", choices=("captions", "classes"), default="captions")
    parser.add_argument("--write-tokenizer", default=None, metavar="FOLDER")
    args = parser.parse_args()
    print(make_shapes(args.folder, count=args.count, size=args.size, seed=args.seed, labels=args.labels))
    if args.write_tokenizer:
        print(write_word_tokenizer(args.write_tokenizer))
