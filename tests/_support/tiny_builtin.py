"""A tiny stand-in for the built-in model (same layout as latentdiff/shapes-64: KL autoencoder f = 4, LDMBert,
word-level tokenizer, DDIM), with random weights, for tests of the command line and the docs that must not
depend on the trained model's size or speed.

    folder = make_tiny_shapes_model(tmp_path / "shapes-64")
    use_as_builtin(monkeypatch, folder)      # "latentdiff/shapes-64" now resolves to `folder`
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def make_tiny_shapes_model(folder: Path, *, seed: int = 0, settings: dict | None = None) -> Path:
    """Write a tiny random text-to-image pipeline folder shaped like the built-in model (64 px -> 16 x 16)."""
    from latentdiff import AutoencoderKL, DDIMSampler, LatentDiffusionPipeline, NoiseScheduler, UNet2DConditional
    from latentdiff.builtin import GENERATE_SETTINGS
    from latentdiff.data.shapes import TOKENIZER_MAX_LENGTH, write_tokenizer
    from latentdiff.models.autoencoder_kl import AutoencoderKLConfig
    from latentdiff.models.ldm_bert import LDMBert, LDMBertConfig, LDMBertTextEncoder, load_bert_tokenizer
    from latentdiff.models.text_encoder import TextEncoderConfig
    from latentdiff.models.unet import UNetConfig

    torch.manual_seed(seed)
    folder = Path(folder)
    tokenizer = load_bert_tokenizer(write_tokenizer(folder.parent / f"{folder.name}-tokenizer"))
    bert = LDMBert(LDMBertConfig(vocab_size=32, max_position_embeddings=TOKENIZER_MAX_LENGTH, d_model=32,
                                 encoder_layers=1, encoder_ffn_dim=64, encoder_attention_heads=2, head_dim=16))
    text_encoder = LDMBertTextEncoder(bert.eval(), tokenizer, TextEncoderConfig(max_length=TOKENIZER_MAX_LENGTH))
    vae = AutoencoderKL(AutoencoderKLConfig(latent_channels=4, channels=(8, 16, 16), layers_per_level=1,
                                            norm_num_groups=8, sample_size=64)).eval()
    unet = UNet2DConditional(UNetConfig(in_channels=4, out_channels=4, sample_size=16, channels=(16, 32),
                                        attention_levels=(True, True), attention_heads=2, layers_per_level=1,
                                        norm_num_groups=8, cross_attention_dim=32)).eval()
    pipe = LatentDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, noise_scheduler=NoiseScheduler(),
                                   sampler=DDIMSampler())
    pipe.save_pretrained(folder)
    defaults = {"num_inference_steps": 4, "guidance_scale": 3.0, "sampler": "ddim", "height": 64, "width": 64}
    (folder / GENERATE_SETTINGS).write_text(json.dumps(settings or defaults, indent=2) + "\n")
    return folder


def use_as_builtin(monkeypatch, folder: Path, name: str = "latentdiff/shapes-64") -> None:
    """Make the built-in name `name` resolve to `folder` for the rest of the test."""
    import latentdiff.builtin as builtin

    monkeypatch.setattr(builtin, "ROOT", Path(folder).parent)
    monkeypatch.setattr(builtin, "BUILTIN_MODELS", {**builtin.BUILTIN_MODELS, name: Path(folder).name})


def make_tiny_shapes_tiny_vae(folder: Path, base: Path) -> Path:
    """A stand-in for latentdiff/shapes-64-tiny-vae: a random AutoencoderTiny in `base`'s latent space (its first
    stage's latent channels and factor), 8 channels wide."""
    from latentdiff import AutoencoderKL, AutoencoderTiny, AutoencoderTinyConfig

    vae = AutoencoderKL.from_pretrained(base, subfolder="vqvae")
    levels = vae.downsample_factor.bit_length()
    config = AutoencoderTinyConfig(latent_channels=vae.latent_channels, encoder_channels=(8,) * levels,
                                   decoder_channels=(8,) * levels, encoder_blocks=(1,) * levels,
                                   decoder_blocks=(1,) * levels)
    torch.manual_seed(1)
    AutoencoderTiny(config).save_pretrained(folder)
    return folder


def make_tiny_silhouette_controlnet(folder: Path, base: Path) -> Path:
    """A stand-in for latentdiff/shapes-64-silhouette: a ControlNet made from `base`'s UNet (its zero convolutions
    zero, so it adds nothing), hint encoder 64 px -> 16 x 16 like the shipped one."""
    from latentdiff import ControlNet, UNet2DConditional

    unet = UNet2DConditional.from_pretrained(base, subfolder="unet")
    ControlNet.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96)).save_pretrained(folder)
    return folder
