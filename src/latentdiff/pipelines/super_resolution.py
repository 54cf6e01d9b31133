"""x4 super-resolution with latent diffusion (Rombach et al. 2022, sec. 4.4): LDM-SR, conditioned by concatenation.

The low-resolution image y (B, 3, h, w) in [-1, 1] is the conditioning: at every step the UNet (C + 3 input
channels) sees cat([x_t, y]) with latents x_t (B, C, h, w) of the low-res image's size (sec. 3.3, "concat"),
and z_0 decodes to (B, 3, h f, w f): x4 with the vq-f4 first stage of
CompVis/ldm-super-resolution-4x-openimages.

    pipe = SuperResolutionPipeline.from_pretrained("CompVis/ldm-super-resolution-4x-openimages")
    big = pipe(Image.open("small.png"), num_inference_steps=100, eta=1.0).images[0]

As diffusers' LDMSuperResolutionPipeline: the latents are not scaled (the first stage's `decode`, not
`decode_latents`: the model was trained on unscaled VQ latents), x_T is one draw of (B, C, h, w) from the
generator, and the folder layout is the same (vqvae/ + unet/ + scheduler/), both ways. Differences:

* an image is never resized: diffusers shrinks a PIL image to a multiple of 32 (lanczos); here any size the
  UNet takes is used as it is (multiples of 32 give diffusers' result);
* float tensors are in [0, 1], or in [-1, 1] when their minimum is below 0, as in every latentdiff pipeline
  (diffusers' VaeImageProcessor rule; its LDMSuperResolutionPipeline takes tensors in [-1, 1] always);
  numpy arrays and lists are accepted too (see `images`);
* with a sigma-space sampler (Euler, DPM-Solver ...) diffusers' `scale_model_input` divides the
  concatenated low-res image by sqrt(sigma^2 + 1) as well; here the UNet sees y as it was trained.

Stable Diffusion's x4 upscaler (single-file family `sd-upscale`: text-guided, with a noise-level class
embedding, 7 input channels and a KL first stage) is another model; it is refused with a ConfigError.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..registry import PIPELINES
from .arguments import check_call
from .base import concat_conditioning
from .call_options import finish
from .denoising import DenoisingPipeline, Generator, StepCallback, unet_conditioning
from .images import ImageInput, image_to_tensor
from .stages import stage

LOW_RES_CHANNELS = 3  # RGB


@PIPELINES.register("super-resolution")
class SuperResolutionPipeline(DenoisingPipeline):
    """LDM-SR: a first stage and a UNet taking cat([latents, low-res image]) (UNet2D, diffusers' UNet2DModel)."""

    diffusers_class_names = ("LDMSuperResolutionPipeline",)
    component_names = ("vae", "unet", "noise_scheduler", "sampler")
    unet_inputs = ()

    def check_parts(self) -> None:
        config = self.unet.config
        if unet_conditioning(self.unet):
            raise ConfigError(
                "this UNet is conditioned by text or a noise level, as Stable Diffusion's x4 upscaler; latentdiff has "
                "no pipeline for that model yet: SuperResolutionPipeline runs LDM's concat-conditioned x4 model",
                where="unet", expected="a UNet without cross-attention or class embedding (LDMSuperResolutionPipeline)",
                found=f"a UNet that needs {list(unet_conditioning(self.unet))}, in_channels {config.in_channels}")
        super().check_parts()

    def unet_in_channels(self) -> tuple[int, ...]:
        return (self.vae.latent_channels + LOW_RES_CHANNELS,)

    @torch.inference_mode()
    def __call__(self, image: ImageInput, *, num_inference_steps: int = 100, eta: float | None = None,
                 generator: Generator = None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 callback: StepCallback | None = None, progress: bool = True,
                 max_pixels: int | None = None, return_dict: bool = True) -> Any:
        """Upscale `image` (B low-res images of h x w: PIL, numpy, tensor or a list, see `images`) by the first
        stage's factor f. latents: x_T (B, C, h, w), drawn from `generator` when None. max_pixels: the largest
        (h f) x (w f) x B a call may generate (default limits.DEFAULT_MAX_PIXELS), checked before any latent exists.
        Returns PipelineOutput(images=...) of (B, 3, h f, w f), or (images,) with return_dict=False."""
        check_call(self, locals())
        low_res = self.preprocess_image(image)
        batch, (height, width) = low_res.shape[0], low_res.shape[-2:]
        self.check_pixels(height * self.vae_scale_factor, width * self.vae_scale_factor, batch,
                          max_pixels=max_pixels, images_argument="image batch")
        self.check_run(num_inference_steps=num_inference_steps, output_type=output_type, batch_size=batch,
                       generator=generator)
        sampler, factor = self.sampler_for(eta), self.vae_scale_factor
        x_T = self.prepare_latents(batch, height * factor, width * factor, generator=generator, latents=latents)
        denoise = concat_conditioning(self.unet, low_res.to(device=x_T.device, dtype=x_T.dtype))
        z0 = self.sample(denoise, x_T, sampler=sampler, num_inference_steps=num_inference_steps,
                         generator=generator, callback=callback, progress=progress)
        return finish(self.output(z0, output_type), return_dict, nsfw_item=False)

    def preprocess_image(self, image: ImageInput) -> torch.Tensor:
        """PIL / numpy / tensor low-res image(s) -> y (B, 3, h, w) float32 in [-1, 1] on the CPU (nothing resized)."""
        return image_to_tensor(image, name="image", channels=LOW_RES_CHANNELS)

    @stage
    def decode(self, latents: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """z_0 (B, C, h, w), unscaled (as LDM-SR was trained) -> images (B, 3, h f, w f) in [-1, 1]."""
        return self.decode_first_stage(latents, scaled=False)
