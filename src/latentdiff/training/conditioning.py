"""Stage 2's conditioning modes as one small strategy each, chosen once from `model.conditioning`:

    text      a caption through the text encoder, cross-attended (LatentDiffusionPipeline)
    class     a class id through the UNet's label table, the last row the null class (ClassConditionalPipeline)
    low_res   the low-resolution image concatenated to z_t, x4 super-resolution (SuperResolutionPipeline)
    none      nothing (UnconditionalPipeline)

A strategy says what the data and the UNet must offer (the config checks read it), how a training batch
conditions the UNet (with conditioning dropout: the caption replaced by "", the class by the null class), which
pipeline samples and exports the model, and how a preview runs: through that pipeline's own stages
(encode_prompt / encode_labels, denoise / sample with `diffusion.guidance`), so a preview is what the exported
pipeline computes on the same weights and seeds.

One difference from the pipelines' `__call__`, kept from the trainer's previews: a preview guides at every
guidance_scale but 1 (s < 1 included), where `__call__` guides only above 1.

The trainer is passed in, not imported (it imports this module); it provides `text_encoder`, `num_classes`,
`device`, `train_set`, `config` and `preview_images(count)`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..pipelines.base import concat_conditioning
from ..pipelines.class_conditional import ClassConditionalPipeline
from ..pipelines.latent_diffusion import LatentDiffusionPipeline
from ..pipelines.super_resolution import LOW_RES_CHANNELS, SuperResolutionPipeline
from ..pipelines.unconditional import UnconditionalPipeline

PREVIEW_IMAGES = 4  # low-res images / classes a preview shows when the sample section names none
Inputs = tuple[torch.Tensor, dict[str, Any]]  # the UNet's input and its conditioning keywords


class Conditioning:
    """How one conditioning mode enters training, previews and the export. The base class is `none`."""

    name: ClassVar[str] = "none"
    labels: ClassVar[str | None] = None      # what the data must be labelled with ("captions", "classes")
    context: ClassVar[bool] = False          # a text encoder's context, cross-attended by the UNet
    class_embeds: ClassVar[bool] = False     # the UNet's label table: one row per class plus the null class
    extra_channels: ClassVar[int] = 0        # image channels concatenated to z_t
    scaled_latents: ClassVar[bool] = True    # z0 = first-stage latents x scaling_factor (else unscaled)

    @property
    def needs_pixels(self) -> bool:
        """Whether a training step needs the images themselves, not only their (cached) latents."""
        return self.extra_channels > 0

    def unet_inputs(self, trainer: Any, x_t: torch.Tensor, batch: dict[str, Any], pixels: torch.Tensor | None,
                    drop: torch.Tensor) -> Inputs:
        """The UNet input for x_t (B, C, h, w) and its keywords; samples where `drop` (B,) get the null condition."""
        return x_t, {}

    def preview_conditions(self, trainer: Any) -> list[Any]:
        """One preview condition per grid column (the sample section's, or a default)."""
        return [None]

    def preview(self, pipeline: Any, conditions: Sequence[Any], x_T: torch.Tensor, *, guidance_scale: float,
                num_inference_steps: int) -> torch.Tensor:
        """z0 (B, C, h, w) from x_T, one condition per sample, by the pipeline's stages."""
        return pipeline.sample(pipeline.unet, x_T, num_inference_steps=num_inference_steps, progress=False)

    def build_pipeline(self, trainer: Any, parts: dict[str, Any]) -> Any:
        """The pipeline of this mode over `parts` (vae, unet, noise_scheduler, sampler) and the trainer's modules."""
        return UnconditionalPipeline(**parts)


def _with_uncond(guidance_scale: float) -> bool:
    """Whether a preview runs the unconditional branch too: at every scale but 1 (see the module doc)."""
    return guidance_scale != 1.0


class TextConditioning(Conditioning):
    name = "text"
    labels = "captions"
    context = True

    def unet_inputs(self, trainer: Any, x_t: torch.Tensor, batch: dict[str, Any], pixels: torch.Tensor | None,
                    drop: torch.Tensor) -> Inputs:
        captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist(), strict=True)]
        with torch.set_grad_enabled(trainer.config.train.train_text_encoder):
            return x_t, {"context": trainer.text_encoder(captions)}

    def preview_conditions(self, trainer: Any) -> list[Any]:
        return list(trainer.config.sample.prompts) or [""]

    def preview(self, pipeline: Any, conditions: Sequence[Any], x_T: torch.Tensor, *, guidance_scale: float,
                num_inference_steps: int) -> torch.Tensor:
        cond, uncond = pipeline.encode_prompt(list(conditions), guidance=_with_uncond(guidance_scale))
        return pipeline.denoise(x_T, cond, uncond, guidance_scale=guidance_scale,
                                num_inference_steps=num_inference_steps, progress=False)

    def build_pipeline(self, trainer: Any, parts: dict[str, Any]) -> Any:
        # CLIP: Stable Diffusion's folder layout; LDM-BERT: LDMTextToImagePipeline's
        return LatentDiffusionPipeline(text_encoder=trainer.text_encoder, **parts)


