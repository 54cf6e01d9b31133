"""Images in and out of the A1111 API: base64 inputs decoded with bounds, outputs as base64 PNGs carrying their
settings (latentdiff's JSON chunk and A1111's "parameters" text, no server paths), `/png-info`, and the files
`save_images` writes.

An input image is refused (a RequestError naming its JSON key) before it costs memory: its base64 text and its
bytes are bounded by `max_image_bytes` (413), its header's width x height by `max_pixels` before any pixel is
decoded (a decompression bomb is a 422), and anything PIL cannot read is a 422, never a 500.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import LatentDiffError
from ..utils.images import EXIF_IFD, INFOTEXT_KEY, USER_COMMENT, png_bytes, save_image, user_comment
from ..utils.infotext import parse_infotext
from .requests import RequestError

DATA_URL = re.compile(r"data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
WHITESPACE = re.compile(rb"\s+")
PATH_KEYS = frozenset({"model", "vae", "init_image", "mask", "tokenizer", "path"})   # values that may name files
OUTPUT_NAME = re.compile(r"(\d{5,})-")
MAX_NUMBER_TRIES = 1000


def decode_image(value: Any, *, field: str, max_bytes: int, mode: str = "RGB",
                 max_pixels: int | None = None) -> Image.Image:
    """A base64 image (raw, or a `data:image/...;base64,` URL, as A1111 clients send both) -> a loaded PIL image in
    `mode`; RequestError naming `field` otherwise (413 when too large, 422 when it is not an image)."""
    return _open(image_bytes(value, field=field, max_bytes=max_bytes), field=field, mode=mode,
                 max_pixels=max_pixels)


def image_bytes(value: Any, *, field: str, max_bytes: int) -> bytes:
    """The bytes of a base64 image (checked: base64, at most `max_bytes`), not yet decoded as an image."""
    if not isinstance(value, str) or not value:
        raise RequestError("an image must be a base64 string", field=field, expected="base64 PNG / JPEG / WebP",
                           found=type(value).__name__ if not isinstance(value, str) else "an empty string")
    match = DATA_URL.match(value)
    text = value[match.end():] if match else value
    if len(text) > (max_bytes + 2) // 3 * 4 + 4096:   # base64 of max_bytes, with room for line breaks
        raise RequestError("the image is larger than the server accepts", field=field, status=413,
                           expected=f"at most {max_bytes} bytes", found=f"about {len(text) * 3 // 4} bytes")
    try:
        data = base64.b64decode(WHITESPACE.sub(b"", text.encode("ascii")), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise RequestError("the image is not valid base64", field=field, expected="base64 (RFC 4648), optionally "
                           "after a data:image/...;base64, prefix", found=repr(value[:40])) from None
    if len(data) > max_bytes:
        raise RequestError("the image is larger than the server accepts", field=field, status=413,
                           expected=f"at most {max_bytes} bytes", found=f"{len(data)} bytes")
    return data


def _open(data: bytes, *, field: str, mode: str, max_pixels: int | None) -> Image.Image:
    from ..limits import MAX_IMAGE_PIXELS

    limit = min(MAX_IMAGE_PIXELS, max_pixels or MAX_IMAGE_PIXELS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > limit:
                    raise RequestError("the image has too many pixels", field=field,
                                       expected=f"at most {limit} pixels", found=f"{width} x {height}")
                image.seek(0)              # an animation: its first frame, as A1111 reads it
                return image.convert(mode)
    except RequestError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, MemoryError) as exc:
        raise RequestError("the image does not decode", field=field, expected="a PNG, JPEG or WebP file",
                           found=f"{type(exc).__name__}: {str(exc)[:120]}") from None


def public_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with every value that names a file on this server (model, vae, init_image, mask, LoRA and
    embedding paths) cut to its file name: a PNG sent to a client tells it nothing about the server's disk."""
    def clean(key: str, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(k, v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(key, v) for v in value]
        if key in PATH_KEYS and isinstance(value, str) and _is_path(value):
            return re.split(r"[\\/]", value)[-1]
        return value

    return {key: clean(key, value) for key, value in params.items()}


def _is_path(value: str) -> bool:
    return os.path.isabs(value) or value.startswith(("~", ".", "\\")) or bool(re.match(r"[A-Za-z]:[\\/]", value))


def encode_png(image: Image.Image, params: Mapping[str, Any]) -> str:
    """The base64 PNG A1111 responses carry (no data: prefix), with both text chunks (utils.images.png_bytes)."""
    return base64.b64encode(png_bytes(image, public_params(params))).decode("ascii")


def png_info(data: Any, *, max_bytes: int, max_pixels: int | None = None) -> dict[str, Any]:
    """`/sdapi/v1/png-info`: {"image": base64} -> {"info": the A1111 parameters text ("" when none), "items": the
    image's other text chunks, "parameters": the text parsed (A1111's keys: "Prompt", "Negative prompt", each
    setting, "Size-1" / "Size-2"; {} when it does not parse)}."""
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object", field="body", expected='{"image": base64}',
                           found=type(data).__name__)
    raw = image_bytes(data.get("image"), field="image", max_bytes=max_bytes)
    _open(raw, field="image", mode="RGB", max_pixels=max_pixels)   # refuse what is not an image, or a bomb
    with Image.open(io.BytesIO(raw)) as opened:
        chunks = {str(k): v for k, v in (getattr(opened, "text", None) or {}).items() if isinstance(v, str)}
        info = chunks.pop(INFOTEXT_KEY, None)
        if info is None:
            try:
                info = user_comment(opened.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT))
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                info = None
    return {"info": info or "", "items": chunks, "parameters": parsed_parameters(info)}


def parsed_parameters(info: str | None) -> dict[str, Any]:
    """A1111's parameters text as the dict its png-info returns; {} when there is none or it does not parse."""
    if not info:
        return {}
    try:
        parsed = parse_infotext(info, where="image: parameters")
    except LatentDiffError:
        return {}
    out: dict[str, Any] = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative}
    for key, value in parsed.fields.items():
        size = re.fullmatch(r"(\d+)x(\d+)", value) if key.endswith("Size") or key == "Size" else None
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    return out


def save_outputs(images: list[tuple[Image.Image, Mapping[str, Any], int]], folder: Path) -> list[Path]:
    """Write (image, params, seed) as `NNNNN-SEED.png` in `folder` (A1111's names: the next free number),
    atomically and never over a file (utils.images.save_image with replace=False: a name another writer took
    first is skipped to the next number)."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    number = _next_number(folder)
    for image, params, seed in images:
        for _ in range(MAX_NUMBER_TRIES):
            path = folder / f"{number:05d}-{seed}.png"
            number += 1
            try:
                save_image(image, path, public_params(params), replace=False)
            except FileExistsError:
                continue
            written.append(path)
            break
        else:
            raise RequestError("no free output file name", field="save_images", status=500,
                               expected="a free NNNNN-SEED.png name", found=str(number))
    return written


def _next_number(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := OUTPUT_NAME.match(p.name))]
    return max(numbers, default=-1) + 1
