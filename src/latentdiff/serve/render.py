"""render(pipe, units): the pipeline calls that make the images of a batch of units, and the settings each image's
PNG records.

A unit alone is made by exactly the call a Python user would write for it, so a served image is the image the
library gives for that seed:

    pipe.sampler = <request.sampler with request.schedule>      # the model's own when None
    pipe(prompt, negative_prompt=..., num_images_per_prompt=batch_size,
         generator=[torch.Generator().manual_seed(s) for s in seeds], height=..., width=...,
         num_inference_steps=..., guidance_scale=..., eta=..., clip_skip=<A1111's - 1>, lora_dirs=..., progress=False)

(`pipelines.hires.hires_fix`, `ImageToImagePipeline`, `InpaintPipeline` for requests with a hires fix or input
images; an SDXL model's own classes: `StableDiffusionXLPipeline`, `StableDiffusionXLImg2ImgPipeline`, and with a
refiner the base's `denoising_end` hand-off to the refiner's `denoising_start`, as `latentdiff generate --refiner`;
clip skip in A1111's numbering as `generation.sdxl.a1111_clip_skip` translates it). Units of several requests
sharing a batch key are one call with a prompt per image (the pipeline draws each image's noise from its own
generator, so only the matrix products' rounding can differ from the unit alone).

Variation seeds (A1111's subseed / subseed_strength): the starting noise is A1111's spherical interpolation
between the seed's noise and the subseed's, `slerp(strength, noise(seed), noise(subseed))`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..control.resize import fit
from ..diffusion.noise import randn
from ..diffusion.samplers.base import switch_sampler
from ..diffusion.samplers.names import has_schedule, schedule_options
from ..generation.sdxl import a1111_clip_skip, init_tensor, is_sdxl, refiner_sampler, sdxl_hires_fix
from ..version import __version__
from .requests import GeneratedImage, ImageRequest, Unit
from .switches import switch_params

StepCallback = Callable[..., Any]


def sampler_for(pipe: Any, request: ImageRequest) -> Any:
    """The pipeline's sampler switched to the request's (its timestep settings kept) with its schedule and the
    settings its A1111 label fixes set."""
    sampler = switch_sampler(pipe.sampler, request.sampler)
    if request.schedule is not None and has_schedule(sampler.registry_name):
        options = schedule_options(request.schedule, pipeline=pipe)     # AYS: the table of the pipeline's model
        if any(getattr(sampler, key, None) != value for key, value in options.items()):
            sampler = sampler.with_options(**options)
    if request.sampler_options:
        sampler = sampler.with_options(**dict(request.sampler_options))
    return sampler


def render(pipe: Any, units: Sequence[Unit], *, lora_dirs: Sequence[Path] = (),
           callback: StepCallback | None = None, refiner: Any = None,
           controlnets: Sequence[Any] = ()) -> list[list[GeneratedImage]]:
    """The images of `units` (which share `request.batch_key()`, or are one unit), one list per unit; `refiner`:
    the SDXL pipeline of `request.refiner` (None without one); `controlnets`: the loaded ControlNet of each of
    `request.control`'s units."""
    request = units[0].request
    base = pipe.sampler
    pipe.sampler = sampler_for(pipe, request)
    try:
        sampler_name = pipe.sampler.registry_name
        schedule = getattr(pipe.sampler, "sigma_schedule", None)
        eta = getattr(pipe.sampler, "eta", None) if request.eta is None else request.eta
        generators = [torch.Generator().manual_seed(s) for unit in units for s in unit.seeds()]
        images = _call(pipe, units, lora_dirs=lora_dirs, callback=callback, generators=generators,
                       controlnets=controlnets)
        if request.refiner is not None:   # the generators carry on from where the base left them
            images = _refine(pipe, refiner, units, images, callback=callback, generators=generators)
    finally:
        pipe.sampler = base
    out: list[list[GeneratedImage]] = []
    start = 0
    for unit in units:
        mine = images[start:start + unit.count]
        start += unit.count
        params = image_params(unit.request, sampler=sampler_name, schedule=schedule, eta=eta, batch=len(images))
        params |= switch_params(pipe)        # the server's --deepcache / --freeu / --tome, as generate records them
        out.append([GeneratedImage(image, seed, subseed, params | {"seed": seed} | variation(unit.request, subseed))
                    for image, seed, subseed in zip(mine, unit.seeds(), unit.subseeds(), strict=True)])
    return out


