"""The hires fix (pipelines/hires.py, issue 15): a run equals its two passes done by hand with the library's own
pieces (text-to-image -> upscale -> image-to-image, one generator), and every size is checked before any work."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentdiff import InputError
from latentdiff.builtin import builtin_path
from latentdiff.diffusion.noise import randn
from latentdiff.pipelines.hires import denoising_steps, hires_fix, hires_size
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.pipelines.sdedit import start_step

PROMPT = "a red circle on the left, blue background"
RUN = dict(num_inference_steps=3, guidance_scale=3.0, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return LatentDiffusionPipeline.from_pretrained(builtin_path("latentdiff/shapes-64"))


def seed():
    return torch.Generator().manual_seed(0)


def test_latent_hires_is_txt2img_interpolate_img2img_by_hand(pipe):
    ours = hires_fix(pipe, PROMPT, scale=1.5, steps=4, strength=0.5, upscaler="latent", generator=seed(),
                     output_type="pt", **RUN).images
    generator = seed()
    z = pipe(PROMPT, output_type="latent", generator=generator, **RUN).images
    f = pipe.vae_scale_factor
    z = F.interpolate(z, size=(96 // f, 96 // f), mode="bilinear", align_corners=False)
    eps = randn(z.shape, generator=generator, dtype=z.dtype)
    first = start_step(4, 0.5)
    x = pipe.sampler.noise_to_start(z, eps, pipe.noise_scheduler, 4, first)
    cond, uncond = pipe.encode_prompt(PROMPT)
    z = pipe.denoise(x, cond, uncond, guidance_scale=3.0, num_inference_steps=4, start_step=first,
                     generator=generator, progress=False)
    expected = pipe.output(z, "pt").images
    assert ours.shape == (1, 3, 96, 96)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_image_hires_is_txt2img_lanczos_img2img_by_hand(pipe):
    from PIL import Image

    ours = hires_fix(pipe, PROMPT, scale=2, strength=0.6, upscaler="image", generator=seed(), output_type="pt",
                     **RUN).images
    generator = seed()
    small = pipe(PROMPT, generator=generator, **RUN).images
    large = [image.resize((128, 128), Image.Resampling.LANCZOS) for image in small]
    expected = ImageToImagePipeline.from_pipe(pipe)(PROMPT, large, strength=0.6, generator=generator,
                                                    output_type="pt", **RUN).images
    assert ours.shape == (1, 3, 128, 128)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_nearest_latents_and_every_step_reach_the_callback(pipe):
    steps = []
    nearest = hires_fix(pipe, PROMPT, scale=1.5, upscaler="latent-nearest", generator=seed(), output_type="pt",
                        callback=lambda i, t, x: steps.append(i), **RUN).images
    bilinear = hires_fix(pipe, PROMPT, scale=1.5, generator=seed(), output_type="pt", **RUN).images
    assert nearest.shape == bilinear.shape == (1, 3, 96, 96) and not torch.equal(nearest, bilinear)
    assert len(steps) == denoising_steps(3, scale=1.5, strength=0.7) == 3 + 2


def test_diffusers_idioms_reach_both_passes(pipe):
    seen = []

    def on_step_end(p, i, t, kwargs):
        seen.append(tuple(kwargs["latents"].shape))
        if len(seen) == 2:
            p._interrupt = True            # in the first pass: the second is skipped
        return kwargs

    images, nsfw = hires_fix(pipe, PROMPT, scale=2, generator=seed(), output_type="pt", return_dict=False,
                             callback_on_step_end=on_step_end, **RUN)
    assert seen == [(1, 4, 16, 16)] * 2 and images.shape == (1, 3, 64, 64) and nsfw is None
    seen.clear()
    out = hires_fix(pipe, PROMPT, scale=2, generator=seed(), output_type="pt", guidance_rescale=0.5,
                    callback_on_step_end=lambda p, i, t, kw: seen.append(tuple(kw["latents"].shape)) or kw, **RUN)
    assert seen == [(1, 4, 16, 16)] * 3 + [(1, 4, 32, 32)] * 2 and out.images.shape == (1, 3, 128, 128)


def test_a1111_upscaler_names_map_to_ours():
    from latentdiff.pipelines.hires import A1111_UPSCALERS, UPSCALERS

    assert sorted(A1111_UPSCALERS.values()) == sorted(UPSCALERS)


def test_the_size_rounds_down_to_the_factor():
    assert hires_size(64, 64, 1.3, 8) == (80, 80)
    assert hires_size(64, 48, 2, 8) == (128, 96)


@pytest.mark.parametrize(("keyword", "value", "where"), [
    ("scale", 0.5, "scale"), ("scale", float("nan"), "scale"), ("scale", "2", "scale"), ("scale", 9, "scale"),
    ("upscaler", "esrgan", "upscaler"), ("steps", -1, "steps"), ("strength", 1.5, "strength"),
    ("strength", 0.01, "strength"), ("clip_skip", 1, "clip_skip")])
def test_bad_settings_are_refused_before_any_work(pipe, keyword, value, where, monkeypatch):
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: pytest.fail("the UNet ran"))
    with pytest.raises(InputError) as info:
        hires_fix(pipe, PROMPT, **{keyword: value}, **RUN)
    assert info.value.where == where


def test_the_final_size_is_bounded_before_any_work(pipe, monkeypatch):
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: pytest.fail("the UNet ran"))
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a, **k: pytest.fail("the text encoder ran"))
    with pytest.raises(InputError, match="pixels") as info:
        hires_fix(pipe, PROMPT, height=4096, width=4096, scale=3, **RUN)
    assert "12288" in str(info.value)
