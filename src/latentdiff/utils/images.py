"""Images people can look at: PNG grids, with the generation parameters kept in the file; JPEG and WebP."""
from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .. import limits
from ..config import parse_json
from ..errors import InputError

PARAMS_KEY = "latentdiff"


def make_grid(images: Sequence[Image.Image], *, cols: int | None = None, pad: int = 2,
              background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile images (all the same size) into one image, row by row; cols defaults to a near-square grid."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), background)
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid


def save_png(image: Image.Image, path: str | os.PathLike, *, params: dict[str, Any] | None = None) -> Path:
    """Save as PNG atomically, with `params` as JSON in a text chunk (read back by `read_png_params`)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if params is not None:
        info.add_text(PARAMS_KEY, json.dumps(params, sort_keys=True))
        if "prompt" in params:
            info.add_text("parameters", parameters_text(params))
    _save_atomic(image, path, format="PNG", pnginfo=info)
    return path


# the file suffix -> PIL's format for `save_image`
SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
LOSSY_QUALITY = 95


def save_image(image: Image.Image, path: Path, params: dict[str, Any]) -> None:
    """Save in the format of path's suffix (.png, .jpg/.jpeg, .webp) atomically: PNG with `params` in its text
    chunks (`save_png`); JPEG and WebP at quality 95."""
    path = Path(path)
    kind = SAVE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputError("no image format for this suffix", where=str(path), expected=sorted(SAVE_FORMATS),
                         found=path.suffix or "no suffix")
    if kind == "PNG":
        save_png(image, path, params=params)
        return
    _save_atomic(image.convert("RGB"), path, format=kind, quality=LOSSY_QUALITY)


def _save_atomic(image: Image.Image, path: Path, **options: Any) -> None:
    """image.save(path, **options) under a temporary name, then renamed: never a half-written file at path."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        image.save(tmp, **options)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parameters_text(params: dict[str, Any]) -> str:
    """The `parameters` chunk in the layout of the AUTOMATIC1111 web UI, which image viewers and other tools
    show: the prompt, a "Negative prompt:" line, then "Key: value" settings. For people; `latentdiff` is read."""
    lines = [str(params["prompt"])]
    if params.get("negative"):
        lines.append(f"Negative prompt: {params['negative']}")
    labels = {"steps": "Steps", "sampler": "Sampler", "guidance": "CFG scale", "seed": "Seed", "eta": "Eta",
              "n": "Images", "model": "Model", "dtype": "Dtype", "latentdiff": "Version"}
    settings = [f"{label}: {params[key]}" for key, label in labels.items() if params.get(key) is not None]
    if params.get("width") and params.get("height"):
        settings.insert(4, f"Size: {params['width']}x{params['height']}")
    return "\n".join(lines + [", ".join(settings)])


def read_png_params(path: str | os.PathLike) -> dict[str, Any] | None:
    """The `params` a PNG was saved with by `save_png`, or None when it holds none."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}) or {}
        raw = text.get(PARAMS_KEY)
    return parse_json(raw, where=str(path)) if raw else None


def check_image_pixels(size: tuple[int, int], *, where: str) -> None:
    """Refuse to decode an image of more than limits.MAX_IMAGE_PIXELS pixels (PIL's own decompression-bomb
    limit, checked here too so that it holds even where `Image.MAX_IMAGE_PIXELS` was switched off): `size` is
    (width, height) from the header, read before any pixel is."""
    width, height = size
    if width * height > limits.MAX_IMAGE_PIXELS:
        raise InputError("the image is too large to decode (a decompression bomb?)", where=where,
                         expected=f"at most {limits.MAX_IMAGE_PIXELS} pixels (limits.MAX_IMAGE_PIXELS)",
                         found=f"{width} x {height} = {width * height} pixels")
