"""CLIP's image preprocessing (Radford et al. 2021), as transformers' CLIPImageProcessor does it, without torchvision.

    pixels = clip_pixels(images, size=224)     # (B, 3, 224, 224) float32, what a CLIP vision tower takes

Each image: RGB; the shorter side resized to `size` with PIL's bicubic filter (the longer side to
int(size x long / short), the rounding transformers uses), the centre size x size square cut out (offsets
(H - size) // 2, (W - size) // 2), x / 255, then normalised with CLIP's mean and std per channel. PIL images and
uint8 arrays go through PIL as they are, pixel for pixel as transformers' processor; float arrays and tensors (any
input `pipelines.images` accepts) are read as images first and rounded to 8 bits for PIL's resize (transformers
truncates them instead: one step of 1/255 apart at most).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .images import image_to_tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP's training-set channel statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images: Any, *, size: int = 224, name: str = "ip_adapter_image") -> torch.Tensor:
    """An image or a list of them (PIL, numpy, torch: `pipelines.images`) -> (B, 3, size, size) float32."""
    from PIL import Image

    items = list(images) if isinstance(images, (list, tuple)) else [images]
    pils: list[Any] = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]" if isinstance(images, (list, tuple)) else name
        if isinstance(item, Image.Image):
            pils.append(item.convert("RGB"))
            continue
        batch = image_to_tensor(item, name=where)   # (b, 3, H, W) in [-1, 1]
        arrays = ((batch + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        pils.extend(Image.fromarray(a) for a in arrays)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]
    out = []
    for pil in pils:
        width, height = pil.size
        short, long = min(width, height), max(width, height)
        new_long = int(size * long / short)
        resized = pil.resize((size, new_long) if width <= height else (new_long, size), Image.Resampling.BICUBIC)
        array = np.asarray(resized)
        top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
        crop = array[top:top + size, left:left + size].transpose(2, 0, 1)
        unit = (crop.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append(torch.from_numpy((unit - mean) / std))
    return torch.stack(out)
