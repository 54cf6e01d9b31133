"""Stable Diffusion XL as `latentdiff generate` and the server run it: A1111's clip skip on SDXL, the
micro-conditioning values, the init image of the SDXL image-to-image call, the refiner hand-off (`call_sdxl`,
`refiner_sampler`) and the hires fix on SDXL (`sdxl_hires_fix`, composed as `pipelines.hires.hires_fix` composes
SD's). The model's family, read from its files before anything loads, is `generation.settings.model_family`. The
command line's SDXL flags and their checks are `cli.generate_sdxl`, which re-exports these names.

The refiner: the base denoises the first `refiner_switch` of the noise schedule (`denoising_end`) and returns
latents; the refiner (`StableDiffusionXLImg2ImgPipeline`, the same sampler, steps, guidance, prompts and
generators, which carry on from where the base left them) denoises the rest (`denoising_start`): diffusers'
"ensemble of expert denoisers". A1111 records it as "Refiner" and "Refiner switch at"; its own hand-off counts
steps, not the schedule's fraction, so its pixels differ from these.

Clip skip: A1111's number N picks the N-th hidden state from the end. SD encodes from the last layer (library
clip_skip = N - 1); SDXL from the penultimate one, so N = 1 and N = 2 are SDXL's own conditioning and N > 2 skips
N - 2 layers more in both text encoders (library clip_skip = N - 2). A1111 itself ignores clip skip on SDXL unless
its "sdxl_clip_l_skip" option is on (and then only in CLIP-L): a PNG's "Clip skip: 2" reproduces either way.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import UsageError
from .settings import GenerateSettings

_SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")
_PAIR = re.compile(r"(\d{1,6}),(\d{1,6})")


# ---- values as written ---------------------------------------------------------------------------------------------
def parse_pair(text: Any, pattern: re.Pattern[str], *, where: str, expected: str) -> tuple[int, int]:
    """"1024x768" or "0,0" -> (1024, 768), (0, 0): the numbers in the order written."""
    match = pattern.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise UsageError("bad value", where=where, expected=expected, found=repr(text)[:80])
    return int(match.group(1)), int(match.group(2))


# ---- once the model is loaded --------------------------------------------------------------------------------------
def is_sdxl(pipe: Any) -> bool:
    from ..pipelines.sdxl import StableDiffusionXLPipeline

    return isinstance(pipe, StableDiffusionXLPipeline)


def a1111_clip_skip(pipe: Any, clip_skip: int | None) -> int | None:
    """A1111's clip skip (the N-th hidden state from the end) -> the pipeline's clip_skip (layers skipped before the
    one it encodes from: the last for SD, the penultimate for SDXL; see the module docstring)."""
    own = 2 if is_sdxl(pipe) else 1
    return None if clip_skip is None or clip_skip <= own else clip_skip - own


def a1111_clip_layers(pipe: Any) -> int | None:
    """The largest A1111 clip skip the pipeline's text encoders take (None: none to skip, e.g. LDMBert)."""
    if not is_sdxl(pipe):
        return getattr(getattr(pipe, "text_encoder", None), "clip_skip_layers", None)
    encoders = [encoder for encoder in (pipe.text_encoder, pipe.text_encoder_2) if encoder is not None]
    counts = [n for n in (getattr(e.model.config, "num_hidden_layers", None) for e in encoders) if isinstance(n, int)]
    return min(counts) if counts and len(counts) == len(encoders) else None


def init_tensor(pipe: Any, image: Any, *, size: tuple[int, int]) -> Any:
    """Init image(s) -> (B, 3, H, W) in [-1, 1] resized to size (H, W), as `ImageToImagePipeline.preprocess_image(
    size=)` makes them for SD (`pipelines.images.image_to_tensor`), for the SDXL image-to-image call."""
    from ..pipelines.images import image_to_tensor

    return image_to_tensor(image, name="image", channels=pipe.vae.image_channels, factor=pipe.vae_scale_factor,
                           size=size)


def refiner_sampler(refiner: Any, sampler: Any) -> Any:
    """The refiner's sampler switched to the base's method, schedule and the settings an A1111 label fixes (its own
    timestep settings kept, unless the base runs on A1111's grid: names.A1111_GRID), as A1111 carries on with the
    base's sampler."""
    from ..diffusion.samplers import switch_sampler
    from ..diffusion.samplers.names import A1111_GRID

    switched = switch_sampler(refiner.sampler, sampler.registry_name)
    carried: tuple[str, ...] = ("sigma_schedule", "ays_model", "noise_type", "solver_type",
                                "discard_next_to_last_sigma", "sigma_interpolation")   # A1111's
    if all(getattr(sampler, key, None) == value for key, value in A1111_GRID.items()):
        carried += tuple(A1111_GRID)
    grid = {key: getattr(sampler, key) for key in carried if hasattr(sampler, key)}
    if any(getattr(switched, key, value) != value for key, value in grid.items()):
        switched = switched.with_options(**grid)
    return switched


