"""clip_skip (issue 15) as diffusers' StableDiffusionPipeline computes it, on the tiny Stable Diffusion folder with
a 3-layer CLIP: 1 = the penultimate layer's hidden states through the final layer norm (A1111's "Clip skip: 2"),
on the prompt and (unlike diffusers, like A1111) the negative prompt; refused before any work where there are no
layers to skip."""
from __future__ import annotations

import types

import pytest
import torch

from latentdiff import InputError
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.inpaint import InpaintPipeline
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests._support.parity import assert_parity
from tests._support.sd import random_image, random_mask, tiny_diffusers_pipeline

PROMPT = "a photo of a cat"
LAYERS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, diffusers):
    root = tmp_path_factory.mktemp("clip_skip")
    sd = tiny_diffusers_pipeline(root, clip_layers=LAYERS)
    sd.save_pretrained(root / "sd")
    text = sd.text_encoder
    if not hasattr(text, "text_model"):
        # diffusers' encode_prompt reaches the final norm as text_encoder.text_model.final_layer_norm, a path
        # transformers 5's flattened CLIPTextModel no longer has: give diffusers the path it reads
        object.__setattr__(text, "text_model", types.SimpleNamespace(final_layer_norm=text.final_layer_norm))
    return sd, LatentDiffusionPipeline.from_pretrained(root / "sd")


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_encode_prompt_matches_diffusers(setup, clip_skip):
    sd, pipe = setup
    with torch.no_grad():
        expected, _ = sd.encode_prompt(PROMPT, "cpu", 1, False, clip_skip=clip_skip)
    cond, uncond = pipe.encode_prompt(PROMPT, guidance=False, clip_skip=clip_skip)
    assert uncond is None
    assert_parity(cond, expected, 1e-4)
    assert (cond - pipe.encode_prompt(PROMPT, guidance=False)[0]).abs().max() > 1e-3   # another layer indeed


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_pipeline_matches_diffusers(setup, clip_skip):
    """With guidance diffusers encodes the negative prompt from the last layer whatever clip_skip is; latentdiff
    skips the same layers for both (as A1111): given the same negative embeddings, the images agree."""
    sd, pipe = setup
    with torch.no_grad():
        negative, _ = sd.encode_prompt("", "cpu", 1, False, clip_skip=clip_skip)
        expected = sd(PROMPT, negative_prompt_embeds=negative, num_inference_steps=2, clip_skip=clip_skip,
                      output_type="pt", generator=torch.Generator().manual_seed(0)).images
    ours = pipe(PROMPT, num_inference_steps=2, clip_skip=clip_skip, output_type="pt",
                generator=torch.Generator().manual_seed(0), progress=False).images
    assert_parity(ours, expected, 1e-4)


def test_zero_and_none_are_the_last_layer(setup):
    _, pipe = setup
    last = pipe.encode_prompt(PROMPT, guidance=False)[0]
    assert torch.equal(pipe.encode_prompt(PROMPT, guidance=False, clip_skip=0)[0], last)


def test_img2img_and_inpainting_take_clip_skip(setup):
    _, pipe = setup
    run = dict(num_inference_steps=2, output_type="pt", progress=False)
    for cls, args in ((ImageToImagePipeline, (random_image(),)), (InpaintPipeline, (random_image(), random_mask()))):
        other = cls.from_pipe(pipe)
        skipped = other(PROMPT, *args, clip_skip=1, generator=torch.Generator().manual_seed(0), **run).images
        plain = other(PROMPT, *args, generator=torch.Generator().manual_seed(0), **run).images
        assert skipped.shape == plain.shape and not torch.equal(skipped, plain)


@pytest.mark.parametrize("value", [LAYERS, -1, 1.0, True, "2"])
def test_out_of_range_is_refused_before_any_work(setup, value, monkeypatch):
    _, pipe = setup
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: pytest.fail("the UNet ran"))
    with pytest.raises(InputError, match="clip_skip") as info:
        pipe(PROMPT, num_inference_steps=2, clip_skip=value, progress=False)
    assert info.value.where == "clip_skip" and f"[0, {LAYERS})" in str(info.value)


def test_ldm_bert_has_no_layers_to_skip(tmp_path, monkeypatch):
    from latentdiff.builtin import builtin_path

    pipe = LatentDiffusionPipeline.from_pretrained(builtin_path("latentdiff/shapes-64"))
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a, **k: pytest.fail("the text encoder ran"))
    with pytest.raises(InputError, match="no layers to skip") as info:
        pipe("a red circle", num_inference_steps=2, clip_skip=1, progress=False)
    assert info.value.where == "clip_skip"
    with pytest.raises(InputError, match="clip_skip"):
        pipe.encode_prompt("a red circle", clip_skip=1)


def test_class_labels_have_no_layers_to_skip():
    from latentdiff.pipelines.arguments import check_call
    from latentdiff.pipelines.class_conditional import ClassConditionalPipeline

    pipe = object.__new__(ClassConditionalPipeline)
    with pytest.raises(InputError, match="no text encoder") as info:
        check_call(pipe, {"class_labels": 0, "clip_skip": 1})
    assert info.value.where == "clip_skip"
