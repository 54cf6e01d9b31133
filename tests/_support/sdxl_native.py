"""Tiny SDXL base and refiner folders written with latentdiff's own classes (no diffusers, no transformers import:
seconds instead of tens of seconds), for the command-line and server tests, which compare latentdiff with itself.

    base = write_tiny_sdxl(tmp / "base")                      # the diffusers layout tests/_support/sdxl.py's
    refiner = write_tiny_sdxl(tmp / "refiner", kind="refiner")   # tiny_sdxl writes, same configs, other weights

The configs are tests/_support/sdxl.py's (UNet, VAE, scheduler, both tokenizers); the text encoders latentdiff's
native CLIP classes, saved in transformers' layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests._support.parity import randomize
from tests._support.sdxl import (
    PROJECTION,
    SDXL_SCHEDULER,
    SDXL_VAE,
    TE1_HIDDEN,
    TE2_HIDDEN,
    tiny_unet_config,
    write_tokenizer_2,
)
from tests._support.tiny_clip import BOS, EOS, TINY_VOCAB_SIZE, tiny_clip_vocab, write_tiny_clip_tokenizer


def clip_config(*, hidden: int, heads: int, layers: int, act: str, projection: int | None = None) -> dict:
    """transformers' CLIPTextConfig keys of a tiny text tower (the tiny tokenizer's special ids)."""
    vocab = tiny_clip_vocab()
    config = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
                  bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    if projection is not None:
        config |= {"projection_dim": projection, "architectures": ["CLIPTextModelWithProjection"]}
    return config


def write_tiny_sdxl(folder: str | Path, *, kind: str = "base", layers: int = 3, seed: int = 0) -> Path:
    """A diffusers SDXL folder ("base": StableDiffusionXLPipeline; "refiner": StableDiffusionXLImg2ImgPipeline,
    bigG only, requires_aesthetics_score; "inpaint": StableDiffusionXLInpaintPipeline, a 9-channel UNet) with
    random weights drawn from `seed`."""
    from latentdiff.models.autoencoder_kl import AutoencoderKL
    from latentdiff.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
    from latentdiff.models.unet import UNet2DConditional

    torch.manual_seed(seed)    # the networks' own initialisation; randomize fills the zero-initialised parameters
    folder = Path(folder)
    unet = UNet2DConditional(UNet2DConditional.from_file_config(
        tiny_unet_config(kind, in_channels=9 if kind == "inpaint" else 4)))
    randomize(unet, seed + 1).save_pretrained(folder / "unet")
    randomize(AutoencoderKL(AutoencoderKL.from_file_config(SDXL_VAE)), seed + 2).save_pretrained(folder / "vae")
    two = CLIPTextModelWithProjection(CLIPTextModelWithProjection.from_file_config(
        clip_config(hidden=TE2_HIDDEN, heads=4, layers=layers, act="gelu", projection=PROJECTION)))
    randomize(two, seed + 12).save_pretrained(folder / "text_encoder_2")
    write_tokenizer_2(folder / "tokenizer_2")
    entries: dict = {"text_encoder": [None, None], "tokenizer": [None, None]}
    if kind != "refiner":
        one = CLIPTextModel(CLIPTextModel.from_file_config(
            clip_config(hidden=TE1_HIDDEN, heads=2, layers=layers, act="quick_gelu")))
        randomize(one, seed + 11).save_pretrained(folder / "text_encoder")
        write_tiny_clip_tokenizer(folder / "tokenizer")
        entries = {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler = {"_class_name": "EulerDiscreteScheduler", **SDXL_SCHEDULER}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    refiner = kind == "refiner"
    names = {"base": "StableDiffusionXLPipeline", "refiner": "StableDiffusionXLImg2ImgPipeline",
             "inpaint": "StableDiffusionXLInpaintPipeline"}
    index = {"_class_name": names[kind],
             "_diffusers_version": "0.42.1", "vae": ["diffusers", "AutoencoderKL"],
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], **entries,
             "force_zeros_for_empty_prompt": not refiner, "requires_aesthetics_score": refiner}
    if refiner:
        index |= {"feature_extractor": [None, None], "image_encoder": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
