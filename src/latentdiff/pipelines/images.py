"""Images, masks and segmentation maps given to a pipeline -> tensors, with every size checked before any model runs.

Accepted inputs (one image, or a list of them, which becomes a batch):

| input | image (`image_to_tensor`) | mask (`mask_to_tensor`) |
|---|---|---|
| `PIL.Image` | any mode, converted to RGB | any mode, converted to grayscale ("L") |
| `numpy.ndarray` | (H, W, C) or (B, H, W, C) | (H, W), (H, W, 1), (B, H, W) or (B, H, W, 1) |
| `torch.Tensor` | (C, H, W) or (B, C, H, W) | (H, W), (1, H, W), (B, H, W) or (B, 1, H, W) |

Values: uint8 arrays and tensors hold 0..255; floating-point images lie in [0, 1] (the range of a pipeline's
own `output_type="np"` / `"pt"` output, so outputs feed back in unchanged) or in [-1, 1], by diffusers' rule
(`VaeImageProcessor.preprocess`): a float batch whose minimum is below 0 is taken as [-1, 1], any other as
[0, 1] (so a [-1, 1] image with no negative value reads as [0, 1]: pass such images as (x + 1) / 2). Masks lie
in [0, 1]; bool masks are 0/1. Anything else is an InputError naming the argument.

A segmentation map (`layout_to_one_hot`) holds class ids - a PIL image of mode L, P, I or 1, or an integer
array / tensor (H, W) or (B, H, W) - or is already one-hot: a float or bool array / tensor (K, H, W) or
(B, K, H, W), channels first, K = the number of classes, values in [0, 1] (soft maps are allowed).

Results: an image becomes (B, C, H, W) float32 in [-1, 1], the autoencoder's range; a mask becomes
(B, 1, H, W) float32 in {0, 1}, binarized at 0.5 as diffusers' mask processor does (1 = repaint); a
segmentation map becomes (B, K, H, W) float32 one-hot.
Sizes, as diffusers': an image (and a mask) whose sides are not multiples of the autoencoder's factor f is resized
down to the nearest multiples (a UserWarning says so), and `size=` resizes to a given (H, W) (inpainting's
height / width, also rounded down): PIL images with Lanczos before conversion, arrays and tensors with
`F.interpolate` (nearest), as diffusers' `VaeImageProcessor.resize` does.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, describe

ImageInput = Any  # PIL.Image.Image | np.ndarray | torch.Tensor | a list of one kind
KINDS = "a PIL image, a numpy array or a torch tensor (or a list of one kind)"


def image_to_tensor(image: ImageInput, *, name: str = "image", channels: int = 3, factor: int = 1,
                    size: tuple[int | None, int | None] | None = None) -> torch.Tensor:
    """An image (or a batch) -> (B, channels, H, W) float32 in [-1, 1]; H and W multiples of `factor` (resized down
    to them, or to `size` rounded down, as diffusers' VaeImageProcessor). Floats with a negative minimum are taken
    as [-1, 1] (diffusers' rule), others as [0, 1]."""
    items = _as_list(image, name)
    items, target = _resize_pil(items, name=name, factor=factor, size=size)
    parts = [_one_image(item, name=f"{name}[{i}]" if _is_list(image) else name, channels=channels, signed=True)
             for i, item in enumerate(items)]
    x = _resize(_stack(parts, name), target, name=name, factor=factor, size=size)
    return x if bool(x.min() < 0) else x * 2.0 - 1.0


def mask_to_tensor(mask: ImageInput, *, name: str = "mask_image", size: tuple[int, int] | None = None,
                   factor: int = 1, resize_to: tuple[int, int] | None = None) -> torch.Tensor:
    """A mask (or a batch) -> (B, 1, H, W) float32 in {0, 1}: 1 where the image is to be repainted.

    size: the (H, W) of the image (after its resizing): the mask's sides, rounded down to multiples of `factor`
    as the image's were, must give it. resize_to: resize the mask to this (H, W) instead (inpainting's height /
    width, as diffusers' mask processor). Resized before the binarization at 0.5, as diffusers does.
    """
    items = _as_list(mask, name)
    check = size is not None and resize_to is None
    if check and _is_pil(items[0]):
        _check_mask_size((items[0].height, items[0].width), size, factor=factor, name=name)
    items, target = _resize_pil(items, name=name, factor=factor, size=resize_to)
    m = _stack([_one_mask(item, name=f"{name}[{i}]" if _is_list(mask) else name) for i, item in enumerate(items)],
               name)
    if check and target is None:
        _check_mask_size((int(m.shape[-2]), int(m.shape[-1])), size, factor=factor, name=name)
    m = _resize(m, target, name=name, factor=factor, size=resize_to)
    return (m >= 0.5).to(torch.float32)


def _check_mask_size(found: tuple[int, int], size: Any, *, factor: int, name: str) -> None:
    if (found[0] - found[0] % factor, found[1] - found[1] % factor) != tuple(size):
        raise InputError("the mask must have the size of the image", where=name,
                         expected=f"H, W = {tuple(size)}", found=f"H, W = {found}")


# ---- sizes, as diffusers' VaeImageProcessor ------------------------------------------------------------
def fitted_size(height: int, width: int, *, factor: int, name: str) -> tuple[int, int]:
    """(height, width) rounded down to multiples of `factor` (diffusers' get_default_height_width); an InputError
    when a side becomes 0."""
    fitted = (height - height % factor, width - width % factor)
    if min(fitted) <= 0:
        raise InputError(f"height and width must be at least the autoencoder factor {factor}", where=name,
                         expected=f"H, W >= {factor} (sides are rounded down to multiples of {factor})",
                         found=f"H, W = {height}, {width}")
    return fitted


def _resize_pil(items: list[Any], *, name: str, factor: int,
                size: tuple[int | None, int | None] | None) -> tuple[list[Any], tuple[int, int] | None]:
    """PIL items resized (Lanczos, before any mode conversion: diffusers' order) to `size` or their first item's
    size, rounded down to multiples of `factor`; -> (items, the size they now have, or None for non-PIL items)."""
    if not items or not _is_pil(items[0]):
        return items, None
    from PIL import Image

    if size is None and len({(item.height, item.width) for item in items}) > 1:
        return items, None      # refused by _stack: a batch has one size
    height, width = _given_or(size, (items[0].height, items[0].width))
    target = fitted_size(height, width, factor=factor, name=name)
    if size is None and target != (height, width):
        _note_resize(name, (height, width), target, factor)
    return [item if (item.height, item.width) == target
            else item.resize(target[::-1], resample=Image.Resampling.LANCZOS) for item in items], target


def _resize(x: torch.Tensor, done: tuple[int, int] | None, *, name: str, factor: int,
            size: tuple[int | None, int | None] | None) -> torch.Tensor:
    """x (B, C, H, W) resized (nearest, diffusers' F.interpolate default) to `size` or its own size rounded down to
    multiples of `factor`; `done`: the size PIL items were already resized to (nothing left to do)."""
    if done is not None:
        return x
    height, width = _given_or(size, (int(x.shape[-2]), int(x.shape[-1])))
    target = fitted_size(height, width, factor=factor, name=name)
    if target == tuple(x.shape[-2:]):
        return x
    if size is None:
        _note_resize(name, (height, width), target, factor)
    return F.interpolate(x, size=target)


def _given_or(size: Any, own: tuple[int, int]) -> tuple[int, int]:
    """`size` (H, W), a None side (or size None) taking the image's own."""
    height, width = size if size is not None else (None, None)
    return (own[0] if height is None else int(height), own[1] if width is None else int(width))


def _note_resize(name: str, found: tuple[int, int], target: tuple[int, int], factor: int) -> None:
    warnings.warn(f"{name}: {found[0]} x {found[1]} is not a multiple of the autoencoder factor {factor}; resized to "
                  f"{target[0]} x {target[1]} (as diffusers does)", UserWarning, stacklevel=4)


def layout_to_one_hot(layout: ImageInput, *, num_classes: int, name: str = "layout") -> torch.Tensor:
    """A segmentation map (or a batch) of class ids, or one-hot -> (B, num_classes, H, W) float32 on the CPU."""
    parts = [_one_layout(item, name=f"{name}[{i}]" if _is_list(layout) else name, num_classes=num_classes)
             for i, item in enumerate(_as_list(layout, name))]
    return _stack(parts, name)


def check_size(x: torch.Tensor, *, name: str, factor: int) -> None:
    """H and W of x (B, C, H, W) must be positive multiples of `factor` (the autoencoder's downsampling)."""
    height, width = x.shape[-2:]
    if height == 0 or width == 0 or height % factor or width % factor:
        raise InputError(f"height and width must be positive multiples of the autoencoder factor {factor}",
                         where=name, expected=f"H, W in {factor}, {2 * factor}, {3 * factor}, ...",
                         found=f"H, W = {height}, {width}")


def check_batch(n: int, batch_size: int, *, per_prompt: int, name: str) -> None:
    """n items must be 1, one per prompt (batch_size / per_prompt), or one per generated image (batch_size)."""
    if n not in (1, batch_size) and n * per_prompt != batch_size:
        raise InputError(f"{name} must hold one item, one per prompt, or one per generated image", where=name,
                         expected=f"batch 1, {batch_size // per_prompt} or {batch_size}", found=f"batch {n}")


def expand_batch(x: torch.Tensor, batch_size: int, *, per_prompt: int, name: str) -> torch.Tensor:
    """x: (n, ...) as `check_batch` allows -> (batch_size, ...). One item per prompt is repeated the way the
    prompt embeddings are (each prompt's images side by side)."""
    check_batch(x.shape[0], batch_size, per_prompt=per_prompt, name=name)
    if x.shape[0] == batch_size:
        return x
    if x.shape[0] == 1:
        return x.expand(batch_size, *x.shape[1:])
    return x.repeat_interleave(per_prompt, dim=0)


# ---- one item ----------------------------------------------------------------------------------
def _one_image(item: Any, *, name: str, channels: int, signed: bool = False) -> torch.Tensor:
    """-> (b, channels, H, W) float32 in [0, 1] (signed: floats in [-1, 1] too)."""
    if _is_pil(item):
        item = _pil_array(item, name=name, mode="RGB" if channels == 3 else "L")
    if isinstance(item, np.ndarray):
        if item.ndim not in (3, 4) or (item.ndim == 3 and channels == 1 and item.shape[-1] != 1):
            raise InputError("a numpy image must be (H, W, C) or (B, H, W, C)", where=name,
                             expected=f"C = {channels} in the last axis", found=f"shape {item.shape}")
        x = _to_unit(_from_numpy(item, name), name, signed=signed)
        x = (x[None] if x.ndim == 3 else x).permute(0, 3, 1, 2)
    elif isinstance(item, torch.Tensor):
        if item.ndim not in (3, 4):
            raise InputError("an image tensor must be (C, H, W) or (B, C, H, W)", where=name,
                             expected=f"C = {channels}", found=f"shape {tuple(item.shape)}")
        x = _to_unit(item, name, signed=signed)
        x = x[None] if x.ndim == 3 else x
    else:
        raise InputError("unsupported image type", where=name, expected=KINDS, found=describe(item))
    if x.shape[1] != channels:
        raise InputError(f"the image must have {channels} channels", where=name, expected=f"C = {channels}",
                         found=f"C = {x.shape[1]} (shape {tuple(x.shape)})")
    return x


def _one_mask(item: Any, *, name: str) -> torch.Tensor:
    """-> (b, 1, H, W) float32 in [0, 1]."""
    if _is_pil(item):
        item = _pil_array(item, name=name, mode="L")
    if isinstance(item, np.ndarray):
        if item.ndim in (3, 4) and item.shape[-1] == 1:  # (B, H, W, 1) or (H, W, 1): drop C
            item = item[..., 0]
        # (H, W, 3 or 4) would read as 3-4 masks of width 3-4: an RGB(A) array, refused.
        if item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[-1] in (3, 4)):
            raise InputError("a numpy mask must be (H, W), (H, W, 1), (B, H, W) or (B, H, W, 1)", where=name,
                             expected="one channel", found=f"shape {item.shape}")
        x = _to_unit(_from_numpy(item, name), name)
    elif isinstance(item, torch.Tensor):
        if item.ndim == 4 and item.shape[1] != 1 or item.ndim not in (2, 3, 4):
            raise InputError("a mask tensor must be (H, W), (1, H, W), (B, H, W) or (B, 1, H, W)", where=name,
                             expected="one channel", found=f"shape {tuple(item.shape)}")
        x = _to_unit(item, name)
        x = x[:, 0] if x.ndim == 4 else x
    else:
        raise InputError("unsupported mask type", where=name, expected=KINDS, found=describe(item))
    x = x[None] if x.ndim == 2 else x          # (H, W) -> (1, H, W); (1, H, W) and (B, H, W) stay
    return x[:, None]


def _one_layout(item: Any, *, name: str, num_classes: int) -> torch.Tensor:
    """-> (b, num_classes, H, W) float32: a one-hot map as it is (values checked), class ids one-hot encoded."""
    if _is_pil(item):
        if item.mode not in ("L", "P", "I", "I;16", "1"):
            raise InputError("a PIL segmentation map must hold class ids (colour-coded maps: map colours to ids first)",
                             where=name, expected="mode L, P, I or 1", found=f"mode {item.mode}")
        item = _pil_array(item, name=name).astype(np.int64)
    if isinstance(item, np.ndarray):
        item = _from_numpy(item, name)
    if not isinstance(item, torch.Tensor):
        raise InputError("unsupported segmentation map type", where=name, expected=KINDS, found=describe(item))
    x = item.detach().cpu()
    if x.is_floating_point() or x.dtype == torch.bool:  # one-hot (or soft) maps, channels first
        if x.ndim not in (3, 4) or x.shape[-3] != num_classes:
            raise InputError("a one-hot segmentation map must be (K, H, W) or (B, K, H, W), one channel per class",
                             where=name, expected=f"K = {num_classes}", found=f"shape {tuple(x.shape)}")
        x = _to_unit(x, name)
        return x[None] if x.ndim == 3 else x
    if x.is_complex() or x.ndim not in (2, 3):
        raise InputError("a segmentation map of class ids must be an integer (H, W) or (B, H, W)", where=name,
                         expected="integer ids (or a float one-hot (K, H, W))", found=f"{tuple(x.shape)} {x.dtype}")
    if x.numel():
        low, high = int(x.min()), int(x.max())  # one host check, before any work
        if low < 0 or high >= num_classes:
            raise InputError("class id out of range", where=name, expected=f"0 <= id < {num_classes}",
                             found=low if low < 0 else high)
    x = x[None] if x.ndim == 2 else x
    return F.one_hot(x.long(), num_classes).permute(0, 3, 1, 2).to(torch.float32)


def _pil_array(item: Any, *, name: str, mode: str | None = None) -> np.ndarray:
    """The pixels of a PIL image, decoded now: `Image.open` is lazy, so a truncated or corrupt file fails here,
    as an InputError naming the argument (PIL raises OSError, SyntaxError, ValueError ... by format)."""
    try:
        return np.asarray(item.convert(mode) if mode is not None else item)
    except Exception as e:  # noqa: BLE001 -- every decoder failure of every format
        source = getattr(item, "filename", None) or "an image"
        raise InputError("the image cannot be decoded (a truncated or corrupt file?)", where=name,
                         expected="a complete image", found=f"{source}: {type(e).__name__}: {e}") from None


def _from_numpy(item: np.ndarray, name: str) -> torch.Tensor:
    if item.dtype.kind not in "buif":
        raise InputError("unsupported image dtype", where=name, expected="uint8 (0..255), bool or float in [0, 1]",
                         found=str(item.dtype))
    return torch.from_numpy(np.array(item))  # a copy: PIL's arrays are read-only


def _to_unit(x: torch.Tensor, name: str, *, signed: bool = False) -> torch.Tensor:
    """uint8 0..255, bool, or float in [0, 1] -> float32 in [0, 1], on the CPU (one host check, before any work).
    signed: floats with a negative minimum must lie in [-1, 1] and are returned as they are (diffusers' rule)."""
    x = x.detach().cpu()
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255.0
    if x.dtype == torch.bool:
        return x.to(torch.float32)
    if not x.is_floating_point():
        raise InputError("unsupported image dtype", where=name, expected="uint8 (0..255), bool or float in [0, 1]",
                         found=str(x.dtype))
    x = x.to(torch.float32)
    if signed and x.numel() and bool(torch.isfinite(x).all()) and float(x.min()) < 0:
        if float(x.min()) < -1.0 or float(x.max()) > 1.0:
            raise InputError("a floating-point image with negative values is taken as [-1, 1]; its values must lie "
                             "there", where=name, expected="-1 <= values <= 1 (or 0 <= values <= 1)",
                             found=f"values in [{float(x.min()):.3g}, {float(x.max()):.3g}]")
        return x
    if x.numel() and not (bool(torch.isfinite(x).all()) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0):
        raise InputError("floating-point image values must lie in [0, 1]" + (" or [-1, 1]" if signed else ""),
                         where=name, expected="0 <= values <= 1",
                         found=f"values in [{float(x.nan_to_num().min()):.3g}, {float(x.nan_to_num().max()):.3g}]"
                               + ("" if bool(torch.isfinite(x).all()) else " and non-finite values"))
    return x


def _stack(parts: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    sizes = {tuple(p.shape[1:]) for p in parts}
    if len(sizes) > 1:
        raise InputError("all items of a batch must have the same size", where=name,
                         expected="one (C, H, W) for the list", found=sorted(sizes))
    return torch.cat(list(parts)) if len(parts) > 1 else parts[0]


def _as_list(value: Any, name: str) -> list[Any]:
    if _is_list(value):
        if not value:
            raise InputError("an empty list of images", where=name, expected="at least one image", found=[])
        kinds = {type(v).__name__ if not _is_pil(v) else "PIL.Image" for v in value}
        if len(kinds) > 1:
            raise InputError("a list of images must hold one kind", where=name, expected=KINDS, found=sorted(kinds))
        return list(value)
    if value is None:
        raise InputError("an image is required", where=name, expected=KINDS, found=None)
    return [value]


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _is_pil(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is a dependency
        return False
    return isinstance(value, Image.Image)
