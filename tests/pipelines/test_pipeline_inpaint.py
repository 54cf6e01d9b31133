"""InpaintPipeline: parity with diffusers' StableDiffusionInpaintPipeline on tiny random weights, for the
9-channel inpainting UNet (concat conditioning) and a plain 4-channel UNet (known region blended each step);
masks of every kind; folders both ways; bad input refused before any UNet call."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import ConfigError, InputError
from latentdiff.diffusion.k_samplers import EulerSampler
from latentdiff.pipelines.inpaint import InpaintPipeline
from tests._support.parity import assert_parity
from tests._support.sd import random_image, random_mask, run_both, tiny_diffusers_pipeline

PROMPT = "a photo of a cat"
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("inpaint")
    refs, pipes = {}, {}
    for channels in (9, 4):
        sd = tiny_diffusers_pipeline(root / str(channels), unet_in_channels=channels)
        refs[channels] = diffusers.StableDiffusionInpaintPipeline(**sd.components)
        refs[channels].set_progress_bar_config(disable=True)
        refs[channels].save_pretrained(root / f"inpaint{channels}")
        pipes[channels] = InpaintPipeline.from_pretrained(root / f"inpaint{channels}")
    return refs, pipes


@pytest.mark.parametrize("channels, strength, eta", [(9, 1.0, 0.0), (9, 0.6, 1.0), (4, 1.0, 0.0), (4, 0.7, 0.0)])
def test_parity_with_diffusers(setup, channels, strength, eta):
    refs, pipes = setup
    image, mask = Image.fromarray(random_image()), Image.fromarray(random_mask())
    (ours, latents), (expected, expected_latents) = run_both(
        refs[channels], pipes[channels], PROMPT, image=image, mask_image=mask, strength=strength, eta=eta,
        num_inference_steps=STEPS, guidance_scale=7.5, gens=(channels,))
    assert ours.shape == expected.shape == (1, 32, 32, 3)
    assert_parity(ours, expected)
    assert_parity(latents, expected_latents)


def test_parity_with_fixed_noise_and_a_batch(setup):
    """Our `noise` is diffusers' `latents` at strength 1 (x_T); two prompts, one image and mask for both."""
    refs, pipes = setup
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    image, mask = Image.fromarray(random_image()), Image.fromarray(random_mask())
    prompts = [PROMPT, "the dog"]
    ref_kw = dict(image=image, mask_image=mask, latents=noise, height=32, width=32)
    with torch.no_grad():
        expected = refs[9](prompts, **ref_kw, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1),
                           output_type="np").images
    ours = pipes[9](prompts, image, mask, noise=noise, num_inference_steps=STEPS,
                    generator=torch.Generator().manual_seed(1), output_type="np", progress=False).images
    assert_parity(torch.from_numpy(ours), torch.from_numpy(expected))


def test_every_mask_kind_gives_the_same_mask(setup):
    _, pipes = setup
    pipe, mask = pipes[9], random_mask()
    binary = (mask >= 128).astype(np.float32)
    kinds = [Image.fromarray(mask), Image.fromarray(mask).convert("RGB"), mask, mask[..., None], mask[None],
             mask.astype(np.float32) / 255, torch.from_numpy(mask), torch.from_numpy(binary)[None, None],
             torch.from_numpy(binary > 0.5), [Image.fromarray(mask)]]
    for kind in kinds:
        got = pipe.preprocess_mask(kind, size=(32, 32))
        assert got.shape == (1, 1, 32, 32) and torch.equal(got[0, 0], torch.from_numpy(binary)), type(kind)


