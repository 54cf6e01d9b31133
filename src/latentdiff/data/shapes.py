"""Shapes: the procedural captioned data set the built-in model learns from.

Each item is a 64x64 RGB image of one flat shape on a plain background, and its caption

    "a {color} {shape} {where}, {background} background"      e.g. "a red circle on the left, blue background"

Geometry (see docs/shapes.md). Coordinates are continuous pixels: x to the right, y down, the image spans
[0, 64) x [0, 64), pixel (row i, column j) covers [j, j+1) x [i, i+1) and its center is (j + 0.5, i + 0.5);
the image center is (32, 32). A shape's `center` is its area centroid (for the triangle too), its `size`
the width of its bounding box: circle diameter, square side, triangle side (equilateral, apex up).

Regions. With (dx, dy) = center - (32, 32):
    "in the center":  |dx| <= 3 and |dy| <= 3                          (CENTER_JITTER)
    "on the left":    dx in [-18, -12], |dy| <= 4 (right, top, bottom: the same along their axis)
Every region is decided by `where_of`: "in the center" when max(|dx|, |dy|) < 7.5 (REGION_BOUNDARY),
else the side of the larger offset. Rendered centers lie >= 4.5 px from that boundary, and off center
their |dx| and |dy| differ by >= 8 px, so the region of a sample is never a matter of a pixel.

Sizes are drawn from [12, 20]: with the offsets above every shape stays >= 2 px inside the image, so the
one-pixel border is pure background. Anti-aliasing: each pixel is the exact mean of a 4x4 grid of point
samples (coverage c in {0, 1/16, ..., 1}), pixel = background * (1 - c) + color * c, rounded to uint8.

Determinism: item i of a data set with seed s is drawn from `np.random.default_rng((s, i))` alone, so it
does not depend on the data set's length, the order of access, or any global random state.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import is_int
from ..errors import InputError, describe
from ..hub import atomic_folder

IMAGE_SIZE = 64
CENTER = IMAGE_SIZE / 2                     # (32, 32): the image center in continuous pixel coordinates
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (235, 205, 40), "white": (240, 240, 240), "black": (25, 25, 25),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
WHERE = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
# unit direction of each off-center region: (dx, dy), y down
DIRECTIONS = {"on the left": (-1, 0), "on the right": (1, 0), "at the top": (0, -1), "at the bottom": (0, 1)}

SIZE_RANGE = (12.0, 20.0)       # bounding-box width, px
OFFSET_RANGE = (12.0, 18.0)     # off-center regions: distance of the centroid from the center along the axis
CROSS_JITTER = 4.0              # off-center regions: |offset| across the axis is at most this
CENTER_JITTER = 3.0             # "in the center": |dx|, |dy| at most this
REGION_BOUNDARY = 7.5           # where_of: max(|dx|, |dy|) below this is "in the center"
SUPERSAMPLE = 4                 # point samples per pixel side for the anti-aliased coverage
SQRT3 = math.sqrt(3.0)

CAPTION_PATTERN = re.compile(r"a (?P<color>\w+) (?P<shape>\w+) (?P<where>(?:on|at|in) the \w+), "
                             r"(?P<background>\w+) background")
CAPTION_FORMAT = "a {color} {shape} {where}, {background} background"
CONDITIONING_FOLDER = "conditioning"        # write_imagefolder's control images, and their metadata column:
CONDITIONING_COLUMN = "conditioning_image"  # the names of diffusers' ControlNet training data


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What a caption says: the four words the checker verifies."""

    color: str
    shape: str
    where: str
    background: str


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """One image: its caption's attributes, the shape's size (bounding-box width, px) and its area
    centroid `center` = (x, y) in continuous pixel coordinates (see the module docstring)."""

    color: str
    shape: str
    where: str
    background: str
    size: float
    center: tuple[float, float]

    @property
    def attributes(self) -> Attributes:
        return Attributes(self.color, self.shape, self.where, self.background)