def _call(pipe: Any, units: Sequence[Unit], *, lora_dirs: Sequence[Path], callback: StepCallback | None,
          generators: list[torch.Generator], controlnets: Sequence[Any] = ()) -> Any:
    request = units[0].request
    if len(units) == 1:
        prompt: Any = request.prompt
        negative: Any = request.negative_prompt
        per_prompt = units[0].count
    else:
        prompt = [unit.request.prompt for unit in units for _ in range(unit.count)]
        negative = [unit.request.negative_prompt for unit in units for _ in range(unit.count)]
        per_prompt = 1
    common: dict[str, Any] = dict(
        negative_prompt=negative, num_inference_steps=request.steps, guidance_scale=request.guidance,
        eta=request.eta, num_images_per_prompt=per_prompt, generator=generators, callback=callback, progress=False,
        clip_skip=a1111_clip_skip(pipe, request.clip_skip), lora_dirs=list(lora_dirs) or None) | fast_options(request)
    if request.refiner is not None:   # the base's share of the schedule, as latents for the refiner (_refine)
        common |= {"denoising_end": request.refiner_switch, "output_type": "latent"}
    if request.hires is not None and is_sdxl(pipe):   # the same composition as `latentdiff generate`'s
        hires = request.hires
        return list(sdxl_hires_fix(pipe, prompt, scale=hires.scale, steps=hires.steps, strength=hires.strength,
                                   upscaler=hires.upscaler, height=request.height, width=request.width,
                                   **common).images)
    if request.hires is not None:
        from ..adapters.api import prompt_adapters
        from ..pipelines.hires import hires_fix

        hires, dirs = request.hires, common.pop("lora_dirs")
        with prompt_adapters(pipe, {"prompt": prompt, "negative_prompt": negative}, dirs) as texts:
            common["negative_prompt"] = texts["negative_prompt"]
            return list(hires_fix(pipe, texts["prompt"], scale=hires.scale, steps=hires.steps,
                                  strength=hires.strength, upscaler=hires.upscaler, height=request.height,
                                  width=request.width, **common).images)
    if request.init is not None:
        return _with_images(pipe, units[0], prompt, common, controlnets=controlnets)
    if request.subseed_strength > 0:
        common["latents"] = variation_noise(pipe, units[0])
    runner, common = with_control(pipe, type(pipe), request, controlnets, common)
    out = runner(prompt, height=request.height, width=request.width, **common).images
    return out if request.refiner is not None else list(out)


def _refine(pipe: Any, refiner: Any, units: Sequence[Unit], latents: Any, *, callback: StepCallback | None,
            generators: list[torch.Generator]) -> list[Any]:
    """The SDXL refiner's share of the schedule from the base's latents (its `denoising_start`), with the base's
    sampler, prompts and generators; an interrupted base is decoded as it is. LoRA tags are the base's (the
    refiner's networks differ): left out of the refiner's prompts."""
    from ..adapters.tags import TAG
    from ..pipelines.sdxl_image import StableDiffusionXLImg2ImgPipeline

    request = units[0].request
    if pipe.interrupt:
        return list(pipe.output(latents, "pil").images)
    expert = StableDiffusionXLImg2ImgPipeline.from_pipe(refiner, sampler=refiner_sampler(refiner, pipe.sampler))

    def on_step(i: int, t: float, x: Any, denoised: Any = None) -> Any:
        out = None if callback is None else callback(i, t, x, denoised)
        if pipe.interrupt:      # the engine interrupts the base pipeline it knows
            expert._interrupt = True
        return out

    if len(units) == 1:
        prompt: Any = TAG.sub("", request.prompt)
        negative: Any = TAG.sub("", request.negative_prompt)
        per_prompt = units[0].count
    else:
        prompt = [TAG.sub("", unit.request.prompt) for unit in units for _ in range(unit.count)]
        negative = [TAG.sub("", unit.request.negative_prompt) for unit in units for _ in range(unit.count)]
        per_prompt = 1
    return list(expert(prompt, image=latents, denoising_start=request.refiner_switch, negative_prompt=negative,
                       num_inference_steps=request.steps, guidance_scale=request.guidance, eta=request.eta,
                       num_images_per_prompt=per_prompt, generator=generators, callback=on_step, progress=False,
                       clip_skip=a1111_clip_skip(expert, request.clip_skip), **fast_options(request)).images)


