"""Running a pipeline's first stage: its decode with two safety nets, and the tiling and slicing switches.

    decode(vae, z, scaled=True, fallback_tiling=TileSettings())   # z (B, C, h, w) -> images (B, C_out, h f, w f)

The pipelines call these for their `vae` (`DenoisingPipeline.decode_first_stage`, `enable_vae_tiling` ...);
the tiles themselves are `models.vae_tiling`'s. The safety nets, each announced by a RuntimeWarning:

- out of memory: decoded again one sample at a time in overlapping tiles (`fallback_tiling`), which differ
  slightly from one piece (see vae_tiling); not when the first stage already tiles.
- NaN/Inf from a half-precision first stage (fp16 overflows past 65504): decoded again with the first stage in
  fp32, then cast back; those images are fp32. Not when the latents themselves are not finite.

Images still not finite after that (NaN/Inf first-stage weights, non-finite latents) are a `NumericalError`
of stage "decode" (`utils.numerics`), never a black image.

This module imports nothing from the pipelines: it works on any first stage with `decode` / `decode_latents`,
`dtype` and `downsample_factor` (AutoencoderKL, VQModel, IdentityFirstStage).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import ConfigError
from ..models.vae_tiling import TileSettings, is_out_of_memory, sliced, tiled_decode
from ..utils.numerics import check_finite_output

HALF_DTYPES = (torch.float16, torch.bfloat16)
# Tiles of the out-of-memory fall-back (diffusers' tiling defaults).
FALLBACK_TILING = TileSettings()


def decode(vae: Any, latents: torch.Tensor, *, scaled: bool = True, fallback_tiling: TileSettings = FALLBACK_TILING,
           stacklevel: int = 2, upcast: bool = False) -> torch.Tensor:
    """latents (B, C, h, w) -> images (B, C_out, h*f, w*f) by `vae.decode_latents` (scaled: diffusion latents) or
    `vae.decode` (unscaled), with the two safety nets of the module doc. `stacklevel`: the warnings' caller frame,
    counted from this function. upcast: a float16 first stage decodes in float32 from the start (SDXL's VAE
    overflows in float16: diffusers' `force_upcast` policy; the images are float32)."""
    dtype = vae.dtype
    upcast = upcast and dtype == torch.float16
    with in_float32(vae, upcast):
        images = _decode_or_tile(vae, latents, scaled=scaled, fallback_tiling=fallback_tiling,
                                 stacklevel=stacklevel + 1)
    if not upcast and dtype in HALF_DTYPES and not bool(torch.isfinite(images).all()) and \
            bool(torch.isfinite(latents).all()):
        warnings.warn(f"the {dtype} first stage decoded NaN/Inf values (overflow); decoding again in float32",
                      RuntimeWarning, stacklevel=stacklevel)
        with in_float32(vae):
            images = _decode_or_tile(vae, latents, scaled=scaled, fallback_tiling=fallback_tiling,
                                     stacklevel=stacklevel + 1)
    # after the fp32 retry: what is still not finite is the weights' or the latents' fault
    return check_finite_output(images, stage="decode", where="vae", dtype=images.dtype)


@contextlib.contextmanager
def in_float32(vae: Any, cast: bool = True) -> Iterator[None]:
    """The first stage in float32 for the block (`cast`), its own dtype again afterwards. Cast in place rather than
    a copy: CPU-offload hooks and wrapped methods stay bound to this module."""
    dtype = vae.dtype
    if cast:
        vae.to(dtype=torch.float32)
    try:
        yield
    finally:
        if cast:
            vae.to(dtype=dtype)


def _decode_or_tile(vae: Any, latents: torch.Tensor, *, scaled: bool, fallback_tiling: TileSettings,
                    stacklevel: int) -> torch.Tensor:
    """One decode; on out of memory (and a first stage that does not tile already), again sample by sample in
    tiles."""
    run = vae.decode_latents if scaled else vae.decode
    z = latents.to(vae.dtype)
    try:
        return run(z)
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(error) or getattr(vae, "tiling", None) is not None:
            raise
        warnings.warn(f"the first stage ran out of memory decoding {tuple(z.shape)} latents ({error}); "
                      "decoding again one sample at a time in tiles", RuntimeWarning, stacklevel=stacklevel)
    # Outside the except block, so the failed attempt's tensors (held by the traceback) are freed first.
    if z.device.type == "cuda":
        torch.cuda.empty_cache()
    factor = vae.downsample_factor
    tile, overlap = fallback_tiling.in_latent_pixels(factor)
    return sliced(lambda one: tiled_decode(run, one, tile=tile, overlap=overlap, factor=factor), z)


# ---- the switches (diffusers' pipeline names) --------------------------------------------------------------
def enable_tiling(vae: Any, *, tile_sample_size: int = 512, overlap: float = 0.25) -> None:
    """Decode (and encode) images larger than `tile_sample_size` pixels in overlapping, blended tiles."""
    tiling_first_stage(vae, "enable_tiling").enable_tiling(tile_sample_size=tile_sample_size, overlap=overlap)


def disable_tiling(vae: Any) -> None:
    tiling_first_stage(vae, "disable_tiling").disable_tiling()


def enable_slicing(vae: Any) -> None:
    """Decode (and encode) a batch one sample at a time."""
    tiling_first_stage(vae, "enable_slicing").enable_slicing()


def disable_slicing(vae: Any) -> None:
    tiling_first_stage(vae, "disable_slicing").disable_slicing()


def tiling_first_stage(vae: Any, method: str) -> Any:
    """`vae` when it has `method`, else a ConfigError (the identity first stage has no tiles to cut)."""
    if not hasattr(vae, method):
        raise ConfigError(f"this pipeline's first stage has no {method}()", where="vae",
                          expected="a first stage with tiling and slicing (AutoencoderKL)",
                          found=type(vae).__name__)
    return vae
