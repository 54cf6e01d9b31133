"""Image-to-image (SDEdit, Meng et al. 2022) with a text-conditioned latent diffusion model.

encode the image -> noise its latent to the strength's timestep t_0 -> denoise the remaining steps
with classifier-free guidance -> decode once. The same parts as text-to-image (any Stable Diffusion
or LDM text-to-image folder loads), the same `__call__` conventions, plus `image` and `strength`:

    pipe = ImageToImagePipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    out = pipe("a watercolor of a cat", image=Image.open("cat.png"), strength=0.6)

Random numbers are drawn as diffusers' StableDiffusionImg2ImgPipeline draws them (the posterior
sample of the image latent, then the noise eps, then the sampler's noise, from the same generator), so
the same seed gives the same image.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..diffusion.noise import randn
from ..diffusion.samplers import SamplerProtocol, StepCallback, check_sampler
from ..diffusion.samplers.base import check_generator
from ..errors import InputError, describe
from ..registry import PIPELINES
from . import prompt_encoding
from .adapter_methods import with_prompt_adapters
from .arguments import check_call
from .call_options import CallbackOnStepEnd, finish, step_callback
from .images import ImageInput, check_batch, expand_batch, image_to_tensor
from .latent_diffusion import LAYOUTS, Generator, LatentDiffusionPipeline, Prompt
from .sdedit import start_step
from .stages import stage


@PIPELINES.register("image-to-image")
class ImageToImagePipeline(LatentDiffusionPipeline):
    """Text-guided image-to-image: the parts of `LatentDiffusionPipeline`, started from a noised image."""

    diffusers_class_names = ("StableDiffusionImg2ImgPipeline", "StableDiffusionControlNetImg2ImgPipeline")
    default_control_scale = 0.8   # diffusers' default for the task
    controlnet_class_name = "StableDiffusionControlNetImg2ImgPipeline"
    loadable_class_names = tuple(LAYOUTS)

    @with_prompt_adapters
    @torch.inference_mode()
    def __call__(  # type: ignore[override]  # each task takes its own inputs, as in diffusers
            self, prompt: Prompt | None = None, image: ImageInput = None, negative_prompt: Prompt | None = None,
            *, strength: float = 0.8, num_inference_steps: int = 50, guidance_scale: float = 7.5,
            eta: float | None = None, num_images_per_prompt: int = 1, generator: Generator = None,
            noise: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
            negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
            callback: StepCallback | None = None, progress: bool = True,
            max_pixels: int | None = None, guidance_rescale: float = 0.0, cfg_truncation: float | None = None,
            callback_on_step_end: CallbackOnStepEnd | None = None,
            callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), return_dict: bool = True,
            clip_skip: int | None = None, prompt_syntax: str = "a1111",
            lora_dirs: Sequence[str | os.PathLike] | None = None, control_image: Any = None,
            controlnet_conditioning_scale: float | Sequence[float] = 0.8,
            control_guidance_start: float | Sequence[float] = 0.0, control_guidance_end: float | Sequence[float] = 1.0,
            guess_mode: bool = False, control_resize_mode: int | None = 0, ip_adapter_image: Any = None,
            ip_adapter_image_embeds: list[torch.Tensor] | None = None,
            adapter_conditioning_scale: float | Sequence[float] = 1.0) -> Any:
        """Edit `image` (see `images` for the accepted kinds; H, W multiples of the autoencoder factor) towards
        `prompt`. strength in [0, 1]: 1 runs all num_inference_steps from an almost fully noised image,
        smaller keeps more of it (int(N * strength) steps run), with any sampler. noise: (B, C, H/f, W/f), the
        eps mixed into the image latent (drawn from `generator` when None). callback(i, t_i, x, denoised) runs after
        each step run (i from 0; denoised the step's x0 prediction; a tensor it returns replaces x).
        max_pixels: the largest H x W x images a call may generate (default limits.DEFAULT_MAX_PIXELS, see
        docs/limits.md). guidance_rescale, callback_on_step_end, callback_on_step_end_tensor_inputs, return_dict,
        `pipe._interrupt`: as diffusers' (`call_options`).
        clip_skip, prompt_syntax: as text-to-image's. Returns PipelineOutput(images=...) (return_dict=False:
        the tuple (images, None)). control_image ... control_resize_mode: as text-to-image's, the hints at the
        image's size (diffusers' StableDiffusionControlNetImg2ImgPipeline; the step ranges over the steps run).
        ip_adapter_image / ip_adapter_image_embeds: as text-to-image's (a loaded IP-Adapter's image prompt).
        adapter_conditioning_scale: the T2I-Adapters', as text-to-image's (`t2i_adapters`).
        """
        check_call(self, locals())
        self.check_ip_adapter_inputs(ip_adapter_image, ip_adapter_image_embeds)
        x, sampler = self.preprocess_image(image), self.sampler_for(eta)
        batch, first = self.check_image_inputs(
            prompt, negative_prompt, x, sampler=sampler, strength=strength, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, output_type=output_type,
            generator=generator, noise=noise, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, max_pixels=max_pixels)
        control = self.control_for_call(locals(), height=x.shape[-2], width=x.shape[-1])
        cond, uncond, schedule = prompt_encoding.encode_for_call(
            self, prompt, negative_prompt, steps=num_inference_steps, num_images_per_prompt=num_images_per_prompt,
            guidance=guidance_scale > 1.0, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=clip_skip, prompt_syntax=prompt_syntax)
        z0 = self.encode_image(x, batch_size=batch, num_images_per_prompt=num_images_per_prompt, generator=generator)
        eps = self.draw_noise(z0.shape, generator=generator, noise=noise)
        x_t0 = sampler.noise_to_start(z0, eps, self.noise_scheduler, num_inference_steps, first)
        on_step = step_callback(self, callback, callback_on_step_end, callback_on_step_end_tensor_inputs,
                                embeddings={"prompt_embeds": cond, "negative_prompt_embeds": uncond})
        model = self.ip_adapter_model(self.unet, ip_adapter_image, ip_adapter_image_embeds, rows=cond.shape[0],
                                      num_images_per_prompt=num_images_per_prompt, guidance=guidance_scale > 1.0)
        z = self.denoise(x_t0, cond, uncond, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                         sampler=sampler, generator=generator, callback=on_step, progress=progress,
                         start_step=first, guidance_rescale=guidance_rescale,
                         cfg_truncation=cfg_truncation, schedule=schedule, control=control,
                         model=model)
        return finish(self.output(z, output_type), return_dict)

    # ---- the stages ------------------------------------------------------------------------------
    def preprocess_image(self, image: ImageInput, *, name: str = "image",
                         size: tuple[int | None, int | None] | None = None) -> torch.Tensor:
        """PIL / numpy / tensor image(s) -> (B, 3, H, W) float32 in [-1, 1] on the CPU, as diffusers' VaeImageProcessor:
        resized to `size` (H, W; a None side: the image's own) or its own size, rounded down to multiples of the
        autoencoder factor (see `images`)."""
        return image_to_tensor(image, name=name, channels=self.vae.image_channels, factor=self.vae_scale_factor,
                               size=size)

    def check_image_inputs(self, prompt: Prompt | None, negative_prompt: Prompt | None, image: torch.Tensor, *,
                           sampler: SamplerProtocol, strength: float, num_inference_steps: int, guidance_scale: float,
                           num_images_per_prompt: int, output_type: str, generator: Generator,
                           noise: torch.Tensor | None, prompt_embeds: torch.Tensor | None = None,
                           negative_prompt_embeds: torch.Tensor | None = None,
                           max_pixels: int | None = None) -> tuple[int, int]:
        """Validate every argument before any model runs; -> (batch size, index of the first step run)."""
        height, width = self.check_inputs(prompt, negative_prompt, height=image.shape[-2], width=image.shape[-1],
                                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                          num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                          max_pixels=max_pixels)
        first = start_step(num_inference_steps, strength)
        check_sampler(sampler)
        batch = self.prompt_count(prompt, prompt_embeds) * num_images_per_prompt
        check_batch(image.shape[0], batch, per_prompt=num_images_per_prompt, name="image")
        check_generator(generator, batch)
        shape = self.latent_shape(batch, height, width)
        if noise is not None and (not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape):
            raise InputError("noise has the wrong shape", where="noise", expected=shape,
                             found=tuple(noise.shape) if isinstance(noise, torch.Tensor) else describe(noise))
        return batch, first

    @stage
    def encode_image(self, image: torch.Tensor, *, batch_size: int, num_images_per_prompt: int = 1,
                     generator: Generator = None, grad: bool = False) -> torch.Tensor:
        """image (n, 3, H, W) in [-1, 1] -> z_0 (batch_size, C, H/f, W/f): a scaled posterior sample.

        One generator encodes the n distinct images once (one draw of shape (n, ...), as diffusers); a list
        of generators encodes one image per sample, each drawn from its own generator.
        """
        image = image.to(device=self.device, dtype=self.vae.dtype)
        if isinstance(generator, (list, tuple)):
            image = expand_batch(image, batch_size, per_prompt=num_images_per_prompt, name="image")
        z0 = self.vae.encode_latents(image, generator=generator)
        return expand_batch(z0, batch_size, per_prompt=num_images_per_prompt, name="image").to(self.unet.dtype)

    def draw_noise(self, shape: tuple[int, ...], *, generator: Generator = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
        """eps ~ N(0, I) of `shape` from `generator` (see `diffusion.noise.randn`), or the given `noise`."""
        dtype, device = self.unet.dtype, self.device
        if noise is not None:
            return noise.to(device=device, dtype=dtype)
        return randn(shape, generator=generator, dtype=dtype, device=device)
