"""The whole pipeline at the full Stable Diffusion v1.5 architecture (860M UNet, SD VAE, CLIP ViT-L/14
text encoder), random weights, small resolution: latentdiff equals diffusers."""
from __future__ import annotations

import pytest
import torch

from latentdiff import AutoencoderKL, LatentDiffusionPipeline, NoiseScheduler, TextEncoder, UNet2DConditional
from latentdiff.diffusion.scheduler_io import load_scheduler_folder
from tests._support.parity import assert_parity
from tests._support.sd import CLIP_L, SD15_UNET, SD_SCHEDULER, SD_VAE
from tests._support.tiny_clip import write_tiny_clip_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tmp = tmp_path_factory.mktemp("sd15")
    torch.manual_seed(0)
    with torch.no_grad():
        unet = diffusers.UNet2DConditionModel(**SD15_UNET).eval()
        vae = diffusers.AutoencoderKL(**SD_VAE).eval()
        for module in (unet.conv_out, vae.decoder.conv_out):  # not zero: the comparison must see real values
            module.weight.normal_(0, 0.02)
        text_model = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp / "tokenizer"))
    scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER)
    ref = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_model, tokenizer=tokenizer, unet=unet,
                                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    scheduler.save_pretrained(tmp / "scheduler")
    noise_scheduler, sampler = load_scheduler_folder(tmp / "scheduler")
    ours = LatentDiffusionPipeline(
        unet=UNet2DConditional.from_state_dict(UNet2DConditional.from_file_config(dict(unet.config)),
                                               unet.state_dict()),
        vae=AutoencoderKL.from_state_dict(AutoencoderKL.from_file_config(dict(vae.config)), vae.state_dict()),
        text_encoder=TextEncoder(text_model, tokenizer), noise_scheduler=noise_scheduler, sampler=sampler)
    return ref, ours


def test_sd15_architecture_pipeline_parity(pipes):
    ref, ours = pipes
    assert ours.unet.num_parameters() > 850_000_000
    assert isinstance(ours.noise_scheduler, NoiseScheduler)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(prompt="a church at dusk", negative_prompt="blurry", guidance_scale=7.5, num_inference_steps=5,
              latents=latents, height=64, width=64)
    with torch.no_grad():
        expected = ref(**kw, output_type="pt").images
    got = ours(**kw, output_type="pt", progress=False).images
    assert_parity(got, expected)
