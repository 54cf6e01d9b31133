"""Classifier-free guidance as a denoise wrapper: one batched forward, the combination rule, the rescale."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from latentdiff.diffusion.guidance import ClassifierFreeGuidance, classifier_free_guidance, combine_guidance
from latentdiff.diffusion.noise_scheduler import NoiseScheduler
from latentdiff.diffusion.samplers import DDIMSampler
from latentdiff.errors import ConfigError, InputError
from tests._support.parity import assert_parity

B, L, D = 3, 5, 6


class RecordingModel:
    """model(x, t, context=..., **kw): a per-sample function of x, t and its own context row; records each call."""

    def __init__(self):
        self.calls = []
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(D, 4, generator=g)

    def __call__(self, x, t, *, context, scale=1.0):
        self.calls.append({"batch": x.shape[0], "context": context.shape[0], "t": t})
        c = (context.mean(dim=1) @ self.proj)[:, :, None, None]        # (B, 4, 1, 1)
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return scale * (torch.tanh(x) * c + 0.001 * t)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g)
    return x, torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_one_batched_forward_equals_two_separate_forwards(scale):
    x, cond, uncond = _inputs()
    model = RecordingModel()
    t = torch.tensor(501)
    denoise = classifier_free_guidance(model, context=cond, uncond_context=uncond, guidance_scale=scale, scale=2.0)
    out = denoise(x, t)
    assert [c["batch"] for c in model.calls] == [2 * B] and model.calls[0]["context"] == 2 * B
    assert model.calls[0]["t"] is t, "a 0-d t is passed through, the model broadcasts it"
    pred_cond = model(x, t, context=cond, scale=2.0)
    pred_uncond = model(x, t, context=uncond, scale=2.0)
    assert_parity(out, pred_uncond + scale * (pred_cond - pred_uncond), tol=1e-6)


@pytest.mark.parametrize("scale,uncond", [(1.0, True), (7.5, False)])
def test_scale_one_or_no_uncond_is_one_conditional_forward(scale, uncond):
    x, cond, negative = _inputs()
    model = RecordingModel()
    denoise = classifier_free_guidance(model, context=cond, uncond_context=negative if uncond else None,
                                       guidance_scale=scale)
    out = denoise(x, torch.tensor(10))
    assert [c["batch"] for c in model.calls] == [B]
    assert torch.equal(out, model(x, torch.tensor(10), context=cond))


def test_per_sample_timesteps_are_doubled():
    x, cond, uncond = _inputs()
    model = RecordingModel()
    t = torch.tensor([1, 500, 999])
    out = classifier_free_guidance(model, context=cond, uncond_context=uncond, guidance_scale=5.0)(x, t)
    assert model.calls[0]["t"].tolist() == [1, 500, 999, 1, 500, 999]
    pred_cond, pred_uncond = model(x, t, context=cond), model(x, t, context=uncond)
    assert_parity(out, pred_uncond + 5.0 * (pred_cond - pred_uncond), tol=1e-6)


def test_guidance_rescale_matches_diffusers():
    rescale_noise_cfg = pytest.importorskip(
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion").rescale_noise_cfg
    g = torch.Generator().manual_seed(1)
    pred_uncond, pred_cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for phi in (0.0, 0.7, 1.0):
        ours = combine_guidance(pred_uncond, pred_cond, 7.5, guidance_rescale=phi)
        guided = pred_uncond + 7.5 * (pred_cond - pred_uncond)
        assert_parity(ours, rescale_noise_cfg(guided, pred_cond, guidance_rescale=phi), tol=1e-6)
    full = combine_guidance(pred_uncond, pred_cond, 7.5, guidance_rescale=1.0)
    assert_parity(full.std(dim=(1, 2, 3)), pred_cond.std(dim=(1, 2, 3)), tol=1e-5)   # Lin et al. eq. 15


def test_class_wraps_the_function_and_works_inside_a_sampler():
    x, cond, uncond = _inputs()
    cfg = ClassifierFreeGuidance(guidance_scale=4.0, guidance_rescale=0.5)
    assert cfg.needs_uncond and not ClassifierFreeGuidance(guidance_scale=1.0).needs_uncond
    model = RecordingModel()
    a = cfg.wrap(model, context=cond, uncond_context=uncond)(x, torch.tensor(3))
    b = classifier_free_guidance(model, context=cond, uncond_context=uncond, guidance_scale=4.0,
                                 guidance_rescale=0.5)(x, torch.tensor(3))
    assert torch.equal(a, b)
    model.calls.clear()
    out = DDIMSampler().sample(cfg.wrap(model, context=cond, uncond_context=uncond), x, NoiseScheduler(), 4)
    assert out.shape == x.shape and [c["batch"] for c in model.calls] == [2 * B] * 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.guidance_scale = 2.0
    with pytest.raises(ConfigError, match="guidance_scale"):
        ClassifierFreeGuidance(guidance_scale=-1.0)
    with pytest.raises(TypeError):
        ClassifierFreeGuidance(scale=2.0)


def test_bad_inputs_raise_input_error():
    x, cond, uncond = _inputs()
    model = RecordingModel()
    with pytest.raises(InputError, match="guidance_scale"):
        classifier_free_guidance(model, context=cond, uncond_context=uncond, guidance_scale=-2.0)
    with pytest.raises(InputError, match="guidance_rescale"):
        classifier_free_guidance(model, context=cond, uncond_context=uncond, guidance_scale=2.0, guidance_rescale=2)
    with pytest.raises(InputError, match="uncond_context"):
        classifier_free_guidance(model, context=cond, uncond_context=uncond[:1], guidance_scale=2.0)
    with pytest.raises(InputError, match="context"):
        classifier_free_guidance(model, context="a photo", guidance_scale=2.0)
    denoise = classifier_free_guidance(model, context=cond, uncond_context=uncond, guidance_scale=2.0)
    with pytest.raises(InputError, match="batch"):
        denoise(x[:2], torch.tensor(1))
    assert model.calls == [], "checked before the model runs"
