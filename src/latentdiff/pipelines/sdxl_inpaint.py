"""SDXL inpainting: repaint the masked region of an image (diffusers' StableDiffusionXLInpaintPipeline).

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained("diffusers/stable-diffusion-xl-1.0-inpainting-0.1")
    image = pipe("a tiger on a bench", image=photo, mask_image=mask, strength=0.99).images[0]

The two kinds of UNet of SD's `InpaintPipeline`, whose stages (`inpaint.InpaintStages`) this pipeline shares:

* a 9-channel SDXL inpainting UNet takes x_t, the mask at latent resolution and the latents of the masked image
  image * (mask < 0.5), concatenated ("concat" conditioning);
* a plain 4-channel SDXL UNet (the base, or the refiner) repaints by blending: after every step the known region is
  replaced by the image latent noised to the next timestep with the run's noise (`blend_known_region`).

The SDXL conditioning is StableDiffusionXLPipeline's (two text encoders, pooled embedding, micro-conditioning; the
refiner's aesthetic score), the start is StableDiffusionXLImg2ImgPipeline's: `strength` (diffusers' default 0.9999
skips the first of N steps and starts from the image noised there, not from pure noise; 1.0 starts from pure noise)
or `denoising_start`, where `image` is the base's latents at its `denoising_end` (no noise added; the known region is
blended from those latents, noised again, as diffusers does). `denoising_end` stops early; diffusers then blends the
known region without noise at the last step run, and so does this pipeline.

Random numbers are drawn in diffusers' order: the image's posterior sample (below strength 1, for a plain UNet, or
with denoising_start), the noise, the masked image's posterior sample (9-channel UNet), then the sampler's. (For a
plain UNet diffusers also encodes the masked image it does not use; that draw is skipped here, so an ancestral
sampler's noise differs from diffusers' with a plain UNet, as in SD's `InpaintPipeline`. A list of generators
encodes one posterior sample per generated image, each from its own generator, where diffusers encodes the images
given once each, from the first generators: the same as SD's `InpaintPipeline` again.)
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..diffusion.noise import randn
from ..diffusion.samplers import StepCallback
from ..diffusion.samplers.base import check_generator
from ..errors import InputError, describe
from ..registry import PIPELINES
from .adapter_methods import with_prompt_adapters
from .call_options import CallbackOnStepEnd, finish, step_callback
from .control_pipeline import with_added
from .denoising import Generator
from .images import ImageInput, check_batch, expand_batch, image_to_tensor
from .inpaint import InpaintStages
from .sdxl import DEFAULT_AESTHETIC, DEFAULT_NEGATIVE_AESTHETIC, stop_after
from .sdxl_image import StableDiffusionXLImg2ImgPipeline
from .text_guided import Prompt

DEFAULT_INPAINT_GUIDANCE = 7.5   # diffusers' StableDiffusionXLInpaintPipeline (its text-to-image's is 5.0)


@PIPELINES.register("sdxl-inpainting")
class StableDiffusionXLInpaintPipeline(InpaintStages, StableDiffusionXLImg2ImgPipeline):
    """SDXL inpainting with a 9-channel inpainting UNet, or a plain 4-channel one (base, refiner) by blending: SD
    inpainting's stages (`InpaintStages`, reaching SDXL's upcasting `encode_image` through self), SDXL's
    conditioning and start."""

    diffusers_class_names = ("StableDiffusionXLInpaintPipeline", "StableDiffusionXLControlNetInpaintPipeline")
    controlnet_class_name = "StableDiffusionXLControlNetInpaintPipeline"
    default_control_scale = 1.0   # diffusers' default for the task

    def prepare_mask_latents(self, mask: torch.Tensor, image: torch.Tensor, *, batch_size: int,
                             num_images_per_prompt: int = 1, generator: Generator = None,
                             masked_image_latents: torch.Tensor | None = None) -> torch.Tensor:
        """-> (batch_size, 1 [+ C], h, w): the mask at latent resolution, then for a 9-channel UNet the masked
        image's latents: `masked_image_latents` (n, C, h, w) as given, else image * (mask < 0.5) encoded
        (`InpaintStages.prepare_mask_latents`)."""
        if masked_image_latents is None or not self.concat_inputs:
            return super().prepare_mask_latents(mask, image, batch_size=batch_size,
                                                num_images_per_prompt=num_images_per_prompt, generator=generator)
        mask_latent = self.latent_mask(mask, batch_size=batch_size, num_images_per_prompt=num_images_per_prompt)
        masked = expand_batch(masked_image_latents, batch_size, per_prompt=num_images_per_prompt,
                              name="masked_image_latents")
        return torch.cat([mask_latent, masked.to(device=self.device, dtype=self.unet.dtype)], dim=1)

    def preprocess_image(self, image: ImageInput, *, size: tuple[int | None, int | None] | None = None) -> torch.Tensor:
        """As StableDiffusionXLImg2ImgPipeline's, resized to `size` (H, W; a None side: the image's own) when height /
        width are given (as InpaintPipeline's)."""
        return image_to_tensor(image, name="image", channels=self.vae.image_channels, factor=self.vae_scale_factor,
                               size=size)

    def inpaint_inputs(self, image: ImageInput, mask_image: ImageInput, *, height: Any, width: Any,
                       masked_image_latents: Any, max_pixels: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, mask): x the image (B, 3, H, W) in [-1, 1] (resized to height / width when given) or latents
        (B, C, H/f, W/f) as given (the base's, for denoising_start); mask (m, 1, H, W) in {0, 1} of the same H, W.
        A 9-channel UNet given latents needs `masked_image_latents` (there is no image to mask)."""
        size = self.check_size_arguments(height, width, max_pixels=max_pixels)
        x = self.image_tensor(image) if size is None else self.preprocess_image(image, size=size)
        latent = x.shape[1] != self.vae.image_channels
        f = self.vae_scale_factor if latent else 1
        mask = self.preprocess_mask(mask_image, size=(x.shape[-2] * f, x.shape[-1] * f),
                                    resize=size is not None)
        if masked_image_latents is not None:
            expected = (self.vae.latent_channels, x.shape[-2] * f // self.vae_scale_factor,
                        x.shape[-1] * f // self.vae_scale_factor)
            if not isinstance(masked_image_latents, torch.Tensor) or masked_image_latents.ndim != 4 or \
                    tuple(masked_image_latents.shape[1:]) != expected:
                raise InputError("masked_image_latents must be latents of the image's size",
                                 where="masked_image_latents", expected=f"(n, {', '.join(map(str, expected))})",
                                 found=describe(masked_image_latents))
        elif latent and self.concat_inputs:
            raise InputError("an inpainting UNet given latents as the image needs the masked image's latents",
                             where="masked_image_latents", expected="(n, C, h, w) latents of image * (mask < 0.5)",
                             found=None)
        return x, mask

    @with_prompt_adapters
    @torch.inference_mode()
    def __call__(  # type: ignore[override]  # each task takes its own inputs, as in diffusers
            self, prompt: Prompt | None = None, prompt_2: Prompt | None = None, image: ImageInput = None,
            mask_image: ImageInput = None, *, masked_image_latents: torch.Tensor | None = None,
            height: int | None = None, width: int | None = None, strength: float = 0.9999,
            num_inference_steps: int | None = None, denoising_start: float | None = None,
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
            controlnet_conditioning_scale: float | Sequence[float] = 1.0,
            control_guidance_start: float | Sequence[float] = 0.0, control_guidance_end: float | Sequence[float] = 1.0,
            guess_mode: bool = False, control_resize_mode: int | None = 0) -> Any:
        """Repaint the white region of `mask_image` in `image`: diffusers' StableDiffusionXLInpaintPipeline
        arguments and meanings (strength 0.9999, guidance_scale 7.5, 50 steps by default). height / width: resize
        the image and mask to them (default: the image's size rounded down to multiples of the autoencoder factor,
        where diffusers resizes to the UNet's sample size). image may be latents (B, C, h, w) with denoising_start;
        masked_image_latents: the 9-channel UNet's masked-image latents, in place of encoding image * (mask < 0.5).
        noise: (B, C, h, w), the run's eps (diffusers' `latents` at strength 1). The other arguments: as
        StableDiffusionXLImg2ImgPipeline's (control_image ...: diffusers' StableDiffusionXLControlNetInpaintPipeline,
        the ControlNets seeing the latents, not the mask inputs)."""
        steps, scale = self.default_call(num_inference_steps, guidance_scale)
        scale = DEFAULT_INPAINT_GUIDANCE if guidance_scale is None and scale > 0 else scale
        arguments = dict(locals(), num_inference_steps=steps, guidance_scale=scale)
        self.check_sdxl_call(arguments)
        x, mask = self.inpaint_inputs(image, mask_image, height=height, width=width,
                                      masked_image_latents=masked_image_latents, max_pixels=max_pixels)
        latent = x.shape[1] != self.vae.image_channels
        f = self.vae_scale_factor if latent else 1
        height, width = self.check_inputs(prompt, negative_prompt, height=x.shape[-2] * f, width=x.shape[-1] * f,
                                          num_inference_steps=steps, guidance_scale=scale,
                                          num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                          max_pixels=max_pixels)
        control = self.control_for_call(arguments, height=height, width=width)
        ids, negative_ids, sampler, start, first, kept = self.image_steps(arguments, height, width)
        batch = self.prompt_count(prompt, prompt_embeds) * num_images_per_prompt
        for name, n in (("image", x.shape[0]), ("mask_image", mask.shape[0])) + (
                (("masked_image_latents", masked_image_latents.shape[0]),) if masked_image_latents is not None else ()):
            check_batch(n, batch, per_prompt=num_images_per_prompt, name=name)
        check_generator(generator, batch)
        shape = self.latent_shape(batch, height, width)
        if noise is not None and tuple(noise.shape) != shape:
            raise InputError("noise has the wrong shape", where="noise", expected=shape, found=tuple(noise.shape))
        c = self.conditioning_of(arguments, ids=ids, negative_ids=negative_ids)
        per_prompt: dict[str, Any] = dict(batch_size=batch, num_images_per_prompt=num_images_per_prompt)
        # diffusers' draws: the image latent (needed below strength 1, from denoising_start, and for blending)
        z0 = self.encode_image(x, **per_prompt, generator=generator) if latent or strength < 1.0 or \
            not self.concat_inputs or start is not None else None
        eps = noise.to(device=self.device, dtype=self.unet.dtype) if noise is not None else \
            randn(shape, generator=generator, dtype=self.unet.dtype, device=self.device)
        plan = sampler.plan(self.noise_scheduler, steps, start_step=first)
        if start is not None:   # the base's state at this step: no noise added (diffusers' add_noise=False)
            assert z0 is not None
            x_t = z0 if plan.init_scale == 1.0 else z0 / plan.init_scale
        elif strength == 1.0 or z0 is None:   # diffusers: pure noise at strength 1, even with the image latent
            x_t = eps * sampler.init_noise_sigma
        else:
            x_t = sampler.noise_to_start(z0, eps, self.noise_scheduler, steps, first)
        mask_latents = self.prepare_mask_latents(mask, x, **per_prompt, generator=generator,
                                                 masked_image_latents=masked_image_latents)
        on_step = step_callback(self, callback, callback_on_step_end, callback_on_step_end_tensor_inputs,
                                embeddings={"prompt_embeds": c["cond"], "negative_prompt_embeds": c["uncond"],
                                            "add_text_embeds": c["pooled"]})
        if kept < steps:
            on_step = stop_after(on_step, kept - 1 - first)
        if not self.concat_inputs:
            assert z0 is not None
            on_step = self.blend_known_region(z0, eps, mask_latents, plan, callback=on_step, last=kept - 1 - first)
        z = self.denoise(x_t, c["cond"], c["uncond"], guidance_scale=scale, num_inference_steps=steps,
                         sampler=sampler, generator=generator, callback=on_step, progress=progress, start_step=first,
                         guidance_rescale=guidance_rescale,
                         cfg_truncation=cfg_truncation, concat=mask_latents if self.concat_inputs else None,
                         model=c["model"], schedule=c["schedule"], control=with_added(control, c.get("added")))
        return finish(self.output(z, output_type), return_dict)
