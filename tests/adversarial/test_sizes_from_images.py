"""The pipelines whose size comes from an input image (image-to-image, inpainting, super-resolution) bound the
pixels they would generate like the others, before the first stage or the UNet runs, and take `max_pixels=` to
raise the bound (issue 14, "validate before allocating")."""
from __future__ import annotations

import pytest
import torch

from latentdiff import ImageToImagePipeline, InpaintPipeline, LatentDiffusionPipeline, UNet2D, UNet2DConfig
from latentdiff.errors import InputError
from latentdiff.models.vq import VQModel, VQModelConfig
from latentdiff.pipelines.super_resolution import SuperResolutionPipeline
from tests._support.numerics import PROMPT, no_unet_calls, tiny_text_model
from tests._support.tiny import TINY_UNET2D

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return LatentDiffusionPipeline.from_pretrained(tiny_text_model(tmp_path_factory.mktemp("sizes") / "tiny"))


def assert_names_the_bound(error: InputError, *, pixels: int, limit: int) -> None:
    assert error.where is not None and "height" in str(error.where)
    assert str(limit) in str(error.expected) and str(pixels) in str(error.found)


@pytest.mark.outcome("clear_error", fails_as="crash")
@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_image_inputs_are_bounded_by_max_pixels(text, kind):
    image = torch.rand(2, 3, 16, 16)
    if kind == "img2img":
        pipe = ImageToImagePipeline(vae=text.vae, unet=text.unet, text_encoder=text.text_encoder)
        call = lambda **kw: pipe([PROMPT, PROMPT], image, num_inference_steps=2, progress=False, **kw)  # noqa: E731
    else:
        pipe = InpaintPipeline(vae=text.vae, unet=text.unet, text_encoder=text.text_encoder)
        mask = torch.ones(2, 1, 16, 16)
        call = lambda **kw: pipe([PROMPT, PROMPT], image, mask, num_inference_steps=2, progress=False, **kw)  # noqa: E731
    with no_unet_calls(pipe), pytest.raises(InputError) as info:
        call(max_pixels=16 * 16 * 2 - 1, num_images_per_prompt=1)
    assert_names_the_bound(info.value, pixels=16 * 16 * 2, limit=16 * 16 * 2 - 1)
    with no_unet_calls(pipe), pytest.raises(InputError) as info:
        call(num_images_per_prompt=4, max_pixels=1000)
    assert_names_the_bound(info.value, pixels=16 * 16 * 8, limit=1000)


@pytest.mark.outcome("correct")
def test_image_input_at_the_bound_runs(text):
    pipe = ImageToImagePipeline(vae=text.vae, unet=text.unet, text_encoder=text.text_encoder)
    out = pipe(PROMPT, torch.rand(1, 3, 16, 16), num_inference_steps=2, strength=0.5, progress=False,
               max_pixels=16 * 16, output_type="pt")
    assert out.images.shape == (1, 3, 16, 16) and torch.isfinite(out.images).all()


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_super_resolution_bounds_its_upscaled_output():
    vq = VQModel(VQModelConfig(channels=(16, 16), layers_per_level=1, num_vq_embeddings=16, norm_num_groups=8,
                               sample_size=16)).eval()
    unet = UNet2D(UNet2DConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_UNET2D.items()}
                               | {"in_channels": 6, "out_channels": 3})).eval()
    pipe = SuperResolutionPipeline(vae=vq, unet=unet)
    factor = pipe.vae_scale_factor
    with no_unet_calls(pipe), pytest.raises(InputError) as info:
        pipe(torch.rand(3, 3, 8, 8), num_inference_steps=2, progress=False, max_pixels=100)
    assert_names_the_bound(info.value, pixels=3 * (8 * factor) ** 2, limit=100)
