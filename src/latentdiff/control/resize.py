"""`fit(image, size, mode=...)`: an image brought to the generation size (height, width) with the AUTOMATIC1111
web UI's resize modes, so that a hint or an init image lands where A1111 puts it.

    0  just resize       stretched to the size (the aspect ratio may change)
    1  crop and resize   scaled to cover the size, then the centre cropped
    2  resize and fill   scaled to fit inside, the borders filled by stretching the picture's edge rows/columns
    None                 no resize: an image of another size is an error (a hint must already match)
"""
from __future__ import annotations

from PIL import Image

from ..errors import InputError

RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill"}


def fit(image: Image.Image, size: tuple[int, int], *, mode: int | None, name: str = "image") -> Image.Image:
    """`image` at (height, width) = `size` by A1111 resize mode `mode` (module docstring); `name` is what an error
    calls the image (a hint of the wrong size with `mode=None`, an unknown mode)."""
    height, width = size
    if mode is not None and mode not in RESIZE_MODES:
        raise InputError("unknown resize mode", where=name,
                         expected=f"one of {sorted(RESIZE_MODES)} ({', '.join(RESIZE_MODES.values())}) or None",
                         found=repr(mode))
    if image.size == (width, height):
        return image
    if mode is None:
        raise InputError("the image is not of the generation size and no resize mode was given", where=name,
                         expected=f"{width} x {height} (width x height), or a resize mode 0, 1 or 2",
                         found=f"{image.width} x {image.height}")
    if mode == 0:
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratio = width / height
    src_ratio = image.width / image.height
    cover = mode == 1
    if (ratio > src_ratio) == cover:       # the side that must match the target exactly
        w, h = width, max(1, round(width / src_ratio))
    else:
        w, h = max(1, round(height * src_ratio)), height
    resized = image.resize((w, h), Image.Resampling.LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    canvas.paste(resized, (left, top))
    if not cover:     # fill the borders with the nearest edge of the picture, stretched (as A1111 does)
        if top > 0:
            canvas.paste(resized.crop((0, 0, w, 1)).resize((w, top)), (left, 0))
            canvas.paste(resized.crop((0, h - 1, w, h)).resize((w, height - top - h)), (left, top + h))
        if left > 0:
            canvas.paste(resized.crop((0, 0, 1, h)).resize((left, h)), (0, top))
            canvas.paste(resized.crop((w - 1, 0, w, h)).resize((width - left - w, h)), (left + w, top))
    return canvas
