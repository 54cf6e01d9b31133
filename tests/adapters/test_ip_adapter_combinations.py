"""IP-Adapter combinations against diffusers on the tiny Stable Diffusion pipeline: per-block scales (InstantStyle),
two adapters at once, several images and images per prompt, and an IP-Adapter with a ControlNet
(StableDiffusionControlNetPipeline); same tiny files, fixed latents."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdiff import InputError, LatentDiffusionPipeline
from latentdiff.models.ip_adapter import cross_attentions
from tests._support.ip_adapter import PLAIN_NAME, PLUS_NAME, fixed_latents, ip_setup, photo, reference
from tests._support.parity import assert_parity

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of a cat"
STEPS = 3
latents = fixed_latents


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return ip_setup(tmp_path_factory.mktemp("ip_more"))


def test_parity_per_block_scales(setup):
    """diffusers' InstantStyle-type scale dict: per block, per transformer, the rest 0."""
    root, pipe, _ = setup
    ref = reference(root, PLAIN_NAME)
    pipe.load_ip_adapter(root / "ip", subfolder="models", weight_name=PLAIN_NAME)
    scales = {"down": {"block_1": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.5, 0.5]}}
    ref.set_ip_adapter_scale(scales)
    pipe.set_ip_adapter_scale(scales)
    assert [a.scale for a in pipe.ip_adapter.attentions()] == [0.0, 1.0, 0.0, 1.5, 0.5, 0.0]   # down, up, mid
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np")
    with torch.no_grad():
        expected = ref(PROMPT, ip_adapter_image=photo(), latents=latents(), **kw).images
    got = pipe(PROMPT, ip_adapter_image=photo(), latents=latents(), progress=False, **kw).images
    assert_parity(torch.from_numpy(got), torch.from_numpy(expected))
    pipe.unload_ip_adapter()


def test_parity_two_adapters(setup):
    """Plain and plus loaded together (a list of weight names), one scale each, one image each, as diffusers."""
    import diffusers

    root, pipe, _ = setup
    ref = diffusers.StableDiffusionPipeline.from_pretrained(root / "sd", safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    for p in (ref, pipe):
        p.load_ip_adapter(str(root / "ip"), subfolder="models", weight_name=[PLAIN_NAME, PLUS_NAME])
        p.set_ip_adapter_scale([0.6, {"up": {"block_0": [0.0, 1.0, 0.5]}}])
    assert [a.is_plus for a in pipe.ip_adapters] == [False, True]
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np")
    images = [photo(10), [photo(11), photo(12)]]
    with torch.no_grad():
        expected = ref(PROMPT, ip_adapter_image=images, latents=latents(), **kw).images
        embeds = ref.prepare_ip_adapter_image_embeds(images, None, torch.device("cpu"), 1, True)
    got = pipe(PROMPT, ip_adapter_image=images, latents=latents(), progress=False, **kw).images
    assert_parity(torch.from_numpy(got), torch.from_numpy(expected))
    from_embeds = pipe(PROMPT, ip_adapter_image_embeds=embeds, latents=latents(), progress=False, **kw).images
    assert_parity(torch.from_numpy(from_embeds), torch.from_numpy(expected))
    with pytest.raises(InputError, match="one entry per loaded IP-Adapter"):
        pipe(PROMPT, ip_adapter_image=photo(), num_inference_steps=1, progress=False)
    with pytest.raises(InputError, match="one IP-Adapter scale per loaded adapter"):
        pipe.set_ip_adapter_scale([0.1, 0.2, 0.3])
    pipe.unload_ip_adapter()
    assert all(layer.extra == () for _, layer in cross_attentions(pipe.unet))


def test_parity_several_images_and_images_per_prompt(setup):
    """Two images for the adapter ([[a, b]]: 8 tokens) and num_images_per_prompt=2, as diffusers lays them out."""
    root, pipe, _ = setup
    ref = reference(root, PLUS_NAME)
    pipe.load_ip_adapter(root / "ip", subfolder="models", weight_name=PLUS_NAME)
    pipe.set_ip_adapter_scale(0.6)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np", num_images_per_prompt=2)
    images = [[photo(7), photo(8, (33, 61))]]
    with torch.no_grad():
        expected = ref(PROMPT, ip_adapter_image=images, latents=noise, **kw).images
    got = pipe(PROMPT, ip_adapter_image=images, latents=noise, progress=False, **kw).images
    assert_parity(torch.from_numpy(got), torch.from_numpy(expected))
    pipe.unload_ip_adapter()


def test_parity_with_a_controlnet(setup):
    """IP-Adapter and a ControlNet together, against diffusers' StableDiffusionControlNetPipeline + load_ip_adapter:
    the ControlNet sees the text context alone, the UNet the text and image tokens."""
    import diffusers

    from latentdiff import ControlNet
    from tests._support.parity import randomize_

    root, _, _ = setup
    torch.manual_seed(3)
    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "sd", subfolder="unet")
    cn = randomize_(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))).eval()
    cn.save_pretrained(root / "cn")
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(root / "sd", controlnet=cn, safety_checker=None,
                                                                      requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(root / "ip"), subfolder="models", weight_name=PLUS_NAME)
    ref.set_ip_adapter_scale(0.6)
    pipe = LatentDiffusionPipeline.from_pretrained(root / "sd", controlnet=ControlNet.from_pretrained(root / "cn"))
    pipe.load_ip_adapter(root / "ip", subfolder="models", weight_name=PLUS_NAME)
    pipe.set_ip_adapter_scale(0.6)
    hint = photo(9, (32, 32))
    kw = dict(num_inference_steps=STEPS, guidance_scale=7.5, output_type="np", controlnet_conditioning_scale=0.8)
    with torch.no_grad():
        expected = ref(PROMPT, image=hint, ip_adapter_image=photo(), latents=latents(), **kw).images
    got = pipe(PROMPT, control_image=hint, ip_adapter_image=photo(), latents=latents(), progress=False, **kw).images
    assert_parity(torch.from_numpy(got), torch.from_numpy(expected))
    without = pipe(PROMPT, control_image=hint, latents=latents(), progress=False, **kw).images
    assert np.abs(without - got).max() > 1e-3
