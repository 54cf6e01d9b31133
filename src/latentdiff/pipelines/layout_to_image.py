"""Layout-to-image (semantic synthesis) with latent diffusion (Rombach et al. 2022, sec. 4.3.2 and fig. 8).

A segmentation map of K classes is the conditioning: one-hot encoded (B, K, H, W) at the image's size, brought
to the latent grid (h, w) = (H/f, W/f) by a `SpatialRescaler` (n_stages halvings, and a learned 1x1 conv to
K' channels when it has one), and concatenated to x_t at every step: the UNet (C + K' input channels) sees
cat([x_t, rescaled map]) ("concat" conditioning, sec. 3.3, as LDM's semantic-synthesis model).

    pipe = LayoutToImagePipeline.from_pretrained("path/to/folder")
    image = pipe(segmentation_ids, num_inference_steps=50).images[0]     # ids (H, W): PIL "L"/"P", numpy, tensor

Without a rescaler of its own the pipeline builds a weightless one: log2(f) bilinear halvings (each output
pixel the 2x2 mean: the class fractions of its f x f patch), K' = K = the UNet's extra input channels.
See `images.layout_to_one_hot` for the accepted maps. diffusers has no such pipeline: the folder's
`_class_name` is "LatentDiffusionLayoutPipeline", with vqvae/, unet/, scheduler/ and rescaler/
(["latentdiff", "SpatialRescaler"]). A single file (`task="layout-to-image"`: the file alone does not say which
concat-conditioned task it holds) carries no rescaler: it loads with the default one, and only a pipeline with
the default one is saved to a single file.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..diffusion.noise_scheduler import NoiseScheduler
from ..diffusion.samplers import SamplerProtocol
from ..errors import ConfigError, InputError
from ..models.conditioners import SpatialRescaler, SpatialRescalerConfig
from ..registry import PIPELINES
from .arguments import check_call
from .base import concat_conditioning
from .call_options import finish
from .denoising import DenoisingPipeline, FirstStage, Generator, StepCallback
from .folder import FolderPart
from .images import ImageInput, check_size, layout_to_one_hot

LAYOUT_TO_IMAGE = "LatentDiffusionLayoutPipeline"


def default_rescaler(vae: FirstStage, unet: Any) -> SpatialRescaler:
    """A weightless rescaler for a UNet whose extra inputs are the K classes: log2(f) bilinear halvings."""
    classes, factor = unet.config.in_channels - vae.latent_channels, vae.downsample_factor
    if classes < 1 or factor & (factor - 1):
        raise ConfigError("no default layout rescaler: the UNet must take the latents plus one channel per class, "
                          "and the first stage's factor must be a power of 2", where="unet.config.in_channels",
                          expected=f"> {vae.latent_channels} (latent channels), or pass rescaler=",
                          found=f"in_channels {unet.config.in_channels}, factor {factor}")
    return SpatialRescaler(SpatialRescalerConfig(n_stages=int(math.log2(factor)), method="bilinear", multiplier=0.5,
                                                 in_channels=classes)).to(device=unet.device)


@PIPELINES.register("layout-to-image")
class LayoutToImagePipeline(DenoisingPipeline):
    """A first stage, a UNet taking cat([latents, rescaled one-hot map]), and the SpatialRescaler between."""

    diffusers_class_names = (LAYOUT_TO_IMAGE,)
    component_names = ("vae", "unet", "rescaler", "noise_scheduler", "sampler")
    folder_parts = (*DenoisingPipeline.folder_parts, FolderPart(
        "rescaler", "rescaler", {("latentdiff", "SpatialRescaler"): SpatialRescaler}, optional=True))
    unet_inputs = ()

    def __init__(self, *, vae: FirstStage, unet: Any, rescaler: SpatialRescaler | None = None,
                 noise_scheduler: NoiseScheduler | None = None, sampler: SamplerProtocol | None = None):
        self.rescaler = rescaler if rescaler is not None else default_rescaler(vae, unet)
        super().__init__(vae=vae, unet=unet, noise_scheduler=noise_scheduler, sampler=sampler)

    def check_parts(self) -> None:
        """The rescaler must bring an H x W map to the latent grid H/f x W/f (and the UNet take its channels)."""
        super().check_parts()
        config, factor = self.rescaler.config, self.vae_scale_factor
        if not math.isclose(config.multiplier ** config.n_stages * factor, 1.0):
            raise ConfigError("the layout rescaler does not bring the map to the latent grid", where="rescaler.config",
                              expected=f"multiplier ** n_stages = 1/{factor} (the first stage's factor)",
                              found=f"{config.multiplier} ** {config.n_stages}")

    def unet_in_channels(self) -> tuple[int, ...]:
        config = self.rescaler.config
        return (self.vae.latent_channels + (config.out_channels or config.in_channels),)

    @property
    def num_classes(self) -> int:
        """K: the classes of a segmentation map (the rescaler's input channels)."""
        return self.rescaler.config.in_channels

    def networks(self) -> tuple[torch.nn.Module, ...]:
        return super().networks() + (self.rescaler,)

    def save_single_file(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
        """As Pipeline.save_single_file, for the default rescaler only: the original layout latentdiff writes has
        no place for another one (LDM's `cond_stage_model`), and a file that lost it would load as another model."""
        if self.rescaler.config != default_rescaler(self.vae, self.unet).config:
            raise ConfigError("the single-file layout latentdiff writes has no place for this layout rescaler; "
                              "save_pretrained keeps it", where="rescaler", expected="the default rescaler",
                              found=self.rescaler.config)
        return super().save_single_file(path, dtype=dtype)

    @torch.inference_mode()
    def __call__(self, layout: ImageInput, *, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, eta: float | None = None, generator: Generator = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", callback: StepCallback | None = None,
                 progress: bool = True, max_pixels: int | None = None, return_dict: bool = True) -> Any:
        """One image per segmentation map of `layout` (class ids (H, W) / (B, H, W), or one-hot (K, H, W) /
        (B, K, H, W); PIL, numpy, tensor or a list): images of the map's size, whose sides must be multiples of
        the first stage's factor f (height / width, when given, must equal them). latents: x_T (B, C, H/f, W/f),
        drawn from `generator` when None. max_pixels: the largest H x W x B a call may generate (default
        limits.DEFAULT_MAX_PIXELS). Returns PipelineOutput(images=...), or (images,) with return_dict=False."""
        check_call(self, locals())
        one_hot = self.preprocess_layout(layout, height=height, width=width)
        batch, (height, width) = one_hot.shape[0], one_hot.shape[-2:]
        self.check_pixels(height, width, batch, max_pixels=max_pixels, images_argument="layout batch")
        self.check_run(num_inference_steps=num_inference_steps, output_type=output_type, batch_size=batch,
                       generator=generator)
        sampler = self.sampler_for(eta)
        x_T = self.prepare_latents(batch, height, width, generator=generator, latents=latents)
        denoise = concat_conditioning(self.unet, self.encode_layout(one_hot))
        z0 = self.sample(denoise, x_T, sampler=sampler, num_inference_steps=num_inference_steps,
                         generator=generator, callback=callback, progress=progress)
        return finish(self.output(z0, output_type), return_dict, nsfw_item=False)

    def preprocess_layout(self, layout: ImageInput, *, height: int | None = None,
                          width: int | None = None) -> torch.Tensor:
        """Segmentation map(s) -> (B, K, H, W) float32 one-hot on the CPU; ids, sizes and the factor checked."""
        one_hot = layout_to_one_hot(layout, num_classes=self.num_classes, name="layout")
        size = tuple(one_hot.shape[-2:])
        for name, given, found in (("height", height, size[0]), ("width", width, size[1])):
            if given is not None and given != found:
                raise InputError("the segmentation map must have the size of the image", where="layout",
                                 expected=f"{name} = {given}", found=f"H, W = {size}")
        check_size(one_hot, name="layout", factor=self.vae_scale_factor)
        return one_hot

    def encode_layout(self, one_hot: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) one-hot -> (B, K', H/f, W/f), the UNet's extra input channels."""
        return self.rescaler(one_hot.to(device=self.device, dtype=self.unet.dtype))
