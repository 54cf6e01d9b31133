"""StableDiffusionXLInpaintPipeline against diffusers' on tiny random SDXL models (tests/_support/sdxl.py): a 9-channel
inpainting UNet and the base's plain 4-channel UNet (diffusers' StableDiffusionXLInpaintPipeline(**base.components)),
the same seeds and arguments, fp32 max rel err <= 1e-4 on the images and the final latents.

Covered: CFG with a negative prompt, strength 0.9999 (the default: the first step skipped, the image noised), 1.0
(pure noise) and 0.6, the denoising_end -> denoising_start hand-off to a refiner that inpaints (aesthetic score, the
base's latents as image), the folder's class both ways, and bad input refused before any UNet call."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import Pipeline, StableDiffusionXLInpaintPipeline
from latentdiff.errors import InputError
from tests._support.parity import assert_parity, max_rel_error
from tests._support.sd import random_image, random_mask
from tests._support.sdxl import tiny_sdxl

PROMPT = "a photo of a cat"
STEPS = 4
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """{9: (diffusers' inpainting pipeline, ours), 4: (diffusers' on the base's parts, ours on the base folder)}"""
    import diffusers

    root = tmp_path_factory.mktemp("sdxl_inpaint")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as `one_thread`, which a module-scoped fixture cannot use
    try:
        inpaint = tiny_sdxl(root / "inpaint", kind="inpaint")
        base = tiny_sdxl(root / "base")
    finally:
        torch.set_num_threads(threads)
    plain = diffusers.StableDiffusionXLInpaintPipeline(**base.components)
    plain.set_progress_bar_config(disable=True)
    return {9: (inpaint, Pipeline.from_pretrained(root / "inpaint")),
            4: (plain, StableDiffusionXLInpaintPipeline.from_pretrained(root / "base")), "root": root}


def images():
    return Image.fromarray(random_image()), Image.fromarray(random_mask())


def run_both(ref, pipe, *args, **kw):
    """((ours' images, final latents), (diffusers' images, final latents)), one run each from seed 0."""
    final = {}

    def grab(_, i, t, tensors):
        final["ref"] = tensors["latents"]
        return tensors

    with torch.no_grad():
        expected = ref(*args, **kw, generator=torch.Generator().manual_seed(0), callback_on_step_end=grab).images
    ours = pipe(*args, **kw, generator=torch.Generator().manual_seed(0), prompt_syntax="plain", progress=False,
                callback=lambda i, t, x: final.update(ours=x.clone())).images
    if kw.get("output_type") == "np":
        ours, expected = torch.from_numpy(ours), torch.from_numpy(expected)
    return (ours, final["ours"]), (expected, final["ref"])


@pytest.mark.parametrize("channels, strength", [(9, None), (9, 1.0), (9, 0.6), (4, None), (4, 0.6)])
def test_parity_with_diffusers(pipes, channels, strength):
    ref, ours = pipes[channels]
    image, mask = images()
    kw = {} if strength is None else dict(strength=strength)   # None: both pipelines' default 0.9999
    (a, lat), (b, lat_ref) = run_both(ref, ours, PROMPT, image=image, mask_image=mask, negative_prompt="blurry",
                                      num_inference_steps=STEPS, guidance_scale=5.0, output_type="np", **kw)
    assert a.shape == b.shape == (1, 32, 32, 3)
    assert_parity(a, b)
    assert_parity(lat, lat_ref)


@pytest.mark.parametrize("channels", [9, 4])
def test_batch_parity(pipes, channels):
    """Two prompts, two images each: the image, mask and masked-image latents expanded to
    the batch as diffusers expands them."""
    ref, ours = pipes[channels]
    image, mask = images()
    kw = dict(image=image, mask_image=mask, negative_prompt=["x", "y"], num_images_per_prompt=2, num_inference_steps=3,
              guidance_scale=4.0, strength=0.7, output_type="np")
    with torch.no_grad():
        b = ref([PROMPT, "the dog"], **kw, generator=torch.Generator().manual_seed(5)).images
    a = ours([PROMPT, "the dog"], **kw, generator=torch.Generator().manual_seed(5),
             prompt_syntax="plain", progress=False).images
    assert a.shape == (4, 32, 32, 3)
    assert_parity(torch.from_numpy(a), torch.from_numpy(b))


def test_the_mask_and_the_image_matter(pipes):
    """A different mask, or a different image under the mask, changes the result (so parity cannot pass by
    ignoring them); with a plain UNet the known region is the image's own latents after the last step."""
    run = dict(negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0, output_type="latent",
               prompt_syntax="plain", progress=False)
    image, mask = images()
    other_mask = Image.fromarray(255 - random_mask())
    other_image = Image.fromarray(random_image()[::-1].copy())
    for channels in (9, 4):
        pipe = pipes[channels][1]
        z = pipe(PROMPT, image=image, mask_image=mask, generator=torch.Generator().manual_seed(0), **run).images
        for change in (dict(mask_image=other_mask), dict(image=other_image)):
            kw = dict(image=image, mask_image=mask) | change
            other = pipe(PROMPT, **kw, generator=torch.Generator().manual_seed(0), **run).images
            assert max_rel_error(other, z) > 1e-3, (channels, list(change))
    pipe = pipes[4][1]
    x = pipe.preprocess_image(image)
    z0 = pipe.encode_image(x, batch_size=1, generator=torch.Generator().manual_seed(0))
    z = pipe(PROMPT, image=image, mask_image=mask, generator=torch.Generator().manual_seed(0), **run).images
    known = pipe.latent_mask(pipe.preprocess_mask(mask, size=(32, 32)), batch_size=1) == 0
    assert known.any() and torch.equal(torch.where(known, z, 0), torch.where(known, z0, 0))


def test_a1111_per_step_syntax(pipes):
    """A1111's prompt editing reaches both kinds of UNet: editing a prompt into itself is the plain prompt, editing
    cat into dog half-way is neither."""
    image, mask = images()
    run = dict(image=image, mask_image=mask, negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0,
               output_type="latent", progress=False)
    for channels in (9, 4):
        pipe = pipes[channels][1]
        out = {p: pipe(p, generator=torch.Generator().manual_seed(0), **run).images for p in (
            PROMPT, f"[{PROMPT}:{PROMPT}:0.5]", "a photo of a [cat:dog:0.5]", "a photo of a dog")}
        plain, same, edited, dog = out.values()
        assert_parity(same, plain)
        assert max_rel_error(edited, plain) > 1e-3 and max_rel_error(edited, dog) > 1e-3, channels


def test_hand_off_to_an_inpainting_refiner(pipes):
    """diffusers' inpainting ensemble: the inpainting model to denoising_end as latents, then a refiner (4 channels,
    aesthetic score) inpainting from denoising_start with those latents as the image."""
    import diffusers

    ref, ours = pipes[9]
    image, mask = images()
    common = dict(mask_image=mask, negative_prompt="blurry", num_inference_steps=10, guidance_scale=5.0)
    (lat, _), (lat_ref, _) = run_both(ref, ours, PROMPT, image=image, denoising_end=0.7, output_type="latent",
                                      **common)
    assert_parity(lat, lat_ref)
    refiner = tiny_sdxl(pipes["root"] / "refiner", kind="refiner")
    ref_refiner = diffusers.StableDiffusionXLInpaintPipeline(**refiner.components, requires_aesthetics_score=True)
    ref_refiner.set_progress_bar_config(disable=True)
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(pipes["root"] / "refiner")
    assert pipe.requires_aesthetics_score and pipe.text_encoder is None
    (a, _), (b, _) = run_both(ref_refiner, pipe, PROMPT, image=lat_ref, denoising_start=0.7, output_type="np",
                              aesthetic_score=7.0, **common)
    assert_parity(a, b)


def test_folders_name_the_inpainting_class(pipes, tmp_path):
    import diffusers

    _, ours = pipes[9]
    assert type(ours) is StableDiffusionXLInpaintPipeline and ours.concat_inputs
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline"
    theirs = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(tmp_path / "saved")
    assert theirs.unet.config.in_channels == 9
    assert type(Pipeline.from_pretrained(tmp_path / "saved")) is StableDiffusionXLInpaintPipeline


@pytest.mark.parametrize("channels, change, where", [
    (9, dict(mask_image=None), "mask_image"),
    (4, dict(mask_image=None), "mask_image"),
    (9, dict(mask_image=Image.new("L", (16, 32))), "mask_image"),
    (9, dict(image=None), "image"),
    (9, dict(image=torch.zeros(1, 4, 16, 16), denoising_start=0.5), "masked_image_latents"),
    (9, dict(masked_image_latents=torch.zeros(1, 4, 8, 8)), "masked_image_latents"),
    (4, dict(strength=1.5), "strength"),
    (4, dict(height=31), "height"),
    (4, dict(denoising_start=0.6, denoising_end=0.5), "denoising_end"),
    (4, dict(num_images_per_prompt=2, mask_image=[Image.fromarray(random_mask())] * 3), "mask_image"),
])
def test_bad_input_is_refused_before_any_work(pipes, channels, change, where):
    pipe = pipes[channels][1]
    image, mask = images()
    kw = dict(image=image, mask_image=mask) | change
    called = []
    hook = pipe.unet.register_forward_hook(lambda *a: called.append(1))
    try:
        with pytest.raises(InputError) as info:
            pipe(PROMPT, num_inference_steps=2, progress=False, **kw)
    finally:
        hook.remove()
    assert info.value.where == where and not called


def test_masked_image_latents_replace_the_masked_image(pipes):
    """Given masked_image_latents, the 9-channel UNet sees them instead of the encoded image * (mask < 0.5)."""
    _, ours = pipes[9]
    image, mask = images()
    x = ours.preprocess_image(image)
    m = ours.preprocess_mask(mask, size=(32, 32))
    given = ours.encode_image(x * (m < 0.5), batch_size=1, generator=torch.Generator().manual_seed(3))
    seen = []
    hook = ours.unet.register_forward_pre_hook(lambda _, args: seen.append(args[0][:, 5:].clone()))
    try:
        ours(PROMPT, image=image, mask_image=mask, masked_image_latents=given, num_inference_steps=2,
             guidance_scale=1.0, progress=False, output_type="latent")
    finally:
        hook.remove()
    assert seen and all(torch.equal(s, given) for s in seen)
    assert np.isfinite(given.numpy()).all()
