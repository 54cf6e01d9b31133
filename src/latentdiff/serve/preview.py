"""LatentPreview: the live preview of `/sdapi/v1/progress`, a linear map from latent channels to RGB; or, where a
tiny autoencoder fits the model (`latentdiff serve --preview-vae`, or the built-in model's own), the x0 prediction
decoded by it (`TinyDecoderPreview`: TAESD, the image itself).

Decoding the x0 prediction at every step would cost as much as the step itself (the decoder is the largest part
of a small model). A1111's "Approx NN" / "Approx cheap" previews show that a per-pixel linear map of the latent
channels already looks like the image: the autoencoder's latent at a position is mostly the colour of the
f x f patch above it. Rather than shipping a matrix per model family, the map is fitted per first stage:

    preview = LatentPreview.fit(pipe.vae)     # encodes 8 small synthetic images once (a few ms to a second)
    image = preview.image(denoised)           # (B, C, h, w) scaled latents -> PIL image (f h x f w), < 5 ms

The fit is least squares with a bias, rgb[p] = W^T z[p] + b, over pairs (latent of a pixel of the latent grid,
the mean colour of the image patch it covers): the images are encoded with the posterior's mode and scaled
exactly as the pipelines scale what they diffuse (`encode_latents(x, sample=False)`), and average-pooled to the
latent grid. So any first stage with `encode_latents` and `downsample_factor` works, VQ and pixel space included.

How close it gets depends on how linear the first stage is. Stable Diffusion's autoencoder is close to linear in
colour (A1111's fixed "Approx cheap" coefficients rely on it); the built-in model's small autoencoder was
trained on six flat colours only and is not: its preview shows those colours within about 0.16 (mean absolute
error on [0, 1]) and the layout of the image, not its exact shades.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any

import torch

from ..errors import InputError, describe
from ..utils.images import make_grid

FIT_SIDE = 64    # pixels of each synthetic image (at least 8 latent pixels: 8 x f when f > 8)


def synthetic_images(side: int) -> torch.Tensor:
    """8 images (8, 3, side, side) in [0, 1] spanning the colour cube: black, white, the primaries, two
    gradients over two channels each, and a quadrant pattern, so every channel varies independently."""
    ramp = torch.linspace(0, 1, side)
    across, down = ramp.view(1, side).expand(side, side), ramp.view(side, 1).expand(side, side)
    solid = [torch.tensor(c, dtype=torch.float32).view(3, 1, 1).expand(3, side, side)
             for c in ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.9, 0.1, 0.1), (0.1, 0.8, 0.2), (0.15, 0.2, 0.9))]
    gradients = [torch.stack([across, down, 1 - across]), torch.stack([1 - down, across * down, down])]
    half = side // 2
    quadrants = torch.zeros(3, side, side)
    quadrants[0, :half], quadrants[1, :, :half], quadrants[2, half:, half:] = 1.0, 0.7, 0.6
    return torch.stack([*solid, *gradients, quadrants]).contiguous()


@dataclasses.dataclass(frozen=True, eq=False)
class LatentPreview:
    """rgb = z . weight + bias per latent pixel, then nearest-upsampled by `factor`. weight (C, 3), bias (3,)."""

    weight: torch.Tensor
    bias: torch.Tensor
    factor: int            # the first stage's downsample factor: the preview has the image's size

    @classmethod
    def fit(cls, vae: Any, *, side: int = FIT_SIDE) -> LatentPreview:
        """Fit the map for `vae` (any first stage with `encode_latents` and `downsample_factor`)."""
        factor = int(vae.downsample_factor)
        side = max(side, 8 * factor)
        images = synthetic_images(side)                               # (N, 3, H, W) in [0, 1]
        parameter = next(iter(vae.parameters()), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None else torch.float32
        with torch.inference_mode():
            z = vae.encode_latents((images * 2 - 1).to(device=device, dtype=dtype), sample=False)
        z = z.float().cpu()                                           # (N, C, H/f, W/f)
        pooled = torch.nn.functional.avg_pool2d(images, factor)       # (N, 3, H/f, W/f)
        x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        y = pooled.permute(0, 2, 3, 1).reshape(-1, 3)
        x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
        solution = torch.linalg.lstsq(x, y.double(), driver="gelsd").solution.float()   # (C + 1, 3)
        return cls(solution[:-1].contiguous(), solution[-1].contiguous(), factor)

    @property
    def channels(self) -> int:
        return self.weight.shape[0]

    def rgb(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, h, w) latents of any float dtype and device -> (B, h, w, 3) float32 in [0, 1], on the CPU."""
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != self.channels:
            raise InputError("preview latents have the wrong shape", where="LatentPreview",
                             expected=f"(B, {self.channels}, h, w)", found=describe(z))
        z = z.detach().to(device="cpu", dtype=torch.float32)
        return torch.einsum("bchw,cd->bhwd", z, self.weight).add_(self.bias).clamp_(0, 1)

    def image(self, z: torch.Tensor, *, grid: bool = False) -> Any:
        """The preview of latents z (B, C, h, w): the first sample (or all of them in a grid) as an RGB PIL image
        of f h x f w pixels, the size of the image being made."""
        from PIL import Image

        rgb = self.rgb(z if grid else z[:1])
        pixels = rgb.mul_(255).round_().to(torch.uint8)
        if self.factor > 1:
            pixels = pixels.repeat_interleave(self.factor, dim=1).repeat_interleave(self.factor, dim=2)
        images = [Image.fromarray(p.numpy(), "RGB") for p in pixels]
        return images[0] if len(images) == 1 else make_grid(images)


@dataclasses.dataclass(frozen=True, eq=False)
class TinyDecoderPreview:
    """The live preview decoded by a tiny autoencoder (TAESD): the image itself, not a projection, at a fraction
    of the full decoder's cost. The same `image(z, grid=)` as LatentPreview; `lock` serialises the decodes (one
    autoencoder, the progress route's threads)."""

    vae: Any
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def image(self, z: torch.Tensor, *, grid: bool = False) -> Any:
        from ..pipelines.previews import decode_preview

        with self.lock:
            images = decode_preview(self.vae, z if grid else z[:1])
        return images[0] if len(images) == 1 else make_grid(images)


def tiny_preview_for(vae: Any, model: str, preview_vae: str | None) -> TinyDecoderPreview | None:
    """A TAESD preview for a pipeline whose first stage is `vae`: from `preview_vae` (--preview-vae), else the
    built-in tiny autoencoder of a built-in `model`; None when neither exists or its latent space does not fit."""
    from ..builtin import BUILTIN_TINY_AUTOENCODERS, builtin_path
    from ..models.autoencoder_tiny import load_tiny_autoencoder

    source = preview_vae or BUILTIN_TINY_AUTOENCODERS.get(model)
    if source is None or (preview_vae is None and builtin_path(source) is None):   # not shipped (a stand-in)
        return None
    parameter = next(iter(vae.parameters()), None)
    tiny = load_tiny_autoencoder(source, device=parameter.device if parameter is not None else None)
    if (tiny.latent_channels, tiny.downsample_factor) != (vae.latent_channels, vae.downsample_factor):
        return None
    return TinyDecoderPreview(tiny.eval())


__all__ = ["LatentPreview", "TinyDecoderPreview", "synthetic_images", "tiny_preview_for"]