def fast_options(request: ImageRequest) -> dict[str, Any]:
    """The call keywords of the request's per-call switches: `cfg_truncation` when set (none otherwise, so every
    call is the one it was without it); each pass (hires, refiner) applies it to its own steps."""
    return {} if request.cfg_truncation is None else {"cfg_truncation": request.cfg_truncation}


def with_control(pipe: Any, cls: Any, request: ImageRequest, controlnets: Sequence[Any],
                 common: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(the `cls` pipeline to call, its arguments): `pipe` itself, or its `cls.from_pipe` copy (with the request's
    ControlNets: one, or a list for several units) and the units' call arguments. The hints are at the generation
    size already (controlnet_units). The engine interrupts `pipe`: the step callback passes that on to the copy."""
    units = request.control
    if not units:
        return (pipe if cls is type(pipe) else cls.from_pipe(pipe)), common
    one = len(units) == 1
    runner = cls.from_pipe(pipe, controlnet=controlnets[0] if one else list(controlnets))

    def each(key: str) -> Any:
        values = [getattr(u, key) for u in units]
        return values[0] if one else values

    inner = common.get("callback")
    pipe._interrupt = False

    def on_step(i: int, t: float, x: Any, denoised: Any = None) -> Any:
        out = None if inner is None else inner(i, t, x, denoised)
        if pipe._interrupt:
            runner._interrupt = True
        return out

    return runner, common | {
        "callback": on_step, "control_image": each("hint"), "controlnet_conditioning_scale": each("weight"),
        "control_guidance_start": each("start"), "control_guidance_end": each("end"),
        "guess_mode": units[0].guess_mode, "control_resize_mode": None}


def _with_images(pipe: Any, unit: Unit, prompt: str, common: dict[str, Any], *,
                 controlnets: Sequence[Any] = ()) -> list[Any]:
    """img2img, or inpainting with a mask; image i of the unit starts from init image (first + i) mod count."""
    request = unit.request
    init = request.init
    assert init is not None
    size = (request.height, request.width)
    pictures = [fit(init.images[(unit.first + i) % len(init.images)], size, mode=init.resize_mode)
                for i in range(unit.count)]
    if len({id(p) for p in pictures}) == 1 or len(init.images) == 1:
        images: Any = pictures[0]
    else:
        images, prompt = pictures, [prompt] * unit.count     # type: ignore[assignment]
        common = common | {"negative_prompt": [request.negative_prompt] * unit.count, "num_images_per_prompt": 1}
    if is_sdxl(pipe) and init.mask is not None:    # a refiner is refused with a mask (serve.a1111)
        from ..pipelines.sdxl_inpaint import StableDiffusionXLInpaintPipeline

        painter, common = with_control(pipe, StableDiffusionXLInpaintPipeline, request, controlnets, common)
        return list(painter(prompt, image=images, mask_image=fit(init.mask, size, mode=init.resize_mode),
                            height=request.height, width=request.width, strength=init.strength, **common).images)
    if is_sdxl(pipe):
        from ..pipelines.sdxl_image import StableDiffusionXLImg2ImgPipeline

        xl, common = with_control(pipe, StableDiffusionXLImg2ImgPipeline, request, controlnets, common)
        tensor = init_tensor(xl, images, size=size)
        out = xl(prompt, image=tensor, strength=init.strength, **common).images
        return out if request.refiner is not None else list(out)
    if init.mask is not None:
        from ..pipelines.inpaint import InpaintPipeline

        inpaint, common = with_control(pipe, InpaintPipeline, request, controlnets, common)
        mask = fit(init.mask, size, mode=init.resize_mode)
        return list(inpaint(prompt, images, mask, height=request.height, width=request.width,
                            strength=init.strength, **common).images)
    from ..pipelines.image_to_image import ImageToImagePipeline

    img2img, common = with_control(pipe, ImageToImagePipeline, request, controlnets, common)
    tensor = img2img.preprocess_image(images, size=size)
    return list(img2img(prompt, tensor, strength=init.strength, **common).images)


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation-seed interpolation of two noises (C, H, W): per column along dim 1 the spherical
    interpolation sin((1-v)w)/sin(w) low + sin(v w)/sin(w) high, w the angle between them; nearly parallel noises
    (mean cosine > 0.9995) are mixed as A1111 mixes them: low * v + high * (1 - v)."""
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:
        return low * strength + high * (1 - strength)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - strength) * omega) / so).unsqueeze(1) * low \
        + (torch.sin(strength * omega) / so).unsqueeze(1) * high