# ---- sampling, rendering, captions -------------------------------------------------------------------
def sample_spec(rng: np.random.Generator) -> ShapeSpec:
    """Draw one spec: color, shape and region uniformly, the background uniformly among the other five
    colors, then size and position uniformly within the documented ranges."""
    color = COLORS[rng.integers(len(COLORS))]
    others = [c for c in COLORS if c != color]
    background = others[rng.integers(len(others))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    where = WHERE[rng.integers(len(WHERE))]
    size = float(rng.uniform(*SIZE_RANGE))
    if where == "in the center":
        dx, dy = rng.uniform(-CENTER_JITTER, CENTER_JITTER, size=2)
    else:
        along, across = rng.uniform(*OFFSET_RANGE), rng.uniform(-CROSS_JITTER, CROSS_JITTER)
        ux, uy = DIRECTIONS[where]
        dx, dy = ux * along + uy * across, uy * along + ux * across
    return ShapeSpec(color, shape, where, background, size, (float(CENTER + dx), float(CENTER + dy)))


def where_of(center: tuple[float, float]) -> str:
    """The region of a centroid (x, y): "in the center" when max(|dx|, |dy|) < REGION_BOUNDARY, else the
    side of the larger offset from the image center (ties, which no sample comes near, go to left/right)."""
    dx, dy = center[0] - CENTER, center[1] - CENTER
    if max(abs(dx), abs(dy)) < REGION_BOUNDARY:
        return "in the center"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def triangle_vertices(size: float, center: tuple[float, float]) -> np.ndarray:
    """(3, 2) vertices (x, y) of the apex-up equilateral triangle of side `size` whose centroid is `center`:
    the apex is 2/3 of the height above the centroid, the base 1/3 below."""
    cx, cy = center
    height = size * SQRT3 / 2
    return np.array([[cx, cy - 2 * height / 3], [cx - size / 2, cy + height / 3], [cx + size / 2, cy + height / 3]])


def coverage(shape: str, size: float, center: tuple[float, float], *, supersample: int = SUPERSAMPLE,
             image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(H, W) float64 in [0, 1]: the fraction of each pixel's supersample x supersample point grid that lies
    inside the shape (a point on the boundary counts as inside)."""
    if shape not in SHAPES:
        raise InputError("unknown shape", where="shape", expected=f"one of {SHAPES}", found=shape)
    offsets = (np.arange(supersample) + 0.5) / supersample
    axis = (np.arange(image_size)[:, None] + offsets[None, :]).reshape(-1)   # sample coordinates along one axis
    x, y = axis[None, :] - center[0], axis[:, None] - center[1]              # relative to the centroid
    if shape == "circle":
        inside = x * x + y * y <= (size / 2) ** 2
    elif shape == "square":
        inside = (np.abs(x) <= size / 2) & (np.abs(y) <= size / 2)
    else:
        # apex-up triangle around its centroid: below the two slanted sides, above the base
        height = size * SQRT3 / 2
        inside = (y <= height / 3) & (SQRT3 * np.abs(x) <= y + 2 * height / 3)
    return inside.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))


def render(spec: ShapeSpec) -> Image.Image:
    """The 64x64 RGB image of `spec` (anti-aliased by 4x4 supersampled coverage)."""
    for name in (spec.color, spec.background):
        if name not in PALETTE:
            raise InputError("unknown color", where="ShapeSpec", expected=f"one of {COLORS}", found=name)
    c = coverage(spec.shape, spec.size, spec.center)[..., None]
    color, background = np.array(PALETTE[spec.color], float), np.array(PALETTE[spec.background], float)
    pixels = background * (1 - c) + color * c
    return Image.fromarray(np.rint(pixels).astype(np.uint8), mode="RGB")


def caption(spec: ShapeSpec | Attributes) -> str:
    """"a {color} {shape} {where}, {background} background"."""
    return CAPTION_FORMAT.format(color=spec.color, shape=spec.shape, where=spec.where, background=spec.background)


def parse_caption(text: str) -> Attributes:
    """The attributes of a caption of the grammar (surrounding whitespace and letter case aside); anything
    else is an InputError that names the part that does not fit."""
    if not isinstance(text, str):
        raise InputError("a caption must be a string", where="caption", found=describe(text))
    match = CAPTION_PATTERN.fullmatch(text.strip().lower())
    if match is None:
        raise InputError("the caption is outside the shapes grammar", where="caption",
                         expected=f'"{CAPTION_FORMAT}"', found=repr(text))
    words = match.groupdict()
    for part, allowed in (("color", COLORS), ("shape", SHAPES), ("where", WHERE), ("background", COLORS)):
        if words[part] not in allowed:
            raise InputError(f"the caption's {part} is not in the shapes grammar", where=f"caption {text!r}",
                             expected=f"one of {allowed}", found=repr(words[part]))
    if words["color"] == words["background"]:
        raise InputError("the shape's color equals the background (the shape would be invisible)",
                         where=f"caption {text!r}", expected="a color other than the background",
                         found=words["color"])
    return Attributes(**words)


# ---- data sets ---------------------------------------------------------------------------------------------
def _check_count(name: str, value: int, *, minimum: int) -> None:
    if not is_int(value) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}", where=name, expected=f">= {minimum}",
                         found=repr(value))


class ShapesDataset:
    """n items; item i -> (image, caption), drawn from `np.random.default_rng((seed, i))` alone, so item i
    is the same whatever n is and however the set is read."""

    def __init__(self, n: int, seed: int = 0):
        _check_count("n", n, minimum=0)
        _check_count("seed", seed, minimum=0)
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def spec(self, i: int) -> ShapeSpec:
        if not is_int(i):                # an int or a NumPy integer, not a bool
            raise TypeError(f"ShapesDataset indices are integers, not {type(i).__name__}")
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for a ShapesDataset of {self.n} items")
        return sample_spec(np.random.default_rng((self.seed, int(i) % self.n)))

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        spec = self.spec(i)
        return render(spec), caption(spec)

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        return (self[i] for i in range(self.n))


def write_imagefolder(folder: str | Path, n: int, seed: int = 0, *, overwrite: bool = False,
                      conditioning: Callable[[ShapeSpec], Image.Image] | None = None) -> Path:
    """Write n items as PNGs ("00000.png", ...) and `metadata.jsonl` ({"file_name", "text"} a line: the
    Hugging Face `imagefolder` convention that latentdiff's training data reads). The folder is built
    under a temporary name and renamed into place, so a crash leaves no half-written data set; an
    existing folder is replaced only with overwrite=True.

    conditioning: a control image per item, drawn from the item's geometry (e.g. `shapes_silhouette.silhouette`):
    written as "conditioning/00000.png" and named in a "conditioning_image" column, the layout of diffusers'
    ControlNet training data that `latentdiff train controlnet` reads.

    Train on it with `data.random_flip: false`: a horizontal flip swaps left and right under a fixed caption."""
    _check_count("n", n, minimum=1)
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise InputError("the data set folder already exists", where=str(folder),
                         expected="a new path (or overwrite=True)", found="an existing path")
    dataset = ShapesDataset(n, seed)
    width = max(5, len(str(n - 1)))
    rows = []
    with atomic_folder(folder) as tmp:
        if conditioning is not None:
            (tmp / CONDITIONING_FOLDER).mkdir()
        for i in range(n):
            spec = dataset.spec(i)
            name = f"{i:0{width}d}.png"
            render(spec).save(tmp / name, format="PNG")
            row = {"file_name": name, "text": caption(spec)}
            if conditioning is not None:
                row[CONDITIONING_COLUMN] = f"{CONDITIONING_FOLDER}/{name}"
                conditioning(spec).save(tmp / row[CONDITIONING_COLUMN], format="PNG")
            rows.append(json.dumps(row))
        (tmp / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


# ---- the word-level tokenizer ------------------------------------------------------------------------------
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
VOCABULARY = ("a", ",", "background", *COLORS, *SHAPES,
              *dict.fromkeys(word for where in WHERE for word in where.split()))
TOKENIZER_MAX_LENGTH = 16   # [CLS] + the longest caption's 10 words + [SEP], with room to spare


def write_tokenizer(folder: str | Path) -> Path:
    """Write a word-level tokenizer of the captions' words (the `tokenizers` library's `WordLevel` model) to
    `folder`: tokenizer.json + tokenizer_config.json, loadable by transformers' `PreTrainedTokenizerFast`.

    Lower-cased and NFKC-normalized, split on white space and punctuation, one id per word, `[UNK]` for any
    other word, "[CLS] ... [SEP]" around each prompt and `[PAD]` (id 0) after it, 16 positions."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *VOCABULARY))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": TOKENIZER_MAX_LENGTH,
                "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                "padding_side": "right", "truncation_side": "right"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return folder
