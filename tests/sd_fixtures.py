"""Tiny (and full-size) Stable Diffusion pipelines with random weights, built by diffusers, for parity tests."""
from __future__ import annotations

from pathlib import Path

import torch

from .tiny_clip import make_tiny_clip

TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=2, norm_num_groups=8)
TINY_VAE = dict(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8, sample_size=32)
# f = 8 like the real first stages (diffusers' LDMTextToImagePipeline hard-codes height // 8 for its latents).
TINY_VAE_F8 = dict(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   layers_per_block=1, norm_num_groups=4, sample_size=64)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


def randomize(model: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Give zero-initialised parameters (diffusers zero-inits some output layers) random values, so
    a parity test compares real computations and can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_diffusers_pipeline(folder: Path, *, scheduler_class: str = "DDIMScheduler", unet_in_channels: int = 4):
    """A diffusers StableDiffusionPipeline with tiny random parts (CLIP hidden 32, UNet 32/64, VAE f=2).

    unet_in_channels=9 gives an inpainting UNet (latents + mask + masked-image latents)."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    text_dir, tok_dir = make_tiny_clip(folder / "_clip")
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

    from .test_ldm_bert import reference_model, write_bert_tokenizer

    tokenizer = BertTokenizer.from_pretrained(write_bert_tokenizer(Path(folder) / "_bert_tokenizer"))
    bert = reference_model(seed=3)
    torch.manual_seed(0)
    unet = randomize(diffusers.UNet2DConditionModel(**(TINY_UNET | dict(sample_size=8))), 1)
    vae = randomize(diffusers.AutoencoderKL(**TINY_VAE_F8), 2)
    scheduler = getattr(diffusers, scheduler_class).from_config(SD_SCHEDULER)
    pipe = diffusers.LDMTextToImagePipeline(vqvae=vae, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
