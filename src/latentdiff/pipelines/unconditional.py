"""Unconditional latent diffusion (Rombach et al. 2022, sec. 4.1): LDM's CelebA-HQ, FFHQ and LSUN models.

prepare x_T -> the reverse process with the UNet alone -> decode once:

    pipe = UnconditionalPipeline.from_pretrained("CompVis/ldm-celebahq-256")
    images = pipe(batch_size=4, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images

diffusers' LDMPipeline folders (vqvae/ + unet/ + scheduler/) load as this class and the folders it saves
load in diffusers. The first stage may be a VQModel (as released), an AutoencoderKL (LDM-8 KL models) or
the identity (pixel-space diffusion). As diffusers' LDMPipeline, the sampled latents are divided by the
first stage's `scaling_factor` before decoding (`decode_latents`), and a VQModel quantizes them first.

One deliberate difference: the released LDM VQ models were trained on unscaled latents (the paper,
app. G: "the VQ-regularized space has a variance close to 1, such that it does not have to be rescaled"),
but their vqvae/config.json predates diffusers' `scaling_factor` key, whose default 0.18215 makes diffusers
divide the latents by it (diffusers issue #6725: CompVis/ldm-celebahq-256 gives broken images). A VQ first
stage whose config.json has no `scaling_factor` is loaded here with 1.0, LDM's value; a config that states
the key is taken as it is, so a folder diffusers writes today gives diffusers' images.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..config import is_int, read_json
from ..errors import InputError
from ..models.base import CONFIG_NAME, load_weights
from ..models.vq import VQModel
from ..registry import PIPELINES
from .arguments import check_call
from .call_options import finish
from .denoising import DenoisingPipeline, Generator, StepCallback
from .step_cache import StepSwitches


@PIPELINES.register("unconditional")
class UnconditionalPipeline(StepSwitches, DenoisingPipeline):
    """Images from noise with an unconditional UNet (UNet2D, or a UNet2DConditional without cross-attention)."""

    diffusers_class_names = ("LDMPipeline",)
    component_names = ("vae", "unet", "noise_scheduler", "sampler")
    unet_inputs = ()

    @torch.inference_mode()
    def __call__(self, *, batch_size: int = 1, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, eta: float | None = None, generator: Generator = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", callback: StepCallback | None = None,
                 progress: bool = True, max_pixels: int | None = None, return_dict: bool = True) -> Any:
        """Generate `batch_size` images of height x width (default: the UNet's sample_size times the first stage's
        factor f). latents: x_T (batch_size, C, height/f, width/f), drawn from `generator` when None.
        max_pixels: the largest height x width x batch_size a call may generate (default
        limits.DEFAULT_MAX_PIXELS). Returns PipelineOutput(images=...), or (images,) with return_dict=False."""
        check_call(self, locals())
        if not is_int(batch_size) or batch_size < 1:
            raise InputError("batch_size must be a positive integer", where="batch_size", expected=">= 1",
                             found=batch_size)
        height, width = self.image_size(height, width)
        self.check_pixels(height, width, batch_size, max_pixels=max_pixels)
        self.check_run(num_inference_steps=num_inference_steps, output_type=output_type, batch_size=batch_size,
                       generator=generator)
        sampler = self.sampler_for(eta)
        x_T = self.prepare_latents(batch_size, height, width, generator=generator, latents=latents)
        model, callback = self.switched(self.unet, callback, steps=num_inference_steps)   # DeepCache, FreeU
        z0 = self.sample(model, x_T, sampler=sampler, num_inference_steps=num_inference_steps,
                         generator=generator, callback=callback, progress=progress)
        return finish(self.output(z0, output_type), return_dict, nsfw_item=False)

    @classmethod
    def load_part(cls, key: str, part_class: type, root: Path, **load: Any) -> Any:
        """A VQ first stage whose config.json does not state `scaling_factor` gets LDM's 1.0 (see the module doc)."""
        folder = root / key
        if part_class is not VQModel or "scaling_factor" in read_json(folder / CONFIG_NAME):
            return super().load_part(key, part_class, root, **load)
        config = dataclasses.replace(VQModel.load_config(folder), scaling_factor=1.0)
        state = load_weights(folder, VQModel.weights_name, variant=load.get("variant"))
        return VQModel.from_state_dict(config, state, torch_dtype=load.get("torch_dtype"), device=load.get("device"),
                                       source=str(folder))
