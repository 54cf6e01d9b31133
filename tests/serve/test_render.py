"""render: each kind of request is the Python API call a user would write (hires fix, img2img, inpainting,
samplers with schedules, clip skip), bit for bit; variation seeds follow A1111's interpolation; resize modes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.control import fit
from latentdiff.serve.render import render, slerp, unit_steps, variation_noise
from latentdiff.serve.requests import Hires, ImageRequest, InitImages, Unit

MODEL = "latentdiff/shapes-64"
STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    from latentdiff import LatentDiffusionPipeline

    return LatentDiffusionPipeline.from_pretrained(MODEL)


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def served(pipe, **kw):
    request = ImageRequest(model=MODEL, prompt=kw.pop("prompt", "a red circle"),
                           **({"steps": STEPS, "guidance": 5.0, "seed": 3} | kw))
    return [np.array(g.image) for g in render(pipe, [Unit(request, 0)])[0]]


def same(a, b):
    return all(np.array_equal(x, np.array(y)) for x, y in zip(a, b, strict=True)) and len(a) == len(b)


def test_sampler_and_schedule_are_the_python_api_s(pipe):
    from latentdiff.diffusion.samplers.names import sampler_from_name

    got = served(pipe, sampler="dpmpp_2m", schedule="karras", negative_prompt="green")
    base = pipe.sampler
    pipe.sampler = sampler_from_name("DPM++ 2M Karras", base=base)
    try:
        expected = pipe("a red circle", negative_prompt="green", num_inference_steps=STEPS, guidance_scale=5.0,
                        generator=gens(3), progress=False).images
    finally:
        pipe.sampler = base
    assert same(got, expected)
    assert pipe.sampler is base                        # the request's sampler is the call's only


def test_an_a1111_labels_options_are_the_python_api_s(pipe):
    """A request for A1111's "DPM++ 2M SDE Heun" (the settings its label fixes: solver_type heun, Brownian noise)
    is `sampler_from_name`'s sampler, and its PNG records them as `latentdiff generate` does."""
    from latentdiff.diffusion.samplers.names import resolve_sampler, sampler_from_name
    from latentdiff.utils.infotext import format_infotext

    resolved = resolve_sampler("DPM++ 2M SDE Heun")
    request = ImageRequest(model=MODEL, prompt="a red circle", steps=STEPS, guidance=5.0, seed=3,
                           sampler=resolved.name, schedule=resolved.schedule, sampler_options=resolved.options)
    generated = render(pipe, [Unit(request, 0)])[0][0]
    base = pipe.sampler
    pipe.sampler = sampler_from_name("DPM++ 2M SDE Heun", base=base)
    try:
        expected = pipe("a red circle", num_inference_steps=STEPS, guidance_scale=5.0, generator=gens(3),
                        progress=False).images
    finally:
        pipe.sampler = base
    assert same([np.array(generated.image)], expected)
    assert generated.params["sampler_options"] == {"noise_type": "brownian", "solver_type": "heun",
                                                   "timestep_spacing": "linspace", "steps_offset": 0,
                                                   "sigma_interpolation": "log"}     # A1111's grid
    assert "Sampler: DPM++ 2M SDE Heun, Schedule type: Exponential" in format_infotext(generated.params)
    plain = served(pipe, sampler=resolved.name, schedule=resolved.schedule)     # the registered name: midpoint
    assert not same(plain, expected)


def test_hires_fix_is_hires_fix(pipe):
    from latentdiff.pipelines.hires import hires_fix

    got = served(pipe, hires=Hires(scale=1.5, upscaler="latent", steps=4, strength=0.6), width=64, height=64)
    expected = hires_fix(pipe, "a red circle", negative_prompt="", scale=1.5, steps=4, strength=0.6,
                         upscaler="latent", height=64, width=64, num_inference_steps=STEPS, guidance_scale=5.0,
                         generator=gens(3), progress=False).images
    assert same(got, expected) and got[0].shape == (96, 96, 3)


