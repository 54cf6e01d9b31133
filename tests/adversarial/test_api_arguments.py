"""Every malformed `__call__` argument is a latentdiff error naming the argument, what was expected and what was
found (issue 14, "Python API"), raised before the UNet runs, by the one check every pipeline shares
(`pipelines.arguments.check_call`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdiff import ImageToImagePipeline, LatentDiffusionPipeline, UnconditionalPipeline, UNet2D, UNet2DConfig
from latentdiff.errors import InputError, LatentDiffError
from tests._support.numerics import FAST, PROMPT, latent_shape, no_unet_calls, tiny_text_model
from tests._support.tiny import TINY_UNET2D

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster
clear = pytest.mark.outcome("clear_error", fails_as="unclear")
crash = pytest.mark.outcome("clear_error", fails_as="crash")   # a raw TypeError / AttributeError before the fix


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return LatentDiffusionPipeline.from_pretrained(tiny_text_model(tmp_path_factory.mktemp("arguments") / "tiny"))


def refused(pipe, where: str, *args, **kwargs) -> InputError:
    """Call the pipeline (FAST settings unless overridden), expecting an InputError naming `where` before the UNet
    runs; -> the error."""
    with no_unet_calls(pipe), pytest.raises(InputError) as info:
        pipe(*args, **(FAST | kwargs))
    assert info.value.where == where and where in str(info.value)
    assert info.value.expected is not None and info.value.found is not None
    return info.value


# ---- the reproductions ------------------------------------------------------------------------------------
@crash
def test_guidance_scale_string(pipe):
    error = refused(pipe, "guidance_scale", PROMPT, guidance_scale="7.5")
    assert "str" in str(error.found) and "finite float" in str(error.expected)


@crash
def test_generator_string(pipe):
    error = refused(pipe, "generator", PROMPT, generator="seed")
    assert error.found == "str" and "torch.Generator" in error.expected


@crash
def test_negative_prompt_int(pipe):
    error = refused(pipe, "negative_prompt", PROMPT, negative_prompt=5)
    assert error.found == "int" and "list[str]" in error.expected


@clear
def test_prompt_embeds_of_the_wrong_width_blame_prompt_embeds(pipe):
    """It blamed `uncond_context` (never passed), expected and found swapped."""
    error = refused(pipe, "prompt_embeds", prompt_embeds=torch.zeros(1, 16, 16))
    assert "32" in error.expected and "cross_attention_dim" in error.expected and "width 16" in error.found
    assert "uncond_context" not in str(error)


@clear
def test_negative_prompt_embeds_of_the_wrong_width_blame_themselves(pipe):
    good = pipe.text_encoder([PROMPT])
    error = refused(pipe, "negative_prompt_embeds", prompt_embeds=good, negative_prompt_embeds=torch.zeros(1, 16, 8))
    assert "32" in error.expected and "width 8" in error.found


# ---- more of the same kinds ---------------------------------------------------------------------------------------
@clear
def test_embeddings_of_different_shapes(pipe):
    good = pipe.text_encoder([PROMPT])
    error = refused(pipe, "negative_prompt_embeds", prompt_embeds=good, negative_prompt_embeds=good[:, :4])
    assert error.expected == tuple(good.shape)


@clear
def test_prompt_embeds_of_another_length_with_guidance(pipe):
    """With guidance the negative prompt is encoded to the text encoder's length: prompt_embeds must match it."""
    short = pipe.text_encoder([PROMPT])[:, :3]
    error = refused(pipe, "prompt_embeds", prompt_embeds=short, guidance_scale=5.0)
    assert str(pipe.text_encoder.max_length) in error.expected


@clear
@pytest.mark.parametrize("value", [torch.zeros(16, 32), torch.zeros(1, 16, 32, dtype=torch.long), [[0.0] * 32]])
def test_prompt_embeds_not_a_float_3d_tensor(pipe, value):
    refused(pipe, "prompt_embeds", prompt_embeds=value)


@crash
@pytest.mark.parametrize("value", [None, [1.0], "high", True, 2j])
def test_guidance_scale_not_a_real_number(pipe, value):
    refused(pipe, "guidance_scale", PROMPT, guidance_scale=value)


@clear
def test_negative_guidance_scale(pipe):
    refused(pipe, "guidance_scale", PROMPT, guidance_scale=-1.0)


@crash
@pytest.mark.parametrize("value", [5, ["a", 3], {"a": 1}, b"bytes"])
def test_prompt_not_text(pipe, value):
    refused(pipe, "prompt", value)


@crash
@pytest.mark.parametrize("value", [[None], ("x", b"y")])
def test_negative_prompt_list_of_non_strings(pipe, value):
    refused(pipe, "negative_prompt", PROMPT, negative_prompt=value)


