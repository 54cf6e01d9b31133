"""SDXL image-to-image: the refiner, and the base at a strength (diffusers' StableDiffusionXLImg2ImgPipeline).

    latents = base("a church at dusk", denoising_end=0.8, output_type="latent").images
    image = refiner("a church at dusk", image=latents, denoising_start=0.8).images[0]

Two ways in:

- `strength` (SDEdit, as `ImageToImagePipeline`): the image encoded (a 4-channel tensor is taken as latents
  already), noised to the strength's step, the remaining steps run;
- `denoising_start` in (0, 1) (the ensemble of expert denoisers): `image` is the base's latents after its
  `denoising_end`, a sample of the forward process at that point; no noise is added, the steps whose timestep is
  below the cut-off run (diffusers' count), strength ignored.

The refiner (`requires_aesthetics_score`) conditions on an aesthetic score (6.0) and its negative (2.5) in place
of the target size; random numbers are drawn as diffusers draws them (the posterior sample, then the noise).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..diffusion.noise import randn
from ..diffusion.samplers import SamplerProtocol, StepCallback, check_sampler
from ..diffusion.samplers.base import check_generator
from ..errors import InputError, describe
from ..registry import PIPELINES
from . import first_stage
from .adapter_methods import with_prompt_adapters
from .call_options import CallbackOnStepEnd, finish, step_callback
from .control_pipeline import with_added
from .denoising import Generator
from .images import ImageInput, check_batch, expand_batch, image_to_tensor
from .sdedit import start_step
from .sdxl import (
    DEFAULT_AESTHETIC,
    DEFAULT_NEGATIVE_AESTHETIC,
    StableDiffusionXLPipeline,
    check_fraction,
    cutoff_timestep,
    stop_after,
)
from .stages import stage
from .text_guided import Prompt


@PIPELINES.register("sdxl-image-to-image")
class StableDiffusionXLImg2ImgPipeline(StableDiffusionXLPipeline):
    """SDXL image-to-image (the refiner's pipeline): the parts of StableDiffusionXLPipeline, started from an
    image."""

    diffusers_class_names = ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLControlNetImg2ImgPipeline")
    controlnet_class_name = "StableDiffusionXLControlNetImg2ImgPipeline"
    default_control_scale = 0.8   # diffusers' default for the task
    negative_crop_zero = True

    def preprocess_image(self, image: ImageInput) -> torch.Tensor:
        """PIL / numpy / tensor image(s) -> (B, 3, H, W) float32 in [-1, 1] (as ImageToImagePipeline's)."""
        return image_to_tensor(image, name="image", channels=self.vae.image_channels, factor=self.vae_scale_factor)

    def first_step(self, sampler: SamplerProtocol, num_inference_steps: int, *, strength: float,
                   denoising_start: float | None) -> int:
        """The index of the first step run: the strength's (SDEdit), or the first timestep below the cut-off of
        `denoising_start` (diffusers' count: the steps whose timestep is below it run)."""
        if denoising_start is None:
            return start_step(num_inference_steps, strength)
        timesteps = torch.as_tensor(sampler.plan(self.noise_scheduler, num_inference_steps).timesteps)
        kept = int((timesteps < cutoff_timestep(self.noise_scheduler, denoising_start)).sum())
        if kept < 1:
            raise InputError(f"denoising_start {denoising_start} with {num_inference_steps} steps leaves no step",
                             where="denoising_start", expected="a smaller denoising_start, or more steps",
                             found=denoising_start)
        return num_inference_steps - kept

    def image_steps(self, arguments: Mapping[str, Any], height: int,
                    width: int) -> tuple[list[float], list[float], SamplerProtocol, float | None, int, int]:
        """An image-to-image call's (time ids, negative time ids, sampler, denoising_start, first step run, steps
        run before denoising_end), its micro-conditioning and step range checked (InputErrors naming them)."""
        start, end = (check_fraction(arguments["denoising_start"], name="denoising_start"),
                      check_fraction(arguments["denoising_end"], name="denoising_end"))
        if start is not None and end is not None and end <= start:
            raise InputError("denoising_end must come after denoising_start", where="denoising_end",
                             expected=f"> denoising_start ({start})", found=end)
        names = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                 "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score",
                 "negative_aesthetic_score")
        ids, negative_ids = self.micro_conditioning(height, width, **{name: arguments[name] for name in names})
        sampler = self.sampler_for(arguments["eta"])
        check_sampler(sampler)
        steps = arguments["num_inference_steps"]
        first = self.first_step(sampler, steps, strength=arguments["strength"], denoising_start=start)
        kept = self.steps_to_run(sampler, steps, end)
        if kept <= first:
            raise InputError("denoising_end leaves no step after the start", where="denoising_end",
                             expected="a later denoising_end", found=end)
        return ids, negative_ids, sampler, start, first, kept

    @stage
    def encode_image(self, image: torch.Tensor, *, batch_size: int, num_images_per_prompt: int = 1,
                     generator: Generator = None, grad: bool = False) -> torch.Tensor:
        """image (n, 3, H, W) in [-1, 1] -> scaled posterior sample (batch_size, C, h, w); a (n, C, h, w) tensor of
        the latent channels is taken as latents already (diffusers' rule). A float16 VAE with force_upcast
        encodes in float32 (SDXL's VAE overflows in float16)."""
        if image.shape[1] == self.vae.latent_channels:
            z = image.to(device=self.device, dtype=self.unet.dtype)
            return expand_batch(z, batch_size, per_prompt=num_images_per_prompt, name="image")
        upcast = self.vae.dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", False))
        with first_stage.in_float32(self.vae, upcast):
            pixels = image.to(device=self.device, dtype=self.vae.dtype)
            if isinstance(generator, (list, tuple)):
                pixels = expand_batch(pixels, batch_size, per_prompt=num_images_per_prompt, name="image")
            z0 = self.vae.encode_latents(pixels, generator=generator)
        return expand_batch(z0, batch_size, per_prompt=num_images_per_prompt, name="image").to(self.unet.dtype)

    def image_tensor(self, image: ImageInput) -> torch.Tensor:
        """`image` as (B, 3, H, W) in [-1, 1], or latents (B, C, h, w) as given (the base's output)."""
        if image is None:
            raise InputError("image-to-image needs an image", where="image",
                             expected="a PIL image, array, (B, 3, H, W) tensor, or the base's latents", found=None)
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == self.vae.latent_channels \
                and image.shape[1] != self.vae.image_channels:
            if not image.is_floating_point():
                raise InputError("latents must be a floating-point tensor", where="image",
                                 expected="float latents (B, C, h, w)", found=describe(image))
            return image
        return self.preprocess_image(image)

    @with_prompt_adapters
    @torch.inference_mode()
    def __call__(  # type: ignore[override]  # each task takes its own inputs, as in diffusers
            self, prompt: Prompt | None = None, prompt_2: Prompt | None = None, image: ImageInput = None, *,
            strength: float = 0.3, num_inference_steps: int | None = None, denoising_start: float | None = None,
            denoising_end: float | None = None, guidance_scale: float | None = None,
            negative_prompt: Prompt | None = None, negative_prompt_2: Prompt | None = None,
            num_images_per_prompt: int = 1, eta: float | None = None, generator: Generator = None,
            noise: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
            negative_prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
            negative_pooled_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
            return_dict: bool = True, guidance_rescale: float = 0.0,
            cfg_truncation: float | None = None, original_size: tuple[int, int] | None = None,
            crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
            negative_original_size: tuple[int, int] | None = None,
            negative_crops_coords_top_left: tuple[int, int] | None = None,
            negative_target_size: tuple[int, int] | None = None, aesthetic_score: float = DEFAULT_AESTHETIC,
            negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC, clip_skip: int | None = None,
            callback_on_step_end: CallbackOnStepEnd | None = None,
            callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), callback: StepCallback | None = None,
            progress: bool = True, max_pixels: int | None = None, prompt_syntax: str = "a1111",
            lora_dirs: Sequence[str | os.PathLike] | None = None, control_image: Any = None,
            controlnet_conditioning_scale: float | Sequence[float] = 0.8,
            control_guidance_start: float | Sequence[float] = 0.0, control_guidance_end: float | Sequence[float] = 1.0,
            guess_mode: bool = False, control_resize_mode: int | None = 0) -> Any:
        """Denoise `image` towards `prompt`: diffusers' StableDiffusionXLImg2ImgPipeline arguments and meanings
        (`strength` default 0.3; `denoising_start` for the base's latents; `aesthetic_score` /
        `negative_aesthetic_score` for the refiner). noise: (B, C, h, w), the eps mixed into the image latent
        (drawn from `generator` when None). The other arguments: as StableDiffusionXLPipeline's (control_image ...:
        diffusers' StableDiffusionXLControlNetImg2ImgPipeline, the hints at the image's size)."""
        steps, scale = self.default_call(num_inference_steps, guidance_scale)
        arguments = dict(locals(), num_inference_steps=steps, guidance_scale=scale)
        self.check_sdxl_call(arguments)
        x = self.image_tensor(image)
        latent = x.shape[1] != self.vae.image_channels
        factor = 1 if latent else self.vae_scale_factor
        height, width = self.check_inputs(prompt, negative_prompt, height=x.shape[-2] * self.vae_scale_factor // factor,
                                          width=x.shape[-1] * self.vae_scale_factor // factor,
                                          num_inference_steps=steps, guidance_scale=scale,
                                          num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                          max_pixels=max_pixels)
        control = self.control_for_call(arguments, height=height, width=width)
        ids, negative_ids, sampler, start, first, kept = self.image_steps(arguments, height, width)
        batch = self.prompt_count(prompt, prompt_embeds) * num_images_per_prompt
        check_batch(x.shape[0], batch, per_prompt=num_images_per_prompt, name="image")
        check_generator(generator, batch)
        shape = self.latent_shape(batch, height, width)
        if noise is not None and tuple(noise.shape) != shape:
            raise InputError("noise has the wrong shape", where="noise", expected=shape, found=tuple(noise.shape))
        c = self.conditioning_of(arguments, ids=ids, negative_ids=negative_ids)
        z0 = self.encode_image(x, batch_size=batch, num_images_per_prompt=num_images_per_prompt, generator=generator)
        plan = sampler.plan(self.noise_scheduler, steps, start_step=first)
        if start is not None:   # the base's state at this step: no noise added (diffusers' add_noise=False)
            x_t = z0 if plan.init_scale == 1.0 else z0 / plan.init_scale
        else:
            eps = noise.to(device=z0.device, dtype=z0.dtype) if noise is not None else \
                randn(z0.shape, generator=generator, dtype=z0.dtype, device=z0.device)
            x_t = sampler.noise_to_start(z0, eps, self.noise_scheduler, steps, first)
        on_step = step_callback(self, callback, callback_on_step_end, callback_on_step_end_tensor_inputs,
                                embeddings={"prompt_embeds": c["cond"], "negative_prompt_embeds": c["uncond"],
                                            "add_text_embeds": c["pooled"]})
        if kept < steps:
            on_step = stop_after(on_step, kept - 1 - first)
        z = self.denoise(x_t, c["cond"], c["uncond"], guidance_scale=scale, num_inference_steps=steps,
                         sampler=sampler, generator=generator, callback=on_step, progress=progress, start_step=first,
                         guidance_rescale=guidance_rescale,
                         cfg_truncation=cfg_truncation, model=c["model"], schedule=c["schedule"],
                         control=with_added(control, c.get("added")))
        return finish(self.output(z, output_type), return_dict)
