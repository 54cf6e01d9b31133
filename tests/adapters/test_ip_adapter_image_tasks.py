"""IP-Adapter on image-to-image and inpainting: parity with diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline after `load_ip_adapter` (plain and plus), same tiny files and seeds."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from latentdiff.models.ip_adapter import cross_attentions
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.inpaint import InpaintPipeline
from tests._support.ip_adapter import PLAIN_NAME, PLUS_NAME, write_tiny_ip_adapter
from tests._support.parity import assert_parity
from tests._support.sd import random_image, random_mask, run_both, tiny_diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ip_tasks")
    tiny_diffusers_pipeline(root / "b4").save_pretrained(root / "sd")
    tiny_diffusers_pipeline(root / "b9", unet_in_channels=9).save_pretrained(root / "sd9")
    inner = [layer.to_k.out_features for _, layer in cross_attentions(ImageToImagePipeline.from_pretrained(
        root / "sd").unet)]
    for plus in (False, True):
        write_tiny_ip_adapter(root / "ip", plus=plus, inner=inner, context_dim=32, seed=int(plus))
    return root


def style() -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (36, 44, 3), dtype=np.uint8))


def pair(root, ref_class: str, ours_class, folder: str, weight_name: str):
    import diffusers

    ref = getattr(diffusers, ref_class).from_pretrained(root / folder, safety_checker=None,
                                                          requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    pipe = ours_class.from_pretrained(root / folder)
    for p in (ref, pipe):
        p.load_ip_adapter(str(root / "ip"), subfolder="models", weight_name=weight_name)
        p.set_ip_adapter_scale(0.6)
    return ref, pipe


@pytest.mark.parametrize("weight_name", [PLAIN_NAME, PLUS_NAME])
def test_image_to_image(root, weight_name):
    ref, pipe = pair(root, "StableDiffusionImg2ImgPipeline", ImageToImagePipeline, "sd", weight_name)
    (ours, latents), (expected, expected_latents) = run_both(
        ref, pipe, PROMPT, image=Image.fromarray(random_image()), strength=0.7, num_inference_steps=4,
        guidance_scale=7.5, ip_adapter_image=style(), gens=(1,))
    assert_parity(ours, expected)
    assert_parity(latents, expected_latents)


@pytest.mark.parametrize("weight_name", [PLUS_NAME])
def test_inpainting(root, weight_name):
    ref, pipe = pair(root, "StableDiffusionInpaintPipeline", InpaintPipeline, "sd9", weight_name)
    (ours, latents), (expected, expected_latents) = run_both(
        ref, pipe, PROMPT, image=Image.fromarray(random_image()), mask_image=Image.fromarray(random_mask()),
        num_inference_steps=3, guidance_scale=7.5, ip_adapter_image=style(), gens=(2,))
    assert_parity(ours, expected)
    assert_parity(latents, expected_latents)
