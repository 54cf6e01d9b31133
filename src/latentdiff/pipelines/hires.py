"""The hires fix (AUTOMATIC1111's "Hires. fix"): generate at the size the model knows, upscale, then image-to-image.

    z = denoise(x_T)                                 the first pass, at height x width (N steps)
    z' = upscale(z)                                  to the scaled size, rounded down to the autoencoder factor
    z'' = denoise(noise_to_start(z', eps), start)    SDEdit (`sdedit`) at `strength`: int(N' strength) steps

The composition comes from the first pass, at the model's own size; the second pass adds detail at the large
one, where sampling from noise would repeat the subject. Upscalers, as A1111 names them:

| upscaler | A1111 | what it does |
|---|---|---|
| `latent` | "Latent" | the latents interpolated bilinearly (no antialiasing) |
| `latent-nearest` | "Latent (nearest)" | the latents repeated (nearest neighbour) |
| `image` | "Lanczos" | decoded, the 8-bit image resized with PIL's LANCZOS, encoded again (a posterior sample) |

`hires_fix(pipe, prompt, scale=2)` runs it with a text-to-image pipeline's parts; the image path is exactly
`ImageToImagePipeline.from_pipe(pipe)` on the resized first-pass images with the same generator, the latent path
that pipeline's stages on the interpolated latents (tests/pipelines/test_hires.py does both by hand). Random
numbers: the first pass's x_T, then (image) the posterior sample, then the second pass's eps, all from
`generator`. Every size is checked (`limits.check_pixels` on the final size) before any work.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .. import limits
from ..config import is_int, is_real
from ..diffusion.noise import randn
from ..diffusion.samplers import StepCallback, check_sampler
from ..errors import InputError, describe
from . import prompt_encoding
from .arguments import check_call
from .base import to_output
from .call_options import CallbackOnStepEnd, finish, step_callback
from .image_to_image import ImageToImagePipeline
from .latent_diffusion import Generator, LatentDiffusionPipeline, Prompt
from .sdedit import start_step
from .tiled_sampling import Size as TileSize

UPSCALERS = ("latent", "latent-nearest", "image")
LATENT_MODES = {"latent": "bilinear", "latent-nearest": "nearest"}   # torch interpolate modes
# A1111's "Hires upscaler" names (its infotext) -> ours
A1111_UPSCALERS = {"Latent": "latent", "Latent (nearest)": "latent-nearest", "Lanczos": "image"}
DEFAULT_STRENGTH = 0.7     # A1111's default denoising strength of the hires pass


def check_scale(scale: Any) -> float:
    """A finite number in [1, limits.MAX_HIRES_SCALE]."""
    if not is_real(scale) or not math.isfinite(float(scale)) or not 1.0 <= float(scale) <= limits.MAX_HIRES_SCALE:
        raise InputError("the hires scale must be a number >= 1", where="scale",
                         expected=f"1 <= scale <= {limits.MAX_HIRES_SCALE} (limits.MAX_HIRES_SCALE)",
                         found=repr(scale) if is_real(scale) or isinstance(scale, str) else describe(scale))
    return float(scale)


def check_upscaler(upscaler: Any) -> str:
    if upscaler not in UPSCALERS:
        raise InputError("unknown hires upscaler", where="upscaler", expected=list(UPSCALERS), found=repr(upscaler))
    return str(upscaler)


def hires_size(height: int, width: int, scale: float, factor: int) -> tuple[int, int]:
    """(height, width) of the second pass: int(side x scale) (A1111's rule), rounded down to a multiple of the
    autoencoder factor, and at least one factor."""
    scale = check_scale(scale)
    return max(factor, int(height * scale) // factor * factor), max(factor, int(width * scale) // factor * factor)


def second_pass_steps(steps: int | None, num_inference_steps: int) -> int:
    """The hires pass's step plan N' (steps; None or 0: the first pass's, as A1111's "Hires steps" 0)."""
    if steps is None or steps == 0:
        return num_inference_steps
    limits.check_count(int(steps) if is_int(steps) else steps, key="steps", at_least=0, at_most=limits.MAX_STEPS,
                       where="steps", error=InputError)
    return int(steps)


def denoising_steps(num_inference_steps: int, *, scale: float | None = None, steps: int | None = None,
                    strength: float = DEFAULT_STRENGTH) -> int:
    """How many denoising steps a run makes: the first pass's, plus int(N' strength) with a hires pass (for a
    progress bar's total)."""
    if scale is None:
        return num_inference_steps
    hires = second_pass_steps(steps, num_inference_steps)
    return num_inference_steps + hires - start_step(hires, strength)


@torch.inference_mode()
def hires_fix(pipe: LatentDiffusionPipeline, prompt: Prompt | None = None, negative_prompt: Prompt | None = None, *,
              scale: float = 2.0, steps: int | None = None, strength: float = DEFAULT_STRENGTH,
              upscaler: str = "latent", height: int | None = None, width: int | None = None,
              num_inference_steps: int = 50, guidance_scale: float = 7.5, eta: float | None = None,
              num_images_per_prompt: int = 1, generator: Generator = None, clip_skip: int | None = None,
              tile_size: TileSize | None = None, tile_overlap: TileSize | None = None, output_type: str = "pil",
              callback: StepCallback | None = None, progress: bool = True, max_pixels: int | None = None,
              guidance_rescale: float = 0.0, callback_on_step_end: CallbackOnStepEnd | None = None,
              callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), return_dict: bool = True,
              prompt_syntax: str = "a1111", cfg_truncation: float | None = None) -> Any:
    """Images of `prompt` at (height x scale, width x scale) by A1111's hires fix with the parts of `pipe` (a
    text-to-image pipeline): a first pass at height x width (default: the model's size), `upscaler` (UPSCALERS),
    then image-to-image at `strength` with `steps` (None/0: num_inference_steps) in the step plan. tile_size /
    tile_overlap: the second pass in blended tiles (`tiled_sampling`). callback, callback_on_step_end: every step of
    both passes (the step index starts at 0 again in the second); `pipe._interrupt` set in the first pass skips the
    second (the first pass's images are returned). cfg_truncation: in each pass, of its own steps. Everything else
    as `pipe.__call__`. -> PipelineOutput at the
    scaled size (return_dict=False: diffusers' tuple)."""
    check_call(pipe, dict(prompt=prompt, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                          num_inference_steps=num_inference_steps, eta=eta, output_type=output_type,
                          callback=callback, generator=generator, clip_skip=clip_skip,
                          num_images_per_prompt=num_images_per_prompt, guidance_rescale=guidance_rescale,
                          callback_on_step_end=callback_on_step_end, return_dict=return_dict,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          prompt_syntax=prompt_syntax, cfg_truncation=cfg_truncation))
    height, width = pipe.check_inputs(prompt, negative_prompt, height=height, width=width,
                                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                      num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                                      max_pixels=max_pixels)
    big = hires_size(height, width, scale, pipe.vae_scale_factor)
    images = pipe.prompt_count(prompt) * num_images_per_prompt
    pipe.check_pixels(*big, images, max_pixels=max_pixels, images_argument="prompts x num_images_per_prompt")
    check_upscaler(upscaler)
    hires_steps = second_pass_steps(steps, num_inference_steps)
    first = start_step(hires_steps, strength)
    tiling = pipe.tiling(tile_size, tile_overlap)
    sampler = pipe.sampler_for(eta)
    check_sampler(sampler)
    texts: dict[str, Any] = dict(num_images_per_prompt=num_images_per_prompt, guidance=guidance_scale > 1.0,
                                 prompt_embeds=None, negative_prompt_embeds=None, clip_skip=clip_skip,
                                 prompt_syntax=prompt_syntax)
    cond, uncond, schedule = prompt_encoding.encode_for_call(pipe, prompt, negative_prompt,
                                                             steps=num_inference_steps, **texts)
    on_step = step_callback(pipe, callback, callback_on_step_end, callback_on_step_end_tensor_inputs,
                            embeddings={"prompt_embeds": cond, "negative_prompt_embeds": uncond})
    run: dict[str, Any] = dict(guidance_scale=guidance_scale, sampler=sampler, generator=generator,
                               callback=on_step, progress=progress, guidance_rescale=guidance_rescale,
                               cfg_truncation=cfg_truncation)
    x_T = pipe.prepare_latents(cond.shape[0], height, width, generator=generator)
    z = pipe.denoise(x_T, cond, uncond, num_inference_steps=num_inference_steps, schedule=schedule, **run)
    if pipe.interrupt:
        return finish(pipe.output(z, output_type), return_dict)
    z_big = upscale(pipe, z, big, upscaler=upscaler, generator=generator)
    eps = randn(z_big.shape, generator=generator, dtype=z_big.dtype, device=z_big.device)
    x = sampler.noise_to_start(z_big, eps, pipe.noise_scheduler, hires_steps, first)
    if schedule is not None:    # the edits and alternations over the second pass's steps, as A1111
        schedule = prompt_encoding.encode_for_call(pipe, prompt, negative_prompt, steps=hires_steps, **texts)[2]
    z = pipe.denoise(x, cond, uncond, num_inference_steps=hires_steps, start_step=first, tiling=tiling,
                     schedule=schedule, **run)
    return finish(pipe.output(z, output_type), return_dict)


def upscale(pipe: LatentDiffusionPipeline, z: torch.Tensor, size: tuple[int, int], *, upscaler: str,
            generator: Generator = None) -> torch.Tensor:
    """z_0 (B, C, h, w) of the first pass -> the scaled latents (B, C, H/f, W/f) the second pass starts from."""
    f = pipe.vae_scale_factor
    if upscaler in LATENT_MODES:
        mode = LATENT_MODES[upscaler]
        return F.interpolate(z, size=(size[0] // f, size[1] // f), mode=mode,
                             align_corners=False if mode == "bilinear" else None)
    from PIL import Image

    img2img = ImageToImagePipeline.from_pipe(pipe)
    resized = [image.resize((size[1], size[0]), Image.Resampling.LANCZOS) for image in to_output(pipe.decode(z), "pil")]
    return img2img.encode_image(img2img.preprocess_image(resized), batch_size=z.shape[0], generator=generator)
