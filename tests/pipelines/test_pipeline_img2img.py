"""ImageToImagePipeline (SDEdit): parity with diffusers' StableDiffusionImg2ImgPipeline on tiny random weights
with the same generator seeds, every accepted image kind, folders both ways, and bad input refused before
any UNet call."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import DDIMSampler, InputError
from latentdiff.diffusion.k_samplers import EulerSampler
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from tests._support.parity import assert_parity
from tests._support.sd import random_image, run_both, seeds, tiny_diffusers_pipeline

PROMPT = "a photo of a cat"
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("img2img")
    sd = tiny_diffusers_pipeline(root)
    sd.save_pretrained(root / "sd")
    ref = diffusers.StableDiffusionImg2ImgPipeline(**sd.components)
    ref.set_progress_bar_config(disable=True)
    # An SD text-to-image folder loads as image-to-image, as in diffusers.
    return ref, ImageToImagePipeline.from_pretrained(root / "sd"), root


@pytest.mark.parametrize("strength, eta, prompts, gens", [
    (0.6, 0.0, PROMPT, (0,)),
    (1.0, 0.0, PROMPT, (1,)),
    (0.5, 1.0, [PROMPT, "the dog"], (2, 3)),   # DDIM noise and a generator per sample
])
def test_parity_with_diffusers(setup, strength, eta, prompts, gens):
    ref, pipe, _ = setup
    (ours, latents), (expected, expected_latents) = run_both(
        ref, pipe, prompts, image=Image.fromarray(random_image()), strength=strength, eta=eta,
        num_inference_steps=STEPS, guidance_scale=7.5, gens=gens)
    assert ours.shape == expected.shape == (len(gens), 32, 32, 3)
    assert_parity(ours, expected)
    assert_parity(latents, expected_latents)


def test_every_image_kind_gives_the_same_result(setup):
    _, pipe, _ = setup
    array = random_image()
    kw = dict(strength=0.5, num_inference_steps=2, output_type="latent", progress=False)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    # A pipeline's "pt" output (B, 3, H, W) in [0, 1] feeds back in unchanged.
    images = [Image.fromarray(array), array, array.astype(np.float32) / 255,
              torch.from_numpy(array).permute(2, 0, 1), torch.from_numpy(array).permute(2, 0, 1)[None] / 255.0,
              [Image.fromarray(array)]]
    # The image latent is a posterior sample: the same seed draws the same sample for every kind.
    results = [pipe(PROMPT, image, noise=noise, generator=seeds(4), **kw).images for image in images]
    for result in results[1:]:
        assert_parity(result, results[0], tol=1e-5)


def test_callback_counts_the_steps_run(setup):
    _, pipe, _ = setup
    seen = []
    pipe(PROMPT, random_image(), strength=0.5, num_inference_steps=6, output_type="latent", progress=False,
         callback=lambda i, t, x: seen.append((i, t)))
    assert [i for i, _ in seen] == [0, 1, 2]          # int(6 * 0.5) steps, counted from 0
    assert [t for _, t in seen] == DDIMSampler(steps_offset=1).plan(setup[1].noise_scheduler, 6).timesteps[3:]


def test_saved_folder_is_an_img2img_folder_diffusers_loads(setup, tmp_path):
    import diffusers

    ref, pipe, _ = setup
    pipe.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionImg2ImgPipeline"
    back = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tmp_path / "ours", safety_checker=None)
    back.set_progress_bar_config(disable=True)
    kw = dict(strength=0.75, num_inference_steps=STEPS)
    with torch.no_grad():
        expected = back(PROMPT, image=Image.fromarray(random_image()), generator=seeds(5), output_type="np",
                        **kw).images
    ours = pipe(PROMPT, random_image(), generator=seeds(5), output_type="np", progress=False, **kw).images
    assert_parity(torch.from_numpy(ours), torch.from_numpy(expected))


@pytest.mark.parametrize("kwargs, match", [
    (dict(image=np.zeros((1, 32, 3), np.uint8)), "at least the autoencoder factor 2"),   # 33 is resized to 32
    (dict(image="cat.png"), "unsupported image type"),
    (dict(image=[np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)]), "same size"),
    (dict(image=torch.full((1, 3, 32, 32), -1.5)), r"\[-1, 1\]"),   # [-1, 1] is diffusers' (min < 0)
    (dict(image=torch.full((1, 3, 32, 32), 1.5)), r"\[0, 1\]"),
    (dict(image=np.zeros((32, 32, 4), np.uint8)), "3 channels"),
    (dict(image=np.zeros((3, 32, 32, 3), np.uint8), prompt=["a", "b"]), "one per prompt"),
    (dict(image=None), "image is required"),
    (dict(strength=1.5), "strength"),
    (dict(strength=-0.1), "strength"),
    (dict(strength="high"), "strength"),
    (dict(strength=0.1, num_inference_steps=5), "no denoising step"),
    (dict(noise=torch.zeros(1, 4, 8, 8)), "noise"),
    (dict(generator=[torch.Generator()] * 2), "generator"),
    (dict(output_type="jpeg"), "output_type"),
])
def test_bad_input_is_a_clear_error_before_any_unet_call(setup, kwargs, match):
    _, pipe, _ = setup
    call = dict(prompt=PROMPT, image=random_image(), num_inference_steps=4, progress=False) | kwargs
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InputError, match=match) as info:
            pipe(**call)
    finally:
        handle.remove()
    assert not calls
    assert info.value.where is not None


def test_every_sampler_starts_part_way_and_a_foreign_one_is_refused(setup):
    _, pipe, _ = setup
    parts = dict(vae=pipe.vae, unet=pipe.unet, text_encoder=pipe.text_encoder, noise_scheduler=pipe.noise_scheduler)
    euler = ImageToImagePipeline(**parts, sampler=EulerSampler())   # parity: tests/pipelines/test_partial_sampling.py
    out = euler(PROMPT, random_image(), strength=0.5, num_inference_steps=4, output_type="latent", progress=False)
    assert out.images.shape == (1, 4, 16, 16) and torch.isfinite(out.images).all()

    class Foreign:   # runs a plain text-to-image call, but cannot noise an image to its start
        init_noise_sigma = 1.0

        def sample(self, *args, **kwargs):
            raise AssertionError("not reached")

    with pytest.raises(InputError, match="noised image") as info:
        ImageToImagePipeline(**parts, sampler=Foreign())(PROMPT, random_image(), strength=0.5, progress=False)
    assert info.value.where == "sampler"
