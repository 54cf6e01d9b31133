"""The SDXL base pipeline folder the SDXL benchmarks load: Stable Diffusion XL 1.0 base's architecture (2.6 B UNet,
the SDXL VAE, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders) with random weights, written by diffusers'
`save_pretrained` in **bf16** (7 GB instead of 14: both libraries read the same bytes, and an fp32 load upcasts them
exactly, so fp32 comparisons are on identical weights too).

Built by `common.folder("sdxl")` in a child process (peak about 8 GB: the parts are built in bf16 one at a time).
The tokenizers are the tests' offline CLIP tokenizer (a few hundred tokens of CLIP's byte-level BPE; the text
encoders keep CLIP's 49408-token embedding tables, so only the ids differ from the real tokenizers); tokenizer_2
pads with "!" as SDXL's does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

# The non-default entries of stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (the rest are diffusers'
# UNet2DConditionModel defaults): levels 320 / 640 / 1280, no attention at the first level, transformer depths
# 1 / 2 / 10 with head dims of 64 (5, 10, 20 heads), a 2048-wide context and the text_time add embedding fed by
# the 1280-wide pooled bigG output plus 6 numbers x 256 sinusoids (1280 + 1536 = 2816).
SDXL_BASE_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True)
# The SDXL VAE: the SD VAE's architecture with SDXL's scaling factor, and force_upcast (it overflows in fp16).
SDXL_VAE: dict[str, Any] = dict(
    block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2, sample_size=1024,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.13025, force_upcast=True)
# text_encoder (CLIP ViT-L/14 text tower) and text_encoder_2 (OpenCLIP ViT-bigG/14's, with its 1280 x 1280
# projection), as in the base model's text_encoder*/config.json.
CLIP_L: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              hidden_act="quick_gelu")
CLIP_BIGG: dict[str, Any] = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                 hidden_act="gelu")
BIGG_PROJECTION = 1280
CLIP_VOCAB = 49408
# The base model's scheduler_config.json (EulerDiscreteScheduler).
SDXL_SCHEDULER: dict[str, Any] = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
    steps_offset=1, num_train_timesteps=1000, timestep_spacing="leading", interpolation_type="linear",
    prediction_type="epsilon", sample_max_value=1.0, use_karras_sigmas=False)


def text_encoder(config: dict[str, Any], *, seed: int, projection: int | None = None) -> Any:
    """A transformers CLIP text tower of the given width and depth, random (layer norms too), with CLIP's vocabulary
    size and the tests' tokenizer's special ids; CLIPTextModelWithProjection when `projection` is given."""
    import torch
    from tests._support.tiny_clip import random_clip_text_model, tiny_clip_config

    clip = tiny_clip_config(**config, vocab_size=CLIP_VOCAB)
    if projection is not None:
        clip.projection_dim = projection
    architecture = "CLIPTextModel" if projection is None else "CLIPTextModelWithProjection"
    return random_clip_text_model(clip, seed=seed, architecture=architecture).to(torch.bfloat16)


def bf16_module(build: Any, seed: int) -> Any:
    """build() under a bf16 default dtype (the fp32 UNet would need 10 GB), then its zero-initialised parameters
    given random values (tests' `randomize`) so that every weight takes part in the comparison."""
    import torch
    from tests._support.parity import randomize

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            return randomize(build().eval(), seed)
    finally:
        torch.set_default_dtype(default)


def build_sdxl(path: Path) -> None:
    """Write the SDXL base-architecture pipeline folder (random weights, bf16) into `path`."""
    import diffusers
    from tests._support.sdxl import write_tokenizer_2
    from tests._support.tiny_clip import write_tiny_clip_tokenizer
    from transformers import CLIPTokenizer

    unet = bf16_module(lambda: diffusers.UNet2DConditionModel(**SDXL_BASE_UNET), 1)
    vae = bf16_module(lambda: diffusers.AutoencoderKL(**SDXL_VAE), 2)
    one = text_encoder(CLIP_L, seed=11)
    two = text_encoder(CLIP_BIGG, seed=12, projection=BIGG_PROJECTION)
    tok1 = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(path / "_build" / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(write_tokenizer_2(path / "_build" / "tokenizer_2"))
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=one, text_encoder_2=two, tokenizer=tok1, tokenizer_2=tok2, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), add_watermarker=False)
    pipe.save_pretrained(path)