def picture(seed=0, size=(64, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def test_img2img_is_the_image_to_image_pipeline(pipe):
    from latentdiff.pipelines.image_to_image import ImageToImagePipeline

    init = picture()
    got = served(pipe, init=InitImages(images=(init,), mask=None, strength=0.5), batch_size=2)
    img2img = ImageToImagePipeline.from_pipe(pipe)
    expected = img2img("a red circle", img2img.preprocess_image(init, size=(64, 64)), negative_prompt="",
                       strength=0.5, num_inference_steps=STEPS, guidance_scale=5.0, num_images_per_prompt=2,
                       generator=gens(3, 4), progress=False).images
    assert same(got, expected)


def test_inpainting_is_the_inpaint_pipeline(pipe):
    from latentdiff.pipelines.inpaint import InpaintPipeline

    init, mask = picture(1), Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    got = served(pipe, init=InitImages(images=(init,), mask=mask, strength=0.9))
    expected = InpaintPipeline.from_pipe(pipe)("a red circle", init, mask, negative_prompt="", height=64, width=64,
                                               strength=0.9, num_inference_steps=STEPS, guidance_scale=5.0,
                                               generator=gens(3), progress=False).images
    assert same(got, expected)


def test_variation_seeds_follow_a1111_interpolation(pipe):
    request = ImageRequest(model=MODEL, prompt="x", seed=7, subseed=70, subseed_strength=0.0001, batch_size=2)
    noise = variation_noise(pipe, Unit(request, 0))
    shape = pipe.latent_shape(1, 64, 64)[1:]
    seed_noise = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    assert request.seeds() == [7, 7] and request.subseeds() == [70, 71]
    assert torch.allclose(noise[0], seed_noise, atol=1e-3)                 # a small strength: the seed's noise
    low, high = torch.randn(4, 8, 8), torch.randn(4, 8, 8)
    low, high = low / low.norm(dim=1, keepdim=True), high / high.norm(dim=1, keepdim=True)   # unit columns
    assert torch.allclose(slerp(0.0, low, high), low, atol=1e-6)
    assert torch.allclose(slerp(1.0, low, high), high, atol=1e-5)
    half = slerp(0.5, low, high)            # the midpoint of the great circle arc: a unit vector, equal angles
    assert torch.allclose(half.norm(dim=1), torch.ones(4, 8), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity
    assert torch.allclose(cos(half, low, dim=1), cos(half, high, dim=1), atol=1e-5)
    images = served(pipe, subseed=70, subseed_strength=0.5, seed=7)
    assert not same(images, served(pipe, seed=7))


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_resize_modes_give_the_requested_size(mode):
    tall = Image.new("RGB", (20, 40), (200, 10, 10))
    out = fit(tall, (32, 64), mode=mode)
    assert out.size == (64, 32)
    if mode == 1:            # crop and resize: covered, no border
        assert np.array(out)[:, :, 0].min() > 150
    if mode == 2:            # resize and fill: the edges stretched, still red everywhere
        assert np.abs(np.array(out).astype(int) - [200, 10, 10]).max() <= 3    # no black border


def test_unit_steps_count_every_denoising_step():
    base = ImageRequest(model=MODEL, prompt="x", steps=10)
    assert unit_steps(base) == 10
    from dataclasses import replace
    assert unit_steps(replace(base, init=InitImages(images=(), mask=None, strength=0.5))) == 5
    assert unit_steps(replace(base, hires=Hires(scale=2, upscaler="latent", steps=None, strength=0.5))) == 15


def test_requests_with_other_lora_tags_never_share_a_call():
    a = ImageRequest(model=MODEL, prompt="x <lora:one:1>")
    b = ImageRequest(model=MODEL, prompt="y <lora:one:1>")
    c = ImageRequest(model=MODEL, prompt="x <lora:two:1>")
    assert a.batch_key() == b.batch_key() != c.batch_key()
    assert ImageRequest(model=MODEL, prompt="x", subseed_strength=0.5).batch_key() is None