def micro_conditioning(settings: GenerateSettings, *, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The SDXL pipeline keywords of the micro-conditioning settings given (diffusers' (height, width) /
    (top, left)). names: what the caller calls the settings in its error messages (the command line: `FLAGS`);
    None, or a setting it leaves out: the setting's own name."""
    where = names or {}
    options: dict[str, Any] = {}
    for key in ("original_size", "target_size"):
        if getattr(settings, key) is not None:
            width, height = parse_pair(getattr(settings, key), _SIZE, where=where.get(key, key),
                                       expected="WIDTHxHEIGHT")
            options[key] = (height, width)
    if settings.crop_top_left is not None:
        options["crops_coords_top_left"] = parse_pair(settings.crop_top_left, _PAIR,
                                                      where=where.get("crop_top_left", "crop_top_left"),
                                                      expected="TOP,LEFT")
    return options


# the pipeline call's control arguments (generate_control.control_options) the refiner does not take


# the pipeline call's control arguments (generate_control.control_options) the refiner does not take
CONTROL_ARGUMENTS = ("control_image", "control_resize_mode", "controlnet_conditioning_scale", "control_guidance_start",
                     "control_guidance_end", "guess_mode", "adapter_conditioning_scale")


def call_sdxl(pipe: Any, refiner: Any, settings: GenerateSettings, images: Any, prompt: Any, *, height: int,
              width: int, names: Mapping[str, str] | None = None, **common: Any) -> Any:
    """One call of `latentdiff generate` on an SDXL pipeline: text-to-image or image-to-image, then the refiner
    from the base's latents when there is one. names: as `micro_conditioning` takes them."""
    from ..pipelines.sdxl_image import StableDiffusionXLImg2ImgPipeline

    common |= micro_conditioning(settings, names=names)
    if settings.hires_scale is not None:
        return sdxl_hires_fix(pipe, prompt, scale=settings.hires_scale, steps=settings.hires_steps,
                              strength=settings.hires_strength, upscaler=settings.hires_upscaler or "latent",
                              height=height, width=width, **common)
    if images.mask is not None:     # --refiner is refused with --mask (settle_sdxl)
        from ..pipelines.sdxl_inpaint import StableDiffusionXLInpaintPipeline

        inpaint = StableDiffusionXLInpaintPipeline.from_pipe(pipe)
        return inpaint(prompt, image=images.init, mask_image=images.mask, height=height, width=width,
                       strength=settings.strength, **common)
    if images.init is not None:
        img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
        image = init_tensor(img2img, images.init, size=(height, width))

        def first(**extra: Any) -> Any:
            return img2img(prompt, image=image, strength=settings.strength, **common, **extra)
    else:
        def first(**extra: Any) -> Any:
            return pipe(prompt, height=height, width=width, tile_size=settings.tile_size, **common, **extra)
    if refiner is None:
        return first()
    switch = settings.refiner_switch
    latents = first(denoising_end=switch, output_type="latent").images
    # control steers the base's layout; the refiner (no ControlNet of its own) takes the prompt alone, as A1111's
    return refiner(prompt, image=latents, denoising_start=switch,
                   **{k: v for k, v in common.items() if k not in CONTROL_ARGUMENTS})


def sdxl_hires_fix(pipe: Any, prompt: Any, *, scale: float, steps: int | None, strength: float | None,
                   upscaler: str, height: int, width: int, num_inference_steps: int, **common: Any) -> Any:
    """A1111's hires fix with an SDXL pipeline, composed as `pipelines.hires.hires_fix` composes SD's: the first
    pass's latents at (height, width), upscaled (`hires.upscale`: the latents interpolated, or decoded, resized
    with Lanczos and encoded), then `StableDiffusionXLImg2ImgPipeline` at `strength` over `steps` (None / 0: the
    first pass's) at the scaled size, its micro-conditioning that size's. Random numbers in hires_fix's order:
    x_T, (the posterior sample), the second pass's eps, from the same generators."""
    from ..pipelines.base import to_output
    from ..pipelines.hires import (
        DEFAULT_STRENGTH,
        LATENT_MODES,
        check_upscaler,
        hires_size,
        second_pass_steps,
        upscale,
    )
    from ..pipelines.sdxl_image import StableDiffusionXLImg2ImgPipeline

    check_upscaler(upscaler)
    big = hires_size(height, width, scale, pipe.vae_scale_factor)
    pipe.check_pixels(*big, pipe.prompt_count(prompt) * common.get("num_images_per_prompt", 1))
    second = second_pass_steps(steps, num_inference_steps)
    output_type = common.pop("output_type", "pil")
    first = pipe(prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                 output_type="latent", **common).images
    if pipe.interrupt:
        return pipe.output(first, output_type)
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    if upscaler in LATENT_MODES:
        start: Any = upscale(pipe, first, big, upscaler=upscaler)
    else:     # decoded, resized with Lanczos; the image-to-image call encodes them (the posterior sample)
        from PIL import Image

        start = [image.resize((big[1], big[0]), Image.Resampling.LANCZOS)
                 for image in to_output(pipe.decode(first), "pil")]
    return img2img(prompt, image=start, strength=DEFAULT_STRENGTH if strength is None else strength,
                   num_inference_steps=second, output_type=output_type, **common)
