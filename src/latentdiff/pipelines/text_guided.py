"""What the text-guided pipelines share (Stable Diffusion's and LDM's `LatentDiffusionPipeline`, SDXL's): the
argument checks of a text-to-image call and the guided denoising stage.

    z0 = pipe.denoise(x_T, cond, uncond, guidance_scale=7.5, num_inference_steps=50)

`denoise` wraps the UNet (or `model`, the UNet with a pipeline's other conditioning bound: SDXL's added_cond) in
classifier-free guidance (or a `PromptSchedule`'s per-step conditioning), optionally in MultiDiffusion windows,
and runs the sampler from any step.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import ClassVar, TypeAlias

import torch

from .. import limits
from ..diffusion.guidance import classifier_free_guidance
from ..diffusion.samplers import SamplerProtocol, StepCallback
from ..errors import InputError, describe
from ..utils.memory import released_after_each_block
from ..utils.numerics import check_finite_output
from . import acceleration, prompt_encoding
from .base import concat_conditioning
from .call_options import Interrupted
from .control import Control
from .denoising import DenoisingPipeline, Generator
from .sdedit import sample_from_step
from .stages import stage
from .step_cache import StepSwitches
from .tiled_sampling import LatentTiling, latent_tiling, tiled_denoiser
from .tiled_sampling import Size as TileSize

Prompt: TypeAlias = str | Sequence[str]


def no_prompt() -> InputError:
    """The error of a call with neither a prompt nor prompt embeddings."""
    return InputError("a prompt is required", where="prompt", expected="str or list of str", found=None)


class TextGuidedPipeline(StepSwitches, DenoisingPipeline):
    """A DenoisingPipeline conditioned by text through classifier-free guidance: the checks and stages the
    text-to-image pipelines share."""

    default_steps: ClassVar[int] = 50
    default_guidance: ClassVar[float] = 7.5

    def is_distilled(self) -> bool:
        """Whether the model is a Turbo-style distilled one (SDXL-Turbo, SD-Turbo): its folder's scheduler samples
        ancestral Euler on trailing timesteps, as theirs do."""
        sampler = self.sampler
        return getattr(sampler, "timestep_spacing", None) == "trailing" and \
            getattr(sampler, "registry_name", None) == "euler_ancestral"

    def default_call(self, num_inference_steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
        """(steps, guidance) with the model's defaults for those not given: the class's (SD 50 and 7.5, SDXL 50 and
        5.0), or a distilled model's 1 and 0.0 (`is_distilled`). SDXL's `__call__` reads it for arguments left
        None; `latentdiff generate` and `serve` for every text pipeline (SD's `__call__` keeps its own signature
        defaults: pass SD-Turbo's steps and guidance, or `pipe.default_call(None, None)`)."""
        turbo = self.is_distilled()
        steps = (1 if turbo else self.default_steps) if num_inference_steps is None else num_inference_steps
        scale = (0.0 if turbo else self.default_guidance) if guidance_scale is None else guidance_scale
        return steps, scale

    def check_inputs(self, prompt: Prompt | None, negative_prompt: Prompt | None, *, height: int | None,
                     width: int | None, num_inference_steps: int, guidance_scale: float, num_images_per_prompt: int,
                     output_type: str, prompt_embeds: torch.Tensor | None = None,
                     negative_prompt_embeds: torch.Tensor | None = None,
                     max_pixels: int | None = None) -> tuple[int, int]:
        """Validate every argument before any heavy work; returns (height, width) with defaults filled in."""
        if prompt is None and prompt_embeds is None:
            raise no_prompt()
        if prompt is not None and not (isinstance(prompt, str) or
                                       (isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt))):
            raise InputError("prompt must be a string or a list of strings", where="prompt",
                             expected="str | list[str]", found=describe(prompt))
        n = self.prompt_count(prompt, prompt_embeds)
        if n == 0:
            raise InputError("prompt list is empty", where="prompt", expected="at least one prompt", found=0)
        if negative_prompt is not None and not isinstance(negative_prompt, str) and len(negative_prompt) != n:
            raise InputError("negative_prompt must have one entry per prompt", where="negative_prompt",
                                 expected=f"a string or a list of {n}", found=f"a list of {len(negative_prompt)}")
        height, width = self.image_size(height, width)
        if guidance_scale < 0:
            raise InputError("guidance_scale must be >= 0", where="guidance_scale", expected=">= 0",
                             found=guidance_scale)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise InputError("num_images_per_prompt must be at least 1", where="num_images_per_prompt",
                             expected=">= 1", found=num_images_per_prompt)
        limits.check_count(num_images_per_prompt, key="num_images_per_prompt", at_least=1,
                           at_most=limits.MAX_IMAGES_PER_PROMPT, where="num_images_per_prompt", error=InputError)
        self.check_pixels(height, width, n * num_images_per_prompt, max_pixels=max_pixels,
                          images_argument="prompts x num_images_per_prompt")
        self.check_run(num_inference_steps=num_inference_steps, output_type=output_type)
        return height, width

    @staticmethod
    def prompt_count(prompt: Prompt | None, prompt_embeds: torch.Tensor | None = None) -> int:
        """How many prompts a call has (before num_images_per_prompt)."""
        if prompt is not None:
            return 1 if isinstance(prompt, str) else len(prompt)
        if prompt_embeds is None:
            raise no_prompt()
        return prompt_embeds.shape[0]

    @stage
    def denoise(self, x_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, *,
                guidance_scale: float = 7.5, num_inference_steps: int = 50, sampler: SamplerProtocol | None = None,
                generator: Generator = None, callback: StepCallback | None = None, progress: bool = True,
                start_step: int = 0, concat: torch.Tensor | None = None, tiling: LatentTiling | None = None,
                guidance_rescale: float = 0.0, grad: bool = False,
                schedule: prompt_encoding.PromptSchedule | None = None,
                model: Callable[..., torch.Tensor] | None = None, control: Control | None = None) -> torch.Tensor:
        """Run the reverse process from x_T to z_0 with the sampler, guided by the text embeddings.

        start_step > 0 runs only steps start_step .. N-1 of the N-step plan, x_T being the sample at that
        step's timestep (image-to-image, see `sdedit`); concat (B, C', h, w) is stacked onto the channels
        of x_t at every step (the inpainting UNet's mask and masked-image latents). tiling: denoise in blended
        windows (MultiDiffusion, `tiled_sampling`), each window guided. guidance_rescale: the std rescale of the
        guided prediction (Lin et al. 2023, sec. 3.4; diffusers' guidance_rescale). A callback that sets
        `pipe._interrupt` ends the loop after its step: the sample of that step is returned. grad: with autograd,
        for training uses (every stage runs without by default: `pipelines.stages`). schedule: conditioning that
        changes per step (A1111's AND, [from:to:when], [a|b]: `prompt_encoding`), in place of cond / uncond.
        model: the UNet call with the pipeline's other conditioning bound (SDXL's added_cond); default the UNet.
        control: ControlNets (or adapters) bound to their hints (`control.Control`): the outermost model wrapper
        (outside `concat`), its step counted by the callback over the steps run (start_step .. N-1); with tiling,
        each window's hint is cropped to it.
        """
        if tiling is not None and concat is not None:
            raise InputError("tiled sampling does not slice concatenated conditioning", where="tiling",
                             expected="tiling=None with concat (inpainting)", found=tiling)
        model = self.unet if model is None else model
        # DeepCache / FreeU (`step_cache`): the UNet's keywords, the step counted over the steps run
        model, callback = self.switched(model, callback, steps=num_inference_steps - start_step)
        model = model if concat is None else concat_conditioning(model, concat)
        controller = None if control is None else control.bind(model, steps=num_inference_steps - start_step)
        model = model if controller is None else controller
        if schedule is None:
            denoise_fn = classifier_free_guidance(model, context=cond, uncond_context=uncond,
                                                  guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
        else:
            denoise_fn = schedule.denoiser(model, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
            callback = schedule.counting(callback, start_step)
        if controller is not None:
            callback = controller.counting(callback)
        if tiling is not None:
            denoise_fn = tiled_denoiser(denoise_fn, tiling,
                                        on_window=None if controller is None else controller.on_window)
        per_block = self.release_weights == "blocks" and not acceleration._is_compiled(self.unet)
        with released_after_each_block(self.unet) if per_block else contextlib.nullcontext():
            try:
                z0 = sample_from_step(sampler or self.sampler, denoise_fn, x_T, self.noise_scheduler,
                                      num_inference_steps, first=start_step, generator=generator, callback=callback,
                                      progress=progress)
            except Interrupted as stop:    # `pipe._interrupt` set by a callback: the sample of that step
                z0 = stop.x
        # one reduction after the loop, never per step (on CUDA a check is a host sync)
        return check_finite_output(z0, stage="denoising", step=num_inference_steps, steps=num_inference_steps,
                                   dtype=self.unet.dtype)

    # ---- beyond the training size ----------------------------------------------------------------
    def tiling(self, tile_size: TileSize | None, tile_overlap: TileSize | None = None) -> LatentTiling | None:
        """Pixel tile settings -> LatentTiling (checked), or None for tile_size None (plain sampling)."""
        if tile_size is None:
            if tile_overlap is not None:
                raise InputError("tile_overlap needs a tile_size", where="tile_overlap",
                                 expected="tile_size set, or tile_overlap=None", found=tile_overlap)
            return None
        return latent_tiling(tile_size, tile_overlap, factor=self.vae_scale_factor)