def test_masked_image_is_what_the_unet_sees(setup):
    """The 9 input channels are x_t, the mask at latent size, and the latents of image * (mask < 0.5)."""
    _, pipes = setup
    pipe = pipes[9]
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        pipe(PROMPT, random_image(), random_mask(), num_inference_steps=2, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator().manual_seed(0), progress=False)
    finally:
        handle.remove()
    # Drawn as diffusers draws them at strength 1: the noise x_T, then the masked image's posterior sample.
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(1, 4, 16, 16, generator=generator)
    x = pipe.preprocess_image(random_image())
    mask = pipe.preprocess_mask(random_mask(), size=(32, 32))
    with torch.no_grad():
        masked_latents = pipe.encode_image(x * (mask < 0.5), batch_size=1, generator=generator)
    assert len(seen) == 2 and all(inputs.shape == (1, 9, 16, 16) for inputs in seen)
    assert torch.equal(seen[0][:, :4], x_T)
    for inputs in seen:
        assert torch.equal(inputs[:, 4:5], torch.nn.functional.interpolate(mask, size=(16, 16)))
        assert_parity(inputs[:, 5:], masked_latents, tol=1e-6)


def test_saved_folder_loads_in_diffusers(setup, tmp_path):
    import diffusers

    refs, pipes = setup
    pipes[9].save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionInpaintPipeline"
    back = diffusers.StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "ours", safety_checker=None)
    assert back.unet.config.in_channels == 9


@pytest.mark.parametrize("kwargs, match", [
    (dict(mask_image=np.zeros((16, 32), np.uint8)), "size of the image"),
    (dict(mask_image=torch.zeros(1, 3, 32, 32)), "one channel"),
    (dict(mask_image="mask.png"), "unsupported mask type"),
    (dict(mask_image=None), "image is required"),
    (dict(mask_image=np.full((32, 32), 2.0)), r"\[0, 1\]"),
    (dict(mask_image=np.zeros((3, 32, 32), np.uint8)), "one per prompt"),
    # 33 is resized down to 32, as diffusers does; a side below the factor is refused
    (dict(image=np.zeros((32, 1, 3), np.uint8), mask_image=np.zeros((32, 1), np.uint8)), "factor 2"),
    (dict(image={"pixels": 1}), "unsupported image type"),
    (dict(strength=1.01), "strength"),
    (dict(strength=0.0), "strength"),
    (dict(noise=torch.zeros(1, 9, 16, 16)), "noise"),
])
def test_bad_input_is_a_clear_error_before_any_unet_call(setup, kwargs, match):
    _, pipes = setup
    pipe = pipes[9]
    call = dict(prompt=PROMPT, image=random_image(), mask_image=random_mask(), num_inference_steps=4,
                progress=False) | kwargs
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InputError, match=match) as info:
            pipe(**call)
    finally:
        handle.remove()
    assert not calls
    assert info.value.where is not None


def test_unet_must_fit_and_every_sampler_blends(setup):
    _, pipes = setup
    plain = pipes[4]
    euler = InpaintPipeline(vae=plain.vae, unet=plain.unet, text_encoder=plain.text_encoder,
                            noise_scheduler=plain.noise_scheduler, sampler=EulerSampler())
    out = euler(PROMPT, random_image(), random_mask(), num_inference_steps=2, output_type="latent", progress=False)
    assert torch.isfinite(out.images).all()   # parity: tests/pipelines/test_partial_sampling.py
    from latentdiff.models.unet import UNet2DConditional

    five = UNet2DConditional(dataclasses.replace(plain.unet.config, in_channels=5))
    with pytest.raises(ConfigError, match="in_channels") as info:
        InpaintPipeline(vae=plain.vae, unet=five, text_encoder=plain.text_encoder)
    assert "9 or 4" in str(info.value)


@pytest.mark.parametrize("mask", [np.zeros((32, 32, 3), np.uint8), np.zeros((1, 32, 32, 3), np.uint8),
                                  np.zeros((32, 32), np.complex64), torch.zeros(32, 32, dtype=torch.int64)])
def test_mask_shapes_and_dtypes_that_are_refused(setup, mask):
    _, pipes = setup
    with pytest.raises(InputError) as info:
        pipes[9].preprocess_mask(mask, size=(32, 32))
    assert info.value.where == "mask_image"