class ClassConditioning(Conditioning):
    name = "class"
    labels = "classes"
    class_embeds = True

    def unet_inputs(self, trainer: Any, x_t: torch.Tensor, batch: dict[str, Any], pixels: torch.Tensor | None,
                    drop: torch.Tensor) -> Inputs:
        labels = batch["class_label"].to(trainer.device)
        return x_t, {"class_labels": torch.where(drop, torch.full_like(labels, trainer.num_classes), labels)}

    def preview_conditions(self, trainer: Any) -> list[Any]:
        return list(trainer.config.sample.class_labels) or list(range(min(trainer.num_classes, PREVIEW_IMAGES)))

    def preview(self, pipeline: Any, conditions: Sequence[Any], x_T: torch.Tensor, *, guidance_scale: float,
                num_inference_steps: int) -> torch.Tensor:
        labels = pipeline.label_ids(list(conditions))
        cond, uncond = pipeline.encode_labels(labels, guidance=_with_uncond(guidance_scale))
        denoise = pipeline.guided_denoiser(cond, uncond, guidance_scale=guidance_scale)
        return pipeline.sample(denoise, x_T, num_inference_steps=num_inference_steps, progress=False)

    def build_pipeline(self, trainer: Any, parts: dict[str, Any]) -> Any:
        # class ids are the sorted class folders' indices; the null class is the last row
        names = list(trainer.train_set.index.class_names or ())[:trainer.num_classes]
        return ClassConditionalPipeline(id2label=dict(enumerate(names)) or None, null_class=trainer.num_classes,
                                        **parts)


class LowResConditioning(Conditioning):
    """SuperResolutionPipeline decodes z0 unscaled, as diffusers' LDMSuperResolutionPipeline and LDM-SR (trained
    on unscaled VQ latents), so this mode diffuses the first stage's unscaled latents whatever its scaling_factor."""

    name = "low_res"
    extra_channels = LOW_RES_CHANNELS
    scaled_latents = False

    def unet_inputs(self, trainer: Any, x_t: torch.Tensor, batch: dict[str, Any], pixels: torch.Tensor | None,
                    drop: torch.Tensor) -> Inputs:
        assert pixels is not None        # needs_pixels: check_conditioning rules out cached latents
        return torch.cat([x_t, low_res(pixels, x_t.shape[-2:]).to(x_t.dtype)], dim=1), {}

    def preview_conditions(self, trainer: Any) -> list[Any]:
        return list(trainer.preview_images(PREVIEW_IMAGES))

    def preview(self, pipeline: Any, conditions: Sequence[Any], x_T: torch.Tensor, *, guidance_scale: float,
                num_inference_steps: int) -> torch.Tensor:
        low = low_res(torch.stack(list(conditions)).to(x_T.device), x_T.shape[-2:])
        denoise = concat_conditioning(pipeline.unet, low.to(x_T.dtype))
        return pipeline.sample(denoise, x_T, num_inference_steps=num_inference_steps, progress=False)

    def build_pipeline(self, trainer: Any, parts: dict[str, Any]) -> Any:
        return SuperResolutionPipeline(**parts)


CONDITIONINGS: dict[str, Conditioning] = {c.name: c for c in (TextConditioning(), ClassConditioning(),
                                                               LowResConditioning(), Conditioning())}


def low_res(pixels: torch.Tensor, size: Any) -> torch.Tensor:
    """The image at the latent resolution (antialiased bicubic): the concatenated condition of x4 SR."""
    return F.interpolate(pixels, size=tuple(size), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
