"""Tiny (and full-size) Stable Diffusion pipelines with random weights, built by diffusers, for parity tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests._support.parity import randomize
from tests._support.tiny_clip import make_tiny_clip

TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=2, norm_num_groups=8)
# Three-level tiny UNets in the two layouts the UNet features care about (where levels attend, where the mid-level
# feature sits): SD's (cross-attention above, a plain coarsest level) and SDXL's (plain finest level, linear
# projections, 1-2 transformer layers, text_time embedding).
_CROSS, _DOWN, _UP_CROSS, _UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
TINY_UNET_SD_LAYOUT = dict(block_out_channels=[16, 32, 32], down_block_types=[_CROSS, _CROSS, _DOWN],
                           up_block_types=[_UP, _UP_CROSS, _UP_CROSS], layers_per_block=2, cross_attention_dim=12,
                           attention_head_dim=2, norm_num_groups=8, sample_size=8)
TINY_UNET_SDXL_LAYOUT = dict(block_out_channels=[16, 32, 32], down_block_types=[_DOWN, _CROSS, _CROSS],
                             up_block_types=[_UP_CROSS, _UP_CROSS, _UP], transformer_layers_per_block=[1, 2, 2],
                             attention_head_dim=[1, 2, 4], layers_per_block=2, cross_attention_dim=12,
                             norm_num_groups=8, sample_size=8, use_linear_projection=True,
                             addition_embed_type="text_time", addition_time_embed_dim=4,
                             projection_class_embeddings_input_dim=8 + 6 * 4)
TINY_VAE = dict(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8, sample_size=32)
# f = 8 like the real first stages (diffusers' LDMTextToImagePipeline hard-codes height // 8 for its latents).
TINY_VAE_F8 = dict(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   layers_per_block=1, norm_num_groups=4, sample_size=64)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
# The full Stable Diffusion v1.5 architecture (860M UNet, SD VAE, CLIP ViT-L/14), for the slow test and benchmarks.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2, sample_size=512,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)


def tiny_diffusers_pipeline(folder: Path, *, scheduler_class: str = "DDIMScheduler", unet_in_channels: int = 4,
                            clip_layers: int = 2):
    """A diffusers StableDiffusionPipeline with tiny random parts (CLIP hidden 32, UNet 32/64, VAE f=2).

    unet_in_channels=9 gives an inpainting UNet (latents + mask + masked-image latents); clip_layers: the CLIP
    tower's layers (clip_skip tests need more than 2)."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    text_dir, tok_dir = make_tiny_clip(folder / "_clip", num_hidden_layers=clip_layers)
    torch.manual_seed(0)
    unet = randomize(diffusers.UNet2DConditionModel(**(TINY_UNET | dict(in_channels=unet_in_channels))), 1)
    vae = randomize(diffusers.AutoencoderKL(**TINY_VAE), 2)
    scheduler = getattr(diffusers, scheduler_class).from_config(SD_SCHEDULER)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel.from_pretrained(text_dir), tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ldm_text2im_pipeline(folder: Path, *, scheduler_class: str = "DDIMScheduler"):
    """diffusers' LDMTextToImagePipeline with tiny random parts, laid out like CompVis/ldm-text2im-large-256:
    LDMBert (d_model 32, 2 layers) + BERT tokenizer, the tiny cross-attention UNet, a KL autoencoder with f = 8."""
    import diffusers
    from transformers import BertTokenizer

    from tests._support.ldm_bert import reference_model, write_bert_tokenizer

    tokenizer = BertTokenizer.from_pretrained(write_bert_tokenizer(Path(folder) / "_bert_tokenizer"))
    bert = reference_model(seed=3)
    torch.manual_seed(0)
    unet = randomize(diffusers.UNet2DConditionModel(**(TINY_UNET | dict(sample_size=8))), 1)
    vae = randomize(diffusers.AutoencoderKL(**TINY_VAE_F8), 2)
    scheduler = getattr(diffusers, scheduler_class).from_config(SD_SCHEDULER)
    pipe = diffusers.LDMTextToImagePipeline(vqvae=vae, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- inputs, and one run of ours and of diffusers' with the same seeds ----------------------------------------
def random_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def seeds(*values):
    generators = [torch.Generator().manual_seed(v) for v in values]
    return generators if len(generators) > 1 else generators[0]


def run_both(ref, pipe, *args, gens=(0,), **kw):
    """(ours, diffusers') np images and final latents from one run each (the latents via the step callbacks),
    each run with fresh generators seeded `gens`."""
    final = {}

    def grab(_, i, t, tensors):
        final["ref"] = tensors["latents"]
        return tensors

    with torch.no_grad():
        expected = ref(*args, **kw, generator=seeds(*gens), callback_on_step_end=grab, output_type="np").images
    if "image" in kw:  # diffusers' keyword; ours is positional (prompt, image)
        args, kw = args + (kw.pop("image"),), kw
    ours = pipe(*args, **kw, generator=seeds(*gens), callback=lambda i, t, x: final.update(ours=x.clone()),
                output_type="np", progress=False).images
    return (torch.from_numpy(ours), final["ours"]), (torch.from_numpy(expected), final["ref"])


def random_mask() -> np.ndarray:
    """(32, 32) uint8: 255 (repaint) in a rectangle, 0 elsewhere, with grey values on both sides of 0.5."""
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    mask[0, :] = 127   # below 0.5 after /255: kept
    mask[1, :] = 128   # above: repainted
    return mask
