"""SDXL with a tiny autoencoder as its first stage: the images are the tiny decode of the latents it makes."""
from __future__ import annotations

import pytest
import torch

from latentdiff.models.autoencoder_tiny import AutoencoderTiny, AutoencoderTinyConfig
from tests._support.parity import assert_parity

pytestmark = pytest.mark.usefixtures("one_thread")



def test_sdxl_decodes_with_the_tiny_autoencoder(tmp_path):
    from latentdiff.pipelines.sdxl import StableDiffusionXLPipeline
    from tests._support.sdxl import tiny_sdxl

    tiny_sdxl(tmp_path / "sdxl")
    base = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl")
    levels = base.vae.downsample_factor.bit_length()
    torch.manual_seed(0)
    tiny = AutoencoderTiny(AutoencoderTinyConfig(encoder_channels=(8,) * levels, decoder_channels=(8,) * levels,
                                                 encoder_blocks=(1,) * levels, decoder_blocks=(1,) * levels)).eval()
    fast = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl", vae=tiny)
    common = dict(num_inference_steps=2, height=32, width=32)
    latents = fast("a cat", output_type="latent", generator=torch.Generator().manual_seed(0), **common).images
    images = fast("a cat", output_type="pt", generator=torch.Generator().manual_seed(0), **common).images
    with torch.no_grad():
        assert_parity(images, (tiny.decode_latents(latents).clamp(-1, 1) + 1) / 2, tol=1e-5)
