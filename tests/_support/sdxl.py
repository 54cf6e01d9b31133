"""Tiny Stable Diffusion XL pipelines (base, refiner, inpainting) with random weights, built by diffusers and saved
as diffusers folders, for parity tests.

    ref = tiny_sdxl(tmp / "base")                    # diffusers StableDiffusionXLPipeline, saved in tmp / "base"
    ref = tiny_sdxl(tmp / "refiner", kind="refiner")  # StableDiffusionXLImg2ImgPipeline: bigG only, aesthetic score

The structure of the real models at tiny width: CLIP-L-like text encoder 1 (hidden 16, quick_gelu) and a
bigG-like text encoder 2 with a projection (hidden 32, gelu, projection 24, so a missing or transposed projection
cannot pass); their penultimate hidden states concatenated to a 48-wide context (the refiner: 32, bigG only); the
pooled projection (24) and 6 (refiner: 5) micro-conditioning numbers of 8 sinusoids each into the add embedding;
SDXL's tokenizer_2 pads with "!" (id 0) where tokenizer 1 pads with the end token; the VAE's scaling factor is
SDXL's 0.13025 (and force_upcast). Images are 32 x 32 pixels (f = 2, latents 4 x 16 x 16).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests._support.parity import randomize
from tests._support.sd import TINY_VAE
from tests._support.tiny_clip import random_clip_text_model, tiny_clip_config, write_tiny_clip_tokenizer

TE1_HIDDEN, TE2_HIDDEN, PROJECTION, TIME_DIM = 16, 32, 24, 8
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000, timestep_spacing="leading",
                      interpolation_type="linear", prediction_type="epsilon", sample_max_value=1.0,
                      use_karras_sigmas=False)
SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025, force_upcast=True)


def tiny_unet_config(kind: str = "base", *, in_channels: int = 4) -> dict[str, Any]:
    """The UNet config of a tiny SDXL `kind` ("base", "refiner"): SDXL's block types, transformer depths per level,
    linear projections and the text_time add embedding, at reduced width."""
    numbers = 5 if kind == "refiner" else 6
    context = TE2_HIDDEN if kind == "refiner" else TE1_HIDDEN + TE2_HIDDEN
    return dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=in_channels,
                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=PROJECTION + numbers * TIME_DIM,
                cross_attention_dim=context, norm_num_groups=8)


def write_tokenizer_2(folder: Path) -> Path:
    """SDXL's tokenizer_2 (OpenCLIP's): the CLIP vocabulary padded with "!" (id 0)."""
    write_tiny_clip_tokenizer(folder)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text())
        data["pad_token"] = "!"
        (folder / name).write_text(json.dumps(data, indent=2))
    return folder


def text_encoders(folder: Path, *, layers: int = 3) -> tuple[Any, Any, Any, Any]:
    """(text_encoder, tokenizer, text_encoder_2, tokenizer_2) of transformers, tiny and random (the tokenizers'
    files written beside `folder`)."""
    from transformers import CLIPTokenizer

    one = random_clip_text_model(tiny_clip_config(hidden_size=TE1_HIDDEN, num_attention_heads=2,
                                                  num_hidden_layers=layers, hidden_act="quick_gelu"), seed=11)
    config = tiny_clip_config(hidden_size=TE2_HIDDEN, num_attention_heads=4, num_hidden_layers=layers,
                              hidden_act="gelu")
    config.projection_dim = PROJECTION
    two = random_clip_text_model(config, seed=12, architecture="CLIPTextModelWithProjection")
    sources = folder.with_name(folder.name + "_sources")   # beside the pipeline folder, not in it
    tok1 = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(sources / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(write_tokenizer_2(sources / "tokenizer_2"))
    return one, tok1, two, tok2


def tiny_sdxl(folder: str | Path, *, kind: str = "base", scheduler_class: str = "EulerDiscreteScheduler",
              save: bool = True, layers: int = 3) -> Any:
    """A diffusers SDXL pipeline of tiny random parts, saved to `folder` (save=True) as diffusers writes it.

    kind: "base" (StableDiffusionXLPipeline, both encoders, force_zeros_for_empty_prompt), "refiner"
    (StableDiffusionXLImg2ImgPipeline, bigG only, requires_aesthetics_score) or "inpaint"
    (StableDiffusionXLInpaintPipeline with a 9-channel UNet)."""

    folder = Path(folder)
    encoders = text_encoders(folder, layers=layers)
    pipe = assemble(kind, encoders, unet_config=tiny_unet_config(kind, in_channels=9 if kind == "inpaint" else 4),
                    vae_config=SDXL_VAE, scheduler_class=scheduler_class)
    if save:
        pipe.save_pretrained(folder)
    return pipe


def assemble(kind: str, encoders: tuple[Any, Any, Any, Any], *, unet_config: dict[str, Any],
             vae_config: dict[str, Any], scheduler_class: str) -> Any:
    """The diffusers SDXL pipeline of `kind` over the text `encoders` (`text_encoders`' four) and a UNet and VAE of
    these configs with random weights (seeded: the same configs give the same weights)."""
    import diffusers

    one, tok1, two, tok2 = encoders
    torch.manual_seed(0)
    unet = randomize(diffusers.UNet2DConditionModel(**unet_config), 1).eval()
    vae = randomize(diffusers.AutoencoderKL(**vae_config), 2).eval()
    scheduler = getattr(diffusers, scheduler_class).from_config(SDXL_SCHEDULER)
    if kind == "refiner":
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=two, tokenizer_2=tok2, unet=unet,
            scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    else:
        cls = diffusers.StableDiffusionXLInpaintPipeline if kind == "inpaint" else diffusers.StableDiffusionXLPipeline
        pipe = cls(vae=vae, text_encoder=one, tokenizer=tok1, text_encoder_2=two, tokenizer_2=tok2, unet=unet,
                   scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
