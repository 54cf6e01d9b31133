"""FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net"): re-weigh the UNet's way up, with no training.

In the first two up levels (the coarsest), before every resnet that concatenates a skip:

    h[:, :C/2]  *= b                       the backbone: amplify half of the running features
    skip = IFFT(FFT(skip) * mask_s)        the skip: scale its lowest frequencies (the 2 x 2 centre of the
                                           shifted spectrum) by s, leaving the rest

with (b1, s1) at the coarsest up level and (b2, s2) at the next. These are the semantics diffusers released
(`UNet2DConditionModel.enable_freeu`, `apply_freeu` / `fourier_filter`): a constant backbone factor on the first
half of the channels, not the official repository's later structure-related (per-sample min/max normalised)
factor. The FFT runs in float32 (no bf16 FFT; fp16 would give complex32), the result in the input's dtype.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import is_real
from ..errors import InputError


def fourier_filter(x: torch.Tensor, *, scale: float, threshold: int = 1) -> torch.Tensor:
    """x (B, C, H, W) with the 2*threshold x 2*threshold lowest frequencies (around the centre of the shifted
    spectrum, at (H // 2, W // 2), as diffusers' slices pick them) multiplied by `scale`."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones(freq.shape[-2:], device=x.device)
    row, col = freq.shape[-2] // 2, freq.shape[-1] // 2
    mask[row - threshold:row + threshold, col - threshold:col + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


@dataclasses.dataclass(frozen=True)
class FreeUFactors:
    """One up level's FreeU factors: `backbone` (b) for the first half of the running features' channels,
    `skip` (s) for the skip's lowest frequencies."""

    backbone: float
    skip: float

    def apply(self, h: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, skip) before an up resnet concatenates them -> the re-weighed pair (new tensors; h is not changed
        in place: DeepCache may hold it)."""
        half = h.shape[1] // 2
        h = torch.cat([h[:, :half] * self.backbone, h[:, half:]], dim=1)
        return h, fourier_filter(skip, scale=self.skip)


@dataclasses.dataclass(frozen=True)
class FreeU:
    """The four FreeU numbers, in diffusers' order: s1, s2 (skip factors) and b1, b2 (backbone factors) of the
    first and second up levels. Published choices (FreeU's README): SD 1.x s1=0.9, s2=0.2, b1=1.5, b2=1.6;
    SD 2.x 0.9, 0.2, 1.4, 1.6; SDXL 0.6, 0.4, 1.1, 1.2."""

    s1: float
    s2: float
    b1: float
    b2: float

    def __post_init__(self) -> None:
        for name in ("s1", "s2", "b1", "b2"):
            value = getattr(self, name)
            # diffusers switches FreeU off when any factor is 0: a factor must be a positive number here
            if not is_real(value) or not value > 0:
                raise InputError(f"FreeU's {name} must be a positive number", where=name, expected="> 0",
                                 found=value)

    def level(self, index: int) -> FreeUFactors | None:
        """The factors of up level `index` (0: the coarsest, the first the way up runs), None past the second."""
        if index == 0:
            return FreeUFactors(backbone=self.b1, skip=self.s1)
        if index == 1:
            return FreeUFactors(backbone=self.b2, skip=self.s2)
        return None
