"""Images people can look at: PNG grids, with the generation parameters kept in the file.

Every file `latentdiff generate` writes carries its settings twice: latentdiff's JSON (read back by `--from`) and
the AUTOMATIC1111 web UI's "parameters" text (`utils.infotext`), which A1111, its extensions and image viewers
read. In a PNG they are the text chunks `latentdiff` and `parameters`; in a JPEG or WebP file the A1111 text is the
EXIF UserComment, as A1111 writes it ("UNICODE\\0" then UTF-16 big-endian, piexif's "unicode" encoding), and the
JSON an XMP packet (`latentdiff:params`).
"""
from __future__ import annotations

import errno
import html
import io
import json
import math
import os
import re
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .. import limits
from ..config import parse_json
from ..errors import InputError
from .infotext import format_infotext

PARAMS_KEY = "latentdiff"
INFOTEXT_KEY = "parameters"
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286          # the Exif sub-IFD and its UserComment tag
UNICODE_PREFIX = b"UNICODE\0"                    # EXIF 2.3 character code of a UserComment in Unicode
JPEG_QUALITY = 95
XMP_NAMESPACE = "https://latentdiff.invalid/ns/1.0/"
_XMP_PARAMS = re.compile(r"<latentdiff:params>(.*?)</latentdiff:params>", re.DOTALL)
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


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


def _commit(tmp: Path, path: Path, *, replace: bool) -> None:
    """Move the finished temporary file to `path`: replacing what is there (os.replace), or, with replace=False,
    never over a file (a hard link fails with FileExistsError if `path` exists: no window between a check and
    the rename; where the file system has no hard links, a check and a rename)."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:      # no hard links here (some network / FAT file systems)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)


def save_png(image: Image.Image, path: str | os.PathLike, *, params: dict[str, Any] | None = None,
             replace: bool = True) -> Path:
    """Save as PNG atomically, with `params` as JSON in a text chunk (read back by `read_png_params`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=_png_info(params))
        _commit(tmp, path, replace=replace)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _png_info(params: dict[str, Any] | None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if params is not None:
        info.add_text(PARAMS_KEY, json.dumps(params, sort_keys=True))
        if "prompt" in params:
            info.add_text(INFOTEXT_KEY, parameters_text(params))   # iTXt (UTF-8) where Latin-1 cannot hold it
    return info


def png_bytes(image: Image.Image, params: dict[str, Any] | None = None) -> bytes:
    """The PNG file `save_png` writes, in memory (the server's responses): the same two text chunks."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(params))
    return buffer.getvalue()


def parameters_text(params: dict[str, Any]) -> str:
    """The `parameters` chunk in the layout of the AUTOMATIC1111 web UI (`utils.infotext.format_infotext`), which
    A1111, image viewers and other tools read; `latentdiff generate --from` reads it back from images A1111 made."""
    return format_infotext(params)


def save_image(image: Image.Image, path: Path, params: dict, *, replace: bool = True) -> None:
    """Save as PNG, JPEG or WebP (by the suffix of `path`) atomically, with `params` in the file: PNG text chunks
    (`save_png`), or for JPEG / WebP (quality 95) the A1111 text in the EXIF UserComment and the JSON in XMP."""
    path = Path(path)
    image_format = FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise InputError("unknown image format", where=str(path), expected=sorted(FORMATS), found=path.suffix)
    if image_format == "PNG":
        save_png(image, path, params=params, replace=replace)
        return
    options: dict[str, Any] = {"quality": JPEG_QUALITY}
    if params is not None:
        exif = Image.Exif()
        exif[EXIF_IFD] = {USER_COMMENT: UNICODE_PREFIX + parameters_text(params).encode("utf-16-be")}
        options.update(exif=exif.tobytes(), xmp=_xmp_packet(json.dumps(params, sort_keys=True)))
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        image.convert("RGB").save(tmp, format=image_format, **options)
        _commit(tmp, path, replace=replace)
    finally:
        tmp.unlink(missing_ok=True)


def _xmp_packet(text: str) -> bytes:
    body = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:latentdiff="{XMP_NAMESPACE}"><latentdiff:params>'
            f'{html.escape(text, quote=False)}</latentdiff:params></rdf:Description></rdf:RDF></x:xmpmeta>')
    return f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>{body}<?xpacket end="w"?>'.encode()


def read_image_params(path: str | os.PathLike) -> tuple[Any, str | None]:
    """(latentdiff's JSON params or None, the A1111 parameters text or None) of a PNG, JPEG or WebP file: what
    `save_image` writes, or what A1111 writes (its `parameters` chunk, its EXIF UserComment). The JSON is
    parsed (nesting bounded: config.parse_json); the text is returned as stored."""
    with Image.open(path) as image:
        text = getattr(image, "text", None) or {}
        raw, infotext = text.get(PARAMS_KEY), text.get(INFOTEXT_KEY)
        if raw is None and image.info.get("xmp"):
            xmp = image.info["xmp"]
            if len(xmp) > limits.MAX_XMP_BYTES:
                raise ValueError(f"an XMP packet of {len(xmp)} bytes (at most {limits.MAX_XMP_BYTES} are read)")
            match = _XMP_PARAMS.search(xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else str(xmp))
            raw = html.unescape(match.group(1)) if match else None
        if infotext is None:
            infotext = user_comment(_exif_comment(image))
    return (parse_json(raw, where=str(path)) if raw else None), infotext


def _exif_comment(image: Image.Image) -> Any:
    """The raw EXIF UserComment of an open image, None where it has none or its EXIF does not read."""
    try:
        return image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return None


def user_comment(value: Any) -> str | None:
    """An EXIF UserComment as text: "UNICODE\\0" + UTF-16 (big-endian as piexif writes it; little-endian as some
    tools do, told apart by where the zero bytes of ASCII characters fall), "ASCII\\0\\0\\0" + ASCII, or bytes without
    a character code read as UTF-8. None when there is none."""
    if isinstance(value, str):
        return value or None
    if not isinstance(value, bytes) or not value:
        return None
    # a longer text is refused by utils.infotext.parse_infotext: decode no more than it reads
    code, data = value[:8], value[8:8 + 4 * (limits.MAX_INFOTEXT_CHARS + 1)]
    if code == UNICODE_PREFIX:
        little = data[1::2].count(0) > data[0::2].count(0)
        text = data.decode("utf-16-le" if little else "utf-16-be", "replace")
    elif code.rstrip(b"\0") in (b"ASCII", b""):     # ASCII, or the undefined code (eight zero bytes)
        text = data.decode("utf-8", "replace")
    else:
        text = value.decode("utf-8", "replace")
    return text.rstrip("\0") or None


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