@crash
@pytest.mark.parametrize("value", [[0], [torch.Generator(), "seed"], 42, np.random.default_rng(0)])
def test_generator_not_a_torch_generator(pipe, value):
    refused(pipe, "generator", PROMPT, generator=value)


@clear
def test_generator_list_of_the_wrong_length(pipe):
    error = refused(pipe, "generator", [PROMPT, PROMPT], generator=[torch.Generator()], num_images_per_prompt=2)
    assert "4 generators" in error.expected and "1" in error.found


@clear
@pytest.mark.parametrize("value", ["2", 2.5, 0, -3, 10**9, None])
def test_num_inference_steps(pipe, value):
    error = refused(pipe, "num_inference_steps", PROMPT, num_inference_steps=value)
    assert "10000" in error.expected


@clear
@pytest.mark.parametrize("value", ["x", -1.0, float("nan"), float("inf"), [0.0]])
def test_eta(pipe, value):
    refused(pipe, "eta", PROMPT, eta=value)


@clear
@pytest.mark.parametrize("value", [5, "jpeg", ["pil"], None])
def test_output_type(pipe, value):
    refused(pipe, "output_type", PROMPT, output_type=value)


@clear
@pytest.mark.parametrize("value", [[[0.0]], torch.zeros(latent_shape(), dtype=torch.int64), np.zeros(latent_shape())])
def test_latents_not_a_float_tensor(pipe, value):
    refused(pipe, "latents", PROMPT, latents=value)


@clear
def test_latents_of_the_wrong_shape(pipe):
    error = refused(pipe, "latents", PROMPT, latents=torch.zeros(1, 4, 8, 8))
    assert error.expected == latent_shape()


@clear
def test_callback_not_callable(pipe):
    refused(pipe, "callback", PROMPT, callback="print")


# ---- the same check in every pipeline ------------------------------------------------------------------------------
@crash
def test_image_to_image_shares_the_checks(pipe):
    img2img = ImageToImagePipeline(vae=pipe.vae, unet=pipe.unet, text_encoder=pipe.text_encoder)
    image = torch.rand(1, 3, 16, 16)
    for where, bad in (("guidance_scale", {"guidance_scale": "7.5"}), ("generator", {"generator": "seed"}),
                       ("negative_prompt", {"negative_prompt": 5}), ("noise", {"noise": [0.0]})):
        with no_unet_calls(img2img), pytest.raises(InputError) as info:
            img2img(PROMPT, image, num_inference_steps=2, progress=False, **bad)
        assert info.value.where == where


@crash
def test_unconditional_pipeline_shares_the_checks(pipe):
    unet = UNet2D(UNet2DConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_UNET2D.items()}))
    uncond = UnconditionalPipeline(vae=pipe.vae, unet=unet.eval())
    for where, bad in (("generator", {"generator": "seed"}), ("num_inference_steps", {"num_inference_steps": "2"}),
                       ("output_type", {"output_type": 3}), ("eta", {"eta": "0"})):
        with no_unet_calls(uncond), pytest.raises(InputError) as info:
            uncond(**({"num_inference_steps": 2, "progress": False, "height": 16, "width": 16} | bad))
        assert info.value.where == where


# ---- what must keep working -----------------------------------------------------------------------------------------
@pytest.mark.outcome("correct")
def test_numpy_scalars_and_tuples_are_accepted(pipe):
    out = pipe((PROMPT, PROMPT), negative_prompt=("", "blue"), guidance_scale=np.float32(3.0),
               num_inference_steps=np.int64(2), eta=np.float64(0.0), height=16, width=16, output_type="latent",
               generator=[torch.Generator().manual_seed(i) for i in range(2)], progress=False).images
    assert out.shape == latent_shape(2) and torch.isfinite(out).all()


@pytest.mark.outcome("correct")
def test_prompt_embeds_alone_and_with_negatives(pipe):
    good = pipe.text_encoder([PROMPT])
    a = pipe(prompt_embeds=good, output_type="latent", **FAST).images
    b = pipe(prompt_embeds=good, negative_prompt_embeds=torch.zeros_like(good), output_type="latent", **FAST).images
    c = pipe(prompt_embeds=good[:, :3], guidance_scale=1.0, output_type="latent", **FAST).images   # no guidance
    assert a.shape == b.shape == c.shape == latent_shape()


@pytest.mark.outcome("correct")
def test_every_refusal_is_a_latentdiff_error():
    """InputError is a LatentDiffError and a ValueError: `except ValueError` code keeps working."""
    assert issubclass(InputError, LatentDiffError) and issubclass(InputError, ValueError)
