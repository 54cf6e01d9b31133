"""SuperResolutionPipeline: parity with diffusers' LDMSuperResolutionPipeline on tiny random weights (x4 with an
f = 4 VQ first stage; tensor and PIL inputs; DDIM with and without eta), folders both ways, Stable Diffusion's x4
upscaler refused with a clear error (constructed, and from a single file), and bad input refused before any UNet
call."""
from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latentdiff import ConfigError, InputError
from latentdiff.convert import to_single_file
from latentdiff.models.unet import UNet2DConditional, UNetConfig
from latentdiff.pipelines.base import Pipeline
from latentdiff.pipelines.super_resolution import SuperResolutionPipeline
from tests._support.ldm import STEPS, ldm_scheduler, no_unet_calls, seeded, tiny_unet2d, tiny_vq
from tests._support.parity import assert_parity

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, cores are shared


def low_res(batch=1, size=8, seed=0) -> torch.Tensor:
    """(B, 3, size, size) float in [0, 1]: latentdiff's tensor convention (diffusers takes 2 x - 1)."""
    return torch.rand((batch, 3, size, size), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("superres")
    ref = diffusers.LDMSuperResolutionPipeline(vqvae=tiny_vq(3, scaling_factor=0.3), unet=tiny_unet2d(in_channels=6),
                                               scheduler=ldm_scheduler())
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(root / "diffusers")
    return ref, Pipeline.from_pretrained(root / "diffusers")


def run_both(ref, pipe, image, ref_image, **kw):
    with torch.no_grad():
        expected = ref(ref_image, output_type="np", generator=torch.Generator().manual_seed(0), **kw).images
    ours = pipe(image, output_type="np", generator=torch.Generator().manual_seed(0), progress=False, **kw).images
    return torch.from_numpy(ours), torch.from_numpy(expected)


def test_parity_with_diffusers_tensor_batch(setup):
    ref, pipe = setup
    assert type(pipe) is SuperResolutionPipeline and pipe.vae_scale_factor == 4
    image = low_res(2)
    ours, expected = run_both(ref, pipe, image, image * 2 - 1, num_inference_steps=STEPS)
    assert ours.shape == expected.shape == (2, 32, 32, 3)  # x4
    assert_parity(ours, expected)
    # x_T is the generator's one draw at the low-res size, and the latents are decoded unscaled
    fixed = pipe(image, latents=torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0)),
                 output_type="np", num_inference_steps=STEPS, progress=False).images
    assert_parity(torch.from_numpy(fixed), expected)


def test_parity_with_diffusers_pil_and_eta(setup):
    """A PIL image whose sides are multiples of 32 (diffusers resizes others); eta > 0 with the global RNG."""
    ref, pipe = setup
    image = Image.fromarray((low_res(size=32, seed=1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    ours, expected = run_both(ref, pipe, image, image, num_inference_steps=2)
    assert ours.shape == (1, 128, 128, 3)
    assert_parity(ours, expected)
    torch.manual_seed(7)
    with torch.no_grad():
        expected = ref(low_res() * 2 - 1, eta=1.0, output_type="np", num_inference_steps=STEPS).images
    torch.manual_seed(7)
    ours = pipe(low_res(), eta=1.0, output_type="np", num_inference_steps=STEPS, progress=False).images
    assert_parity(torch.from_numpy(ours), torch.from_numpy(expected))


def test_saved_folder_loads_in_diffusers(setup, tmp_path):
    _, pipe = setup
    pipe.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "LDMSuperResolutionPipeline" and index["vqvae"] == ["diffusers", "VQModel"]
    back = diffusers.LDMSuperResolutionPipeline.from_pretrained(tmp_path / "ours")
    back.set_progress_bar_config(disable=True)
    ours, expected = run_both(back, pipe, low_res(seed=3), low_res(seed=3) * 2 - 1, num_inference_steps=2)
    assert_parity(ours, expected)


def test_single_file_both_ways(setup, tmp_path):
    """A concat-conditioned file does not say its task: SuperResolutionPipeline.from_single_file (or task=) does."""
    _, pipe = setup
    pipe.save_single_file(tmp_path / "sr.safetensors")
    back = SuperResolutionPipeline.from_single_file(tmp_path / "sr.safetensors")
    assert type(back) is SuperResolutionPipeline
    run = dict(latents=torch.randn(1, 3, 8, 8), output_type="pt", num_inference_steps=2, progress=False)
    assert_parity(back(low_res(), **run).images, pipe(low_res(), **run).images)


def sd_upscaler_unet() -> diffusers.UNet2DConditionModel:
    """The shape of Stable Diffusion's x4 upscaler UNet: 7 input channels, text and a noise-level class embedding."""
    return seeded(lambda: diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=7, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, num_class_embeds=1000), 5)


def test_stable_diffusion_x4_upscaler_is_a_clear_error(setup, tmp_path):
    _, pipe = setup
    unet = UNet2DConditional(UNetConfig(in_channels=6, out_channels=3, channels=(32, 64), layers_per_level=1,
                                        attention_levels=(True, False), cross_attention_dim=32))
    with pytest.raises(ConfigError, match="x4 upscaler"):
        SuperResolutionPipeline(vae=pipe.vae, unet=unet)
    vae = seeded(lambda: diffusers.AutoencoderKL(
        block_out_channels=(32, 32), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=16), 6)
    parts = {name: (dict(m.config), m.state_dict()) for name, m in (("unet", sd_upscaler_unet()), ("vae", vae))}
    save_file(to_single_file(parts), tmp_path / "x4-upscaler.safetensors")
    with pytest.raises(ConfigError, match="x4 upscaler"):
        Pipeline.from_single_file(tmp_path / "x4-upscaler.safetensors")


@pytest.mark.parametrize("kwargs, match", [
    (dict(image=torch.full((1, 3, 8, 8), 2.0)), "image"),            # floats must lie in [0, 1]
    (dict(image=torch.rand(1, 4, 8, 8)), "image"),                   # RGB only
    (dict(image=[]), "image"),
    (dict(image=None), "image"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(latents=torch.zeros(1, 3, 32, 32)), "latents"),            # x_T has the low-res size
    (dict(generator=[torch.Generator()] * 2), "generator"),
])
def test_bad_input_is_refused_before_any_unet_call(setup, kwargs, match):
    _, pipe = setup
    image = kwargs.pop("image", low_res())
    with no_unet_calls(pipe), pytest.raises(InputError, match=match) as info:
        pipe(image, num_inference_steps=kwargs.pop("num_inference_steps", 2), progress=False, **kwargs)
    assert match in info.value.where
