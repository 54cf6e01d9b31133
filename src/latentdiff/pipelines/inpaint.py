"""Text-guided inpainting with latent diffusion: repaint the masked region of an image.

Two kinds of UNet, as in diffusers' StableDiffusionInpaintPipeline:

* an inpainting UNet (Stable Diffusion inpainting; LDM's inpainting model, Rombach et al. 2022,
  sec. 4.5) takes 2C + 1 input channels: the latents x_t, the mask at latent resolution and the
  latents of the masked image, concatenated in that order ("concat" conditioning, sec. 3.3);
* a plain text-to-image UNet (C channels) repaints by blending: after every step the known region
  is replaced by the image latent noised to the next timestep, q(x_{t_next} | z_0) with the run's
  noise eps (RePaint-style replacement, Lugmayr et al. 2022, without resampling).

encode the image -> prepare x_T (pure noise at strength 1, else the image latent noised to t_0)
-> prepare the mask latents -> denoise with classifier-free guidance -> decode once.

The mask is white (>= 0.5) where the image is repainted; it is binarized at 0.5 as diffusers' mask
processor does, and the masked image is image * (mask < 0.5).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..diffusion.samplers import Sampler
from ..errors import InputError
from ..registry import PIPELINES
from .base import PipelineOutput, to_output
from .image_to_image import ImageToImagePipeline
from .images import ImageInput, check_batch, expand_batch, mask_to_tensor
from .latent_diffusion import LAYOUTS, Generator, Prompt
from .sdedit import start_timestep

StepCallback = Callable[[int, int, torch.Tensor], None]


@PIPELINES.register("inpainting")
class InpaintPipeline(ImageToImagePipeline):
    """Inpainting with a (2C + 1)-channel inpainting UNet, or a plain C-channel UNet by blending."""

    diffusers_class_names = ("StableDiffusionInpaintPipeline",)
    loadable_class_names = tuple(LAYOUTS)

    def unet_in_channels(self) -> tuple[int, ...]:
        c = self.vae.latent_channels
        return (2 * c + 1, c)

    @property
    def concat_inputs(self) -> bool:
        """Whether the UNet takes the mask and masked-image latents as inputs (else the known region is blended)."""
        return self.unet.config.in_channels != self.vae.latent_channels

    @torch.inference_mode()
    def __call__(self, prompt: Prompt | None = None, image: ImageInput = None, mask_image: ImageInput = None,
                 negative_prompt: Prompt | None = None, *, strength: float = 1.0, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, eta: float | None = None, num_images_per_prompt: int = 1,
                 generator: Generator = None, noise: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", callback: StepCallback | None = None,
                 progress: bool = True) -> PipelineOutput:
        """Repaint the white region of `mask_image` in `image` (same H, W; multiples of the autoencoder factor).

        strength 1 starts from pure noise x_T = noise; below 1 from the image latent noised to the strength's
        timestep (as image-to-image). noise: (B, C, H/f, W/f), the run's eps (diffusers' `latents` at
        strength 1), drawn from `generator` when None. Returns PipelineOutput(images=...).
        """
        x, sampler = self.preprocess_image(image), self.sampler_for(eta)
        mask = self.preprocess_mask(mask_image, size=tuple(x.shape[-2:]))
        batch, first = self.check_image_inputs(
            prompt, negative_prompt, x, sampler=sampler, strength=strength, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, output_type=output_type,
            generator=generator, noise=noise, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds)
        check_batch(mask.shape[0], batch, per_prompt=num_images_per_prompt, name="mask_image")
        if not self.concat_inputs and not isinstance(sampler, Sampler):
            raise InputError("blending the known region (a plain UNet) needs a sampler whose state is x_t",
                             where="sampler", expected="DDIMSampler, DDPMSampler or PLMSSampler, or an inpainting UNet",
                             found=type(sampler).__name__)
        cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images_per_prompt=num_images_per_prompt,
                                          guidance=guidance_scale > 1.0, prompt_embeds=prompt_embeds,
                                          negative_prompt_embeds=negative_prompt_embeds)
        per_prompt = dict(batch_size=batch, num_images_per_prompt=num_images_per_prompt)
        # The image latent is needed to start below strength 1, and by a plain UNet for blending.
        z0 = self.encode_image(x, **per_prompt, generator=generator) \
            if strength < 1.0 or not self.concat_inputs else None
        eps = self.draw_noise(self.latent_shape(batch, *x.shape[-2:]), generator=generator, noise=noise)
        t0 = start_timestep(sampler, self.noise_scheduler, num_inference_steps, first)
        x_t0 = eps * sampler.init_noise_sigma if strength == 1.0 else self.noise_scheduler.add_noise(z0, eps, t0)
        mask_latents = self.prepare_mask_latents(mask, x, **per_prompt, generator=generator)
        run = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, sampler=sampler,
                   generator=generator, progress=progress, start_step=first)
        if self.concat_inputs:
            z = self.denoise(x_t0, cond, uncond, concat=mask_latents, callback=callback, **run)
        else:
            timesteps = sampler.plan(self.noise_scheduler, num_inference_steps).timesteps[first:]
            keep_known = self.blend_known_region(z0, eps, mask_latents, timesteps, callback=callback)
            z = self.denoise(x_t0, cond, uncond, callback=keep_known, **run)
        if output_type == "latent":
            return PipelineOutput(images=z)
        return PipelineOutput(images=to_output(self.decode(z), output_type))

    # ---- the stages ------------------------------------------------------------------------------
    def preprocess_mask(self, mask_image: ImageInput, *, size: tuple[int, int]) -> torch.Tensor:
        """PIL / numpy / tensor mask(s) -> (B, 1, H, W) float32 in {0, 1} on the CPU; must have the image's size."""
        return mask_to_tensor(mask_image, name="mask_image", size=size, factor=self.vae_scale_factor)

    def prepare_mask_latents(self, mask: torch.Tensor, image: torch.Tensor, *, batch_size: int,
                             num_images_per_prompt: int = 1, generator: Generator = None) -> torch.Tensor:
        """mask (m, 1, H, W) in {0, 1}, image (n, 3, H, W) -> (batch_size, 1 [+ C], H/f, W/f).

        The mask at latent resolution (nearest, as diffusers), followed for an inpainting UNet by the scaled
        latents of the masked image image * (mask < 0.5) (a posterior sample from `generator`).
        """
        per_prompt = dict(per_prompt=num_images_per_prompt)
        h, w = (s // self.vae_scale_factor for s in mask.shape[-2:])
        mask_latent = expand_batch(F.interpolate(mask, size=(h, w)), batch_size, name="mask_image", **per_prompt)
        mask_latent = mask_latent.to(device=self.unet.device, dtype=self.unet.dtype)
        if not self.concat_inputs:
            return mask_latent
        if 1 not in (mask.shape[0], image.shape[0]) and mask.shape[0] != image.shape[0]:
            mask = expand_batch(mask, batch_size, name="mask_image", **per_prompt)
            image = expand_batch(image, batch_size, name="image", **per_prompt)
        masked = image * (mask < 0.5)
        masked_latents = self.encode_image(masked, batch_size=batch_size, num_images_per_prompt=num_images_per_prompt,
                                           generator=generator)
        return torch.cat([mask_latent, masked_latents], dim=1)

    def blend_known_region(self, z0: torch.Tensor, eps: torch.Tensor, mask_latent: torch.Tensor,
                           timesteps: list[int], *, callback: StepCallback | None = None) -> StepCallback:
        """A step callback for a plain UNet: after step i, x <- m x + (1 - m) q(x_{t_{i+1}} | z_0), with z_0 itself
        after the last step (diffusers' blending). z0, eps, x: (B, C, h, w); mask_latent (B, 1, h, w), 1 = repaint.

        The sample is updated in place: the sampler loops continue from the tensor they hand their callback.
        """
        known_weight = 1 - mask_latent

        def keep_known(i: int, t: int, x: torch.Tensor) -> None:
            known = self.noise_scheduler.add_noise(z0, eps, timesteps[i + 1]) if i + 1 < len(timesteps) else z0
            x.mul_(mask_latent).add_(known_weight * known)
            if callback is not None:
                callback(i, t, x)

        return keep_known
