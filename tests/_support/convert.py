"""Tiny diffusers models for the conversion tests, their (config, state) parts, and exact tensor comparison."""
from __future__ import annotations

import diffusers
import torch


def seeded(build, seed=0):
    torch.manual_seed(seed)
    return build().eval()


def vae(levels=4, cls=diffusers.AutoencoderKL, **kw):
    return seeded(lambda: cls(block_out_channels=(32,) * (levels - 2) + (64, 64), layers_per_block=1,
                              down_block_types=("DownEncoderBlock2D",) * levels,
                              up_block_types=("UpDecoderBlock2D",) * levels, **kw))


def parts_of(**models):
    out = {}
    for name, m in models.items():
        config = m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)
        out[name] = (config, m.state_dict())
    return out


def same_tensors(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def tiny_ldm():
    unet = seeded(lambda: diffusers.UNet2DModel(
        block_out_channels=(32, 64), layers_per_block=1, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"), attention_head_dim=8, in_channels=3, out_channels=3))
    vq = vae(3, diffusers.VQModel, latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3)
    yaml = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "image_size": 8,
        "unet_config": {"params": {"in_channels": 3, "out_channels": 3, "model_channels": 32, "channel_mult": [1, 2],
                                   "attention_resolutions": [1], "num_res_blocks": 1, "num_head_channels": 8}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": 3, "n_embed": 16, "ddconfig": {"z_channels": 3, "resolution": 32, "in_channels": 3,
                                                        "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 2],
                                                        "num_res_blocks": 1, "attn_resolutions": []}}},
        "cond_stage_config": "__is_unconditional__"}}}
    return unet, vq, yaml
