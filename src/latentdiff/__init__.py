"""latentdiff: a modular latent-diffusion toolkit (Rombach et al., CVPR 2022).

Public names are imported lazily so that `import latentdiff` stays cheap: torch, transformers and
accelerate load only when a part that needs them is used.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_LAZY = {
    "LatentDiffusionPipeline": "latentdiff.pipelines.latent_diffusion",
    "PipelineOutput": "latentdiff.pipelines.base",
    "Pipeline": "latentdiff.pipelines.base",
    "ImageToImagePipeline": "latentdiff.pipelines.image_to_image",
    "DenoisingPipeline": "latentdiff.pipelines.denoising",
    "UnconditionalPipeline": "latentdiff.pipelines.unconditional",
    "SuperResolutionPipeline": "latentdiff.pipelines.super_resolution",
    "ClassConditionalPipeline": "latentdiff.pipelines.class_conditional",
    "LayoutToImagePipeline": "latentdiff.pipelines.layout_to_image",
    "InpaintPipeline": "latentdiff.pipelines.inpaint",
    "StableDiffusionXLPipeline": "latentdiff.pipelines.sdxl",
    "StableDiffusionXLImg2ImgPipeline": "latentdiff.pipelines.sdxl_image",
    "StableDiffusionXLInpaintPipeline": "latentdiff.pipelines.sdxl_inpaint",
    "AutoencoderKL": "latentdiff.models.autoencoder_kl",
    "AutoencoderKLConfig": "latentdiff.models.autoencoder_kl",
    "AutoencoderTiny": "latentdiff.models.autoencoder_tiny",
    "AutoencoderTinyConfig": "latentdiff.models.autoencoder_tiny",
    "VQModel": "latentdiff.models.vq",
    "VQModelConfig": "latentdiff.models.vq",
    "IdentityFirstStage": "latentdiff.models.identity",
    "IdentityFirstStageConfig": "latentdiff.models.identity",
    "UNet2DConditional": "latentdiff.models.unet",
    "ControlNet": "latentdiff.models.controlnet",
    "ControlNetConfig": "latentdiff.models.controlnet",
    "T2IAdapter": "latentdiff.models.t2i_adapter",
    "T2IAdapterConfig": "latentdiff.models.t2i_adapter",
    "UNetConfig": "latentdiff.models.unet",
    "UNet2D": "latentdiff.models.unet2d",
    "UNet2DConfig": "latentdiff.models.unet2d",
    "TextEncoder": "latentdiff.models.text_encoder",
    "ClassEmbedder": "latentdiff.models.conditioners",
    "SpatialRescaler": "latentdiff.models.conditioners",
    "LDMBert": "latentdiff.models.ldm_bert",
    "LDMBertConfig": "latentdiff.models.ldm_bert",
    "LDMBertTextEncoder": "latentdiff.models.ldm_bert",
    "TextEncoderConfig": "latentdiff.models.text_encoder",
    "NoiseScheduler": "latentdiff.diffusion.noise_scheduler",
    "NoiseSchedulerConfig": "latentdiff.diffusion.noise_scheduler",
    "DDIMSampler": "latentdiff.diffusion.samplers",
    "DDPMSampler": "latentdiff.diffusion.samplers",
    "PLMSSampler": "latentdiff.diffusion.samplers",
    "EulerSampler": "latentdiff.diffusion.samplers",
    "EulerAncestralSampler": "latentdiff.diffusion.samplers",
    "HeunSampler": "latentdiff.diffusion.samplers",
    "LMSSampler": "latentdiff.diffusion.samplers",
    "DPMSolverMultistepSampler": "latentdiff.diffusion.samplers",
    "DPMSolverMultistepSDESampler": "latentdiff.diffusion.samplers",
    "ClassifierFreeGuidance": "latentdiff.diffusion.guidance",
    "COMPONENTS": "latentdiff.registry",
    "SAMPLERS": "latentdiff.registry",
    "PIPELINES": "latentdiff.registry",
    "LatentDiffError": "latentdiff.errors",
    "ConfigError": "latentdiff.errors",
    "CheckpointError": "latentdiff.errors",
    "RegistryError": "latentdiff.errors",
    "InputError": "latentdiff.errors",
    "NumericalError": "latentdiff.errors",
}

__all__ = [  # literal, so linters and IDEs see the public names; the same as _LAZY's keys (tests/test_public_api.py)
    "AutoencoderKL", "AutoencoderKLConfig", "AutoencoderTiny", "AutoencoderTinyConfig", "COMPONENTS", "CheckpointError",
    "ClassConditionalPipeline",
    "ControlNet", "ControlNetConfig", "T2IAdapter", "T2IAdapterConfig",
    "ClassEmbedder", "ClassifierFreeGuidance", "ConfigError", "DDIMSampler", "DDPMSampler",
    "DPMSolverMultistepSDESampler", "DPMSolverMultistepSampler", "DenoisingPipeline", "EulerAncestralSampler",
    "EulerSampler", "HeunSampler", "IdentityFirstStage", "IdentityFirstStageConfig", "ImageToImagePipeline",
    "InpaintPipeline", "InputError", "LDMBert", "LDMBertConfig", "LDMBertTextEncoder", "LMSSampler",
    "LatentDiffError", "LatentDiffusionPipeline", "LayoutToImagePipeline", "NoiseScheduler", "NoiseSchedulerConfig",
    "NumericalError",
    "PIPELINES", "PLMSSampler", "Pipeline", "PipelineOutput", "RegistryError", "SAMPLERS", "SpatialRescaler",
    "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline", "StableDiffusionXLPipeline",
    "SuperResolutionPipeline", "TextEncoder", "TextEncoderConfig", "UNet2D", "UNet2DConditional", "UNet2DConfig",
    "UNetConfig", "UnconditionalPipeline", "VQModel", "VQModelConfig", "__version__",
]


SUBPACKAGES = ("control",)   # `latentdiff.control.canny(...)` after a plain `import latentdiff`


def __getattr__(name: str) -> Any:
    if name in SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'latentdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .diffusion.guidance import ClassifierFreeGuidance
    from .diffusion.noise_scheduler import NoiseScheduler, NoiseSchedulerConfig
    from .diffusion.samplers import (
        DDIMSampler,
        DDPMSampler,
        DPMSolverMultistepSampler,
        DPMSolverMultistepSDESampler,
        EulerAncestralSampler,
        EulerSampler,
        HeunSampler,
        LMSSampler,
        PLMSSampler,
    )
    from .errors import CheckpointError, ConfigError, InputError, LatentDiffError, RegistryError
    from .models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
    from .models.autoencoder_tiny import AutoencoderTiny, AutoencoderTinyConfig
    from .models.conditioners import ClassEmbedder, SpatialRescaler
    from .models.controlnet import ControlNet, ControlNetConfig
    from .models.identity import IdentityFirstStage, IdentityFirstStageConfig
    from .models.ldm_bert import LDMBert, LDMBertConfig, LDMBertTextEncoder
    from .models.t2i_adapter import T2IAdapter, T2IAdapterConfig
    from .models.text_encoder import TextEncoder, TextEncoderConfig
    from .models.unet import UNet2DConditional, UNetConfig
    from .models.unet2d import UNet2D, UNet2DConfig
    from .models.vq import VQModel, VQModelConfig
    from .pipelines.base import Pipeline, PipelineOutput
    from .pipelines.class_conditional import ClassConditionalPipeline
    from .pipelines.denoising import DenoisingPipeline
    from .pipelines.image_to_image import ImageToImagePipeline
    from .pipelines.inpaint import InpaintPipeline
    from .pipelines.latent_diffusion import LatentDiffusionPipeline
    from .pipelines.layout_to_image import LayoutToImagePipeline
    from .pipelines.sdxl import StableDiffusionXLPipeline
    from .pipelines.sdxl_image import StableDiffusionXLImg2ImgPipeline
    from .pipelines.sdxl_inpaint import StableDiffusionXLInpaintPipeline
    from .pipelines.super_resolution import SuperResolutionPipeline
    from .pipelines.unconditional import UnconditionalPipeline
    from .registry import COMPONENTS, PIPELINES, SAMPLERS
