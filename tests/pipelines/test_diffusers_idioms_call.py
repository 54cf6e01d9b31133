"""The Python API as diffusers users type it (issue 15): stage methods without autograd by default (grad=True opts
in), diffusers' __call__ keywords (callback_on_step_end, guidance_rescale, return_dict, interrupt,
set_progress_bar_config), side by side with diffusers on the tiny Stable Diffusion folder where it has the idiom."""
from __future__ import annotations

import pytest
import torch

from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests._support.sd import tiny_diffusers_pipeline

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("idioms")
    sd = tiny_diffusers_pipeline(root)
    sd.save_pretrained(root / "sd")
    return sd, LatentDiffusionPipeline.from_pretrained(root / "sd"), root


# ---- the stages without autograd -------------------------------------------------------------------------
def by_hand(pipe, **grad):
    cond, uncond = pipe.encode_prompt([PROMPT], [""], **grad)
    x_T = pipe.prepare_latents(1, 32, 32, generator=torch.Generator().manual_seed(0), **grad)
    z0 = pipe.denoise(x_T, cond, uncond, num_inference_steps=2, progress=False, **grad)
    return cond, z0, pipe.decode(z0, **grad)


def test_stages_by_hand_record_no_graph(setup):
    _, pipe, _ = setup
    assert torch.is_grad_enabled()
    for tensor in by_hand(pipe):
        assert not tensor.requires_grad and tensor.grad_fn is None


def test_grad_true_lets_a_loss_reach_the_weights(setup):
    _, pipe, _ = setup
    pipe.unet.zero_grad()
    _, z0, image = by_hand(pipe, grad=True)
    assert z0.requires_grad and image.grad_fn is not None
    image.square().mean().backward()
    grads = [p.grad for p in pipe.unet.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    pipe.unet.zero_grad(set_to_none=True)


def test_grad_is_the_same_keyword_on_every_stage(setup):
    import inspect
    for method in (LatentDiffusionPipeline.encode_prompt, LatentDiffusionPipeline.prepare_latents,
                   LatentDiffusionPipeline.denoise, LatentDiffusionPipeline.decode, LatentDiffusionPipeline.sample,
                   ImageToImagePipeline.encode_image):
        parameter = inspect.signature(method).parameters["grad"]
        assert parameter.kind is parameter.KEYWORD_ONLY and parameter.default is False


def test_grad_must_be_a_bool(setup):
    _, pipe, _ = setup
    with pytest.raises(TypeError, match="grad"):
        pipe.prepare_latents(1, 32, 32, grad="yes")
