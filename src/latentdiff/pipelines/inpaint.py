"""Text-guided inpainting with latent diffusion: repaint the masked region of an image.

Two kinds of UNet, as in diffusers' StableDiffusionInpaintPipeline:

* an inpainting UNet (Stable Diffusion inpainting; LDM's inpainting model, Rombach et al. 2022,
  sec. 4.5) takes 2C + 1 input channels: the latents x_t, the mask at latent resolution and the
  latents of the masked image, concatenated in that order ("concat" conditioning, sec. 3.3);
* a plain text-to-image UNet (C channels) repaints by blending: after every step the known region
  is replaced by the image latent noised to the next timestep, q(x_{t_next} | z_0) with the run's
  noise eps (RePaint-style replacement, Lugmayr et al. 2022, without resampling), in the sampler's own
  scale (`plan.noised`), so every sampler blends. The blended sample is returned to the sampler (its
  callback contract), never written into the tensor the sampler holds. Heun's mid-step guess is not
  blended (diffusers' pipeline, which calls its scheduler twice per Heun step, blends it too).

encode the image -> prepare x_T (pure noise at strength 1, else the image latent noised to t_0)
-> prepare the mask latents -> denoise with classifier-free guidance -> decode once.

The mask is white (>= 0.5) where the image is repainted; it is binarized at 0.5 as diffusers' mask
processor does, and the masked image is image * (mask < 0.5).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..config import is_int
from ..diffusion.samplers import StepCallback
from ..diffusion.samplers.base import after_step, as_step_callback
from ..errors import InputError
from ..registry import PIPELINES
from . import prompt_encoding
from .adapter_methods import with_prompt_adapters
from .arguments import check_call
from .call_options import CallbackOnStepEnd, finish, step_callback
from .denoising import DenoisingPipeline
from .image_to_image import ImageToImagePipeline
from .images import ImageInput, check_batch, expand_batch, mask_to_tensor
from .latent_diffusion import LAYOUTS, Generator, Prompt


class InpaintStages(DenoisingPipeline):
    """The stages of inpainting that do not depend on the conditioning: the size arguments, the mask, the inputs of
    an inpainting UNet and the blending for a plain one. InpaintPipeline (SD) and StableDiffusionXLInpaintPipeline
    share them; each brings its own `encode_image` (SDXL's upcasts a float16 VAE)."""

    encode_image: Callable[..., torch.Tensor]

    def unet_in_channels(self) -> tuple[int, ...]:
        c = self.vae.latent_channels
        return (2 * c + 1, c)

    @property
    def concat_inputs(self) -> bool:
        """Whether the UNet takes the mask and masked-image latents as inputs (else the known region is blended)."""
        return self.unet.config.in_channels != self.vae.latent_channels

    def check_size_arguments(self, height: Any, width: Any, *,
                             max_pixels: int | None = None) -> tuple[int | None, int | None] | None:
        """(height, width) to resize to (None: the image's size), checked and bounded before any resizing."""
        if height is None and width is None:
            return None
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not is_int(value) or value <= 0 or value % self.vae_scale_factor):
                raise InputError(f"{name} must be a positive multiple of the autoencoder factor {self.vae_scale_factor}"
                                 " (as diffusers requires)", where=name,
                                 expected=f"a multiple of {self.vae_scale_factor}", found=value)
        f = self.vae_scale_factor
        self.check_pixels(height or f, width or f, 1, max_pixels=max_pixels)
        return (height, width)

    def preprocess_mask(self, mask_image: ImageInput, *, size: tuple[int, int], resize: bool = False) -> torch.Tensor:
        """PIL / numpy / tensor mask(s) -> (B, 1, H, W) float32 in {0, 1} on the CPU: the image's `size` (H, W) after
        its resizing; resize: resized to it (height / width given), else its own size must round down to it."""
        return mask_to_tensor(mask_image, name="mask_image", size=None if resize else size,
                              resize_to=size if resize else None, factor=self.vae_scale_factor)

    def prepare_mask_latents(self, mask: torch.Tensor, image: torch.Tensor, *, batch_size: int,
                             num_images_per_prompt: int = 1, generator: Generator = None) -> torch.Tensor:
        """mask (m, 1, H, W) in {0, 1}, image (n, 3, H, W) -> (batch_size, 1 [+ C], H/f, W/f).

        The mask at latent resolution (nearest, as diffusers), followed for an inpainting UNet by the scaled
        latents of the masked image image * (mask < 0.5) (a posterior sample from `generator`).
        """
        per_prompt = dict(per_prompt=num_images_per_prompt)
        mask_latent = self.latent_mask(mask, batch_size=batch_size, num_images_per_prompt=num_images_per_prompt)
        if not self.concat_inputs:
            return mask_latent
        if 1 not in (mask.shape[0], image.shape[0]) and mask.shape[0] != image.shape[0]:
            mask = expand_batch(mask, batch_size, name="mask_image", **per_prompt)
            image = expand_batch(image, batch_size, name="image", **per_prompt)
        masked = image * (mask < 0.5)
        masked_latents = self.encode_image(masked, batch_size=batch_size, num_images_per_prompt=num_images_per_prompt,
                                           generator=generator)
        return torch.cat([mask_latent, masked_latents], dim=1)

    def latent_mask(self, mask: torch.Tensor, *, batch_size: int, num_images_per_prompt: int = 1) -> torch.Tensor:
        """mask (m, 1, H, W) -> (batch_size, 1, H/f, W/f) in the UNet's dtype: nearest-neighbour, as diffusers."""
        h, w = (s // self.vae_scale_factor for s in mask.shape[-2:])
        mask_latent = expand_batch(F.interpolate(mask, size=(h, w)), batch_size, name="mask_image",
                                   per_prompt=num_images_per_prompt)
        return mask_latent.to(device=self.device, dtype=self.unet.dtype)

    def blend_known_region(self, z0: torch.Tensor, eps: torch.Tensor, mask_latent: torch.Tensor, plan: Any, *,
                           callback: StepCallback | None = None, last: int | None = None) -> StepCallback:
        """A step callback for a plain UNet: after step i of `plan` (the sampler's plan of the steps run), it returns
        x <- m x + (1 - m) known, known = plan.noised(z0, eps, i + 1), the forward process at the next step in the
        sampler's own scale, and z0 itself after the last step (diffusers' blending). z0, eps, x: (B, C, h, w);
        mask_latent (B, 1, h, w), 1 = repaint. `callback` then sees the blended x, with the sampler's `denoised`
        (and may replace x in turn). last: the index of the last step run when the loop stops early (SDXL's
        denoising_end: diffusers blends z0 itself there); default the plan's last.
        """
        known_weight = 1 - mask_latent
        last = len(plan.timesteps) - 1 if last is None else last
        callback = as_step_callback(callback)

        def keep_known(i: int, t: float, x: torch.Tensor, denoised: torch.Tensor | None = None) -> torch.Tensor:
            known = z0 if i == last else plan.noised(z0, eps, i + 1)
            return after_step(callback, torch.addcmul(known_weight * known, mask_latent, x), i, t, denoised)

        return keep_known


@PIPELINES.register("inpainting")
class InpaintPipeline(InpaintStages, ImageToImagePipeline):
    """Inpainting with a (2C + 1)-channel inpainting UNet, or a plain C-channel UNet by blending."""

    diffusers_class_names = ("StableDiffusionInpaintPipeline", "StableDiffusionControlNetInpaintPipeline")
    default_control_scale = 0.5   # diffusers' default for the task
    controlnet_class_name = "StableDiffusionControlNetInpaintPipeline"
    loadable_class_names = tuple(LAYOUTS)

    @with_prompt_adapters
    @torch.inference_mode()
    def __call__(  # type: ignore[override]  # each task takes its own inputs, as in diffusers
            self, prompt: Prompt | None = None, image: ImageInput = None, mask_image: ImageInput = None,
            negative_prompt: Prompt | None = None, *, height: int | None = None, width: int | None = None,
            strength: float = 1.0, num_inference_steps: int = 50,
            guidance_scale: float = 7.5, eta: float | None = None, num_images_per_prompt: int = 1,
            generator: Generator = None, noise: torch.Tensor | None = None,
            prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
            output_type: str = "pil", callback: StepCallback | None = None,
            progress: bool = True, max_pixels: int | None = None, guidance_rescale: float = 0.0,
            cfg_truncation: float | None = None,
            callback_on_step_end: CallbackOnStepEnd | None = None,
            callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), return_dict: bool = True,
            clip_skip: int | None = None, prompt_syntax: str = "a1111",
            lora_dirs: Sequence[str | os.PathLike] | None = None, control_image: Any = None,
            controlnet_conditioning_scale: float | Sequence[float] = 0.5,
            control_guidance_start: float | Sequence[float] = 0.0, control_guidance_end: float | Sequence[float] = 1.0,
            guess_mode: bool = False, control_resize_mode: int | None = 0, ip_adapter_image: Any = None,
            ip_adapter_image_embeds: list[torch.Tensor] | None = None,
            adapter_conditioning_scale: float | Sequence[float] = 1.0) -> Any:
        """Repaint the white region of `mask_image` in `image` (same H, W). height / width (multiples of the
        autoencoder factor): resize the image and the mask to them, as diffusers; default: the image's size (rounded
        down to multiples of the factor).

        strength 1 starts from pure noise x_T = noise; below 1 from the image latent noised to the strength's
        timestep (as image-to-image). noise: (B, C, H/f, W/f), the run's eps (diffusers' `latents` at
        strength 1), drawn from `generator` when None. max_pixels: the largest H x W x images a call may generate
        (default limits.DEFAULT_MAX_PIXELS). guidance_rescale, callback_on_step_end(_tensor_inputs), return_dict,
        `pipe._interrupt`: as diffusers' (`call_options`).
        clip_skip, prompt_syntax: as text-to-image's. Returns PipelineOutput(images=...) or (images, None).
        control_image ... control_resize_mode: as text-to-image's, the hints at the image's size after its resizing
        (diffusers' StableDiffusionControlNetInpaintPipeline: the ControlNets see the latents, not the mask inputs).
        ip_adapter_image / ip_adapter_image_embeds: as text-to-image's (a loaded IP-Adapter's image prompt).
        adapter_conditioning_scale: the T2I-Adapters', as text-to-image's (`t2i_adapters`).
        """
        check_call(self, locals())
        self.check_ip_adapter_inputs(ip_adapter_image, ip_adapter_image_embeds)
        size = self.check_size_arguments(height, width, max_pixels=max_pixels)
        x, sampler = self.preprocess_image(image, size=size), self.sampler_for(eta)
        mask = self.preprocess_mask(mask_image, size=(x.shape[-2], x.shape[-1]), resize=size is not None)
        batch, first = self.check_image_inputs(
            prompt, negative_prompt, x, sampler=sampler, strength=strength, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, output_type=output_type,
            generator=generator, noise=noise, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, max_pixels=max_pixels)
        check_batch(mask.shape[0], batch, per_prompt=num_images_per_prompt, name="mask_image")
        control = self.control_for_call(locals(), height=x.shape[-2], width=x.shape[-1])
        cond, uncond, schedule = prompt_encoding.encode_for_call(
            self, prompt, negative_prompt, steps=num_inference_steps, num_images_per_prompt=num_images_per_prompt,
            guidance=guidance_scale > 1.0, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=clip_skip, prompt_syntax=prompt_syntax)
        per_prompt: dict[str, Any] = dict(batch_size=batch, num_images_per_prompt=num_images_per_prompt)
        # The image latent is needed to start below strength 1, and by a plain UNet for blending.
        z0 = self.encode_image(x, **per_prompt, generator=generator) \
            if strength < 1.0 or not self.concat_inputs else None
        eps = self.draw_noise(self.latent_shape(batch, *x.shape[-2:]), generator=generator, noise=noise)
        # diffusers' rule: pure noise at strength 1 (even for a plain UNet, which has z0), else the noised latent
        x_t0 = eps * sampler.init_noise_sigma if strength == 1.0 or z0 is None else \
            sampler.noise_to_start(z0, eps, self.noise_scheduler, num_inference_steps, first)
        mask_latents = self.prepare_mask_latents(mask, x, **per_prompt, generator=generator)
        run: dict[str, Any] = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                                   sampler=sampler, generator=generator, progress=progress, start_step=first,
                                   guidance_rescale=guidance_rescale,
                                   cfg_truncation=cfg_truncation, schedule=schedule, control=control,
                                   model=self.ip_adapter_model(self.unet, ip_adapter_image, ip_adapter_image_embeds,
                                                               rows=cond.shape[0], guidance=guidance_scale > 1.0,
                                                               num_images_per_prompt=num_images_per_prompt))
        on_step = step_callback(self, callback, callback_on_step_end, callback_on_step_end_tensor_inputs,
                                embeddings={"prompt_embeds": cond, "negative_prompt_embeds": uncond})
        if self.concat_inputs:
            z = self.denoise(x_t0, cond, uncond, concat=mask_latents, callback=on_step, **run)
        else:
            assert z0 is not None  # encoded above for a plain UNet
            plan = sampler.plan(self.noise_scheduler, num_inference_steps, start_step=first)
            keep_known = self.blend_known_region(z0, eps, mask_latents, plan, callback=on_step)
            z = self.denoise(x_t0, cond, uncond, callback=keep_known, **run)
        return finish(self.output(z, output_type), return_dict)