def variation_noise(pipe: Any, unit: Unit) -> torch.Tensor:
    """x_T / init_noise_sigma of each image of the unit: its seed's noise moved towards its subseed's."""
    request = unit.request
    shape = pipe.latent_shape(1, request.height, request.width)[1:]
    rows = []
    for seed, subseed in zip(unit.seeds(), unit.subseeds(), strict=True):
        noise = randn(shape, generator=torch.Generator().manual_seed(seed))
        sub = randn(shape, generator=torch.Generator().manual_seed(subseed))
        rows.append(slerp(request.subseed_strength, noise, sub))
    return torch.stack(rows)


def variation(request: ImageRequest, subseed: int) -> dict[str, Any]:
    return {"subseed": subseed, "subseed_strength": request.subseed_strength} if request.subseed_strength > 0 else {}


def image_params(request: ImageRequest, *, sampler: str, schedule: str | None, eta: float | None,
                 batch: int) -> dict[str, Any]:
    """The settings a served PNG records, with the keys `latentdiff generate` records (so `--from` reads them):
    no server path (the model is the catalog's name)."""
    params: dict[str, Any] = {
        "prompt": request.prompt, "negative": request.negative_prompt, "steps": request.steps,
        "guidance": request.guidance, "sampler": sampler, "eta": eta, "height": request.height,
        "width": request.width, "n": 1, "model": request.model, "schedule": schedule, "latentdiff": __version__,
        "batch": batch}
    if request.sampler_options:          # `latentdiff generate` records them so (GenerateSettings.sampler_options)
        params["sampler_options"] = dict(request.sampler_options)
    if request.clip_skip is not None and request.clip_skip > 1:
        params["clip_skip"] = request.clip_skip
    if request.vae is not None:
        params["vae"] = request.vae
    if request.hires is not None:
        params |= {"hires_scale": request.hires.scale, "hires_steps": request.hires.steps,
                   "hires_strength": request.hires.strength, "hires_upscaler": request.hires.upscaler}
    if request.init is not None:
        params["strength"] = request.init.strength
    if request.refiner is not None:
        params |= {"refiner": request.refiner, "refiner_switch": request.refiner_switch}
    if request.control:
        params["controlnet"] = [unit.record() for unit in request.control]
    return params | fast_options(request)


def unit_steps(request: ImageRequest) -> int:
    """The denoising steps a unit of `request` runs (the progress total): both hires passes, the steps an
    img2img strength leaves."""
    from ..pipelines.hires import denoising_steps, start_step

    if request.hires is not None:
        return denoising_steps(request.steps, scale=request.hires.scale, steps=request.hires.steps,
                               strength=request.hires.strength)
    if request.init is not None:
        return request.steps - start_step(request.steps, request.init.strength)
    return request.steps

