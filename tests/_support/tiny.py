"""Tiny latentdiff configs shared by several test modules (the tiny diffusers-side configs are in sd.py, ldm.py
and first_stage.py): small enough that a forward pass costs milliseconds, with every feature the tests touch."""
from __future__ import annotations

from typing import Any

from latentdiff.models.autoencoder_kl import AutoencoderKLConfig

# The training tests' models, as the "architecture" / "unet" sections of a YAML config (lists, not tuples).
TINY_KL = {"channels": [8, 16], "layers_per_level": 1, "latent_channels": 4, "norm_num_groups": 4,
           "sample_size": 16, "mid_block_attention": False}
TINY_UNET = {"in_channels": 4, "out_channels": 4, "sample_size": 8, "channels": [16, 32],
             "attention_levels": [False, True], "layers_per_level": 1, "attention_heads": 2,
             "cross_attention_dim": 32, "norm_num_groups": 8}
TINY_UNET2D = {"in_channels": 4, "out_channels": 4, "sample_size": 8, "channels": [16, 32],
               "attention_levels": [False, True], "layers_per_level": 1, "attention_head_dim": 8,
               "norm_num_groups": 8}


def tiny_kl_config(**changes: Any) -> AutoencoderKLConfig:
    """The smallest KL autoencoder the tests build: two levels (f = 2), 8 and 16 channels, 4 norm groups."""
    return AutoencoderKLConfig(**({"channels": (8, 16), "norm_num_groups": 4} | changes))
