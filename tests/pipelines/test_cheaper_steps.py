"""The cheaper-step switches of the text-guided pipelines (issue 20) on the tiny stand-in for the built-in model:
token merging (`pipe.enable_tome`) and CFG truncation (`cfg_truncation=`). CFG truncation's continuation is
checked against the sampler run by hand on the conditional UNet alone; the UNet batch per call is counted."""
from __future__ import annotations

import pytest
import torch

from latentdiff import InputError
from latentdiff.diffusion.samplers import DDIMSampler, HeunSampler
from latentdiff.layers.attention import BasicTransformerBlock
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.inpaint import InpaintPipeline
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests._support.parity import assert_parity
from tests._support.sd import tiny_diffusers_pipeline
from tests._support.tiny_builtin import make_tiny_shapes_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle on the left, blue background"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return LatentDiffusionPipeline.from_pretrained(make_tiny_shapes_model(tmp_path_factory.mktemp("m") / "shapes"))


@pytest.fixture
def batches(pipe):
    """The batch of every UNet call."""
    seen: list[int] = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[0]),
                                                 with_kwargs=True)
    yield seen
    handle.remove()


def latents(seed=0):
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def trajectory(pipe, **kw):
    """x after every step of one call."""
    xs: list[torch.Tensor] = []
    pipe(PROMPT, latents=latents(), guidance_scale=5.0, progress=False, output_type="latent",
         callback=lambda i, t, x: xs.append(x.clone()), **kw)
    return xs


# ---- token merging -------------------------------------------------------------------------------------------
def test_tome_ratio_zero_is_the_plain_run_and_disable_restores_it(pipe):
    run = dict(num_inference_steps=3)
    plain = trajectory(pipe, **run)
    try:
        assert pipe.enable_tome(0.0) == 3          # level 0: one block down, two up
        assert all(torch.equal(a, b) for a, b in zip(trajectory(pipe, **run), plain, strict=True))
        pipe.enable_tome(0.5)
        merged, again = trajectory(pipe, **run), trajectory(pipe, **run)
        assert not torch.equal(merged[-1], plain[-1])
        assert all(torch.equal(a, b) for a, b in zip(merged, again, strict=True))   # re-seeded per call
    finally:
        pipe.disable_tome()
    assert all(torch.equal(a, b) for a, b in zip(trajectory(pipe, **run), plain, strict=True))


def test_tome_halves_the_tokens_of_the_full_resolution_self_attention(pipe):
    sizes: list[tuple[int, int]] = []
    hooks = [block.attn1.register_forward_hook(lambda m, args, out: sizes.append(tuple(args[0].shape[:2])))
             for block in pipe.unet.modules() if isinstance(block, BasicTransformerBlock)]
    try:
        pipe.enable_tome(0.5)
        trajectory(pipe, num_inference_steps=1)
    finally:
        pipe.disable_tome()
        for hook in hooks:
            hook.remove()
    # batch 2 (guidance); 16 x 16 = 256 tokens at level 0 -> 128; level 1 and the mid block (8 x 8) untouched
    assert sorted(sizes) == [(2, 64)] * 4 + [(2, 128)] * 3


# ---- CFG truncation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler, per_step", [(DDIMSampler(), 1), (HeunSampler(), 2)])
def test_cfg_truncation_guides_first_then_continues_conditionally(pipe, batches, sampler, per_step):
    """6 steps, fraction 0.5: steps 0-2 are the guided run's exactly (UNet batch 2), steps 3-5 the sampler run by
    hand from the guided run's step 2 on the conditional UNet alone (batch 1). Heun evaluates twice a step (once
    in its last): the step is counted by the callback, not by evaluations."""
    pipe_s = LatentDiffusionPipeline.from_pipe(pipe, sampler=sampler)
    guided = trajectory(pipe_s, num_inference_steps=6)
    batches.clear()
    truncated = trajectory(pipe_s, num_inference_steps=6, cfg_truncation=0.5)
    evaluations = [per_step] * 5 + [1] if per_step == 2 else [1] * 6
    assert batches == [2] * sum(evaluations[:3]) + [1] * sum(evaluations[3:])
    assert all(torch.equal(a, b) for a, b in zip(truncated[:3], guided[:3], strict=True))
    cond, _ = pipe.encode_prompt(PROMPT, guidance=False)
    rest: list[torch.Tensor] = []
    start = guided[2]
    if isinstance(sampler, HeunSampler):   # the callback's x is the sigma loops' state x0 + sigma n; a run from
        start = start / (float(sampler.plan(pipe.noise_scheduler, 6).sigmas[3]) ** 2 + 1) ** 0.5   # step s takes x_t
    with torch.no_grad():
        sampler.sample(lambda x, t: pipe.unet(x, t, context=cond), start, pipe.noise_scheduler, 6, start_step=3,
                       callback=lambda i, t, x: rest.append(x.clone()))
    assert len(rest) == 3
    for ours, expected in zip(truncated[3:], rest, strict=True):
        assert_parity(ours, expected)
    assert not torch.allclose(truncated[-1], guided[-1], atol=1e-4)


@pytest.mark.parametrize("fraction, guided_steps", [(None, 5), (1.0, 5), (0.0, 0), (0.45, 2), (0.4, 2), (0.2, 1)])
def test_cfg_truncation_counts_steps_as_control_ranges(pipe, batches, fraction, guided_steps):
    """Step i is guided when (i + 1) / N <= fraction; None and 1.0 are the plain run exactly."""
    plain = trajectory(pipe, num_inference_steps=5)
    batches.clear()
    xs = trajectory(pipe, num_inference_steps=5, cfg_truncation=fraction)
    assert batches == [2] * guided_steps + [1] * (5 - guided_steps)
    if guided_steps == 5:
        assert torch.equal(xs[-1], plain[-1])


def test_cfg_truncation_counts_the_steps_an_image_to_image_run_runs(pipe, batches):
    img2img = ImageToImagePipeline.from_pipe(pipe)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    img2img(PROMPT, image, strength=0.5, num_inference_steps=10, guidance_scale=5.0, cfg_truncation=0.4,
            progress=False, output_type="latent")
    assert batches == [2, 2, 1, 1, 1]       # 5 steps run, 2 of them guided


def test_without_guidance_every_step_is_one_pass_of_batch_b(pipe, batches):
    for scale in (1.0, 0.0):
        batches.clear()
        pipe(PROMPT, latents=latents().repeat(2, 1, 1, 1), num_images_per_prompt=2, guidance_scale=scale,
             num_inference_steps=3, progress=False, output_type="latent", cfg_truncation=0.5)
        assert batches == [2, 2, 2]          # B = 2 images, one pass each step


@pytest.mark.parametrize("bad", [1.5, -0.1, "half", float("nan"), True])
def test_bad_cfg_truncation_is_refused_before_any_work(pipe, batches, bad):
    with pytest.raises(InputError) as err:
        pipe(PROMPT, num_inference_steps=2, progress=False, cfg_truncation=bad)
    assert err.value.where == "cfg_truncation" and batches == []


def test_cfg_truncation_with_and_prompts_is_refused(tmp_path, batches):
    """A1111's per-step prompts (a CLIP text encoder): AND has no conditional-only form; an edit does."""
    root = tmp_path / "sd"
    tiny_diffusers_pipeline(root).save_pretrained(root)
    clip = LatentDiffusionPipeline.from_pretrained(root)
    seen: list[int] = []
    clip.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    run = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32, progress=False, output_type="latent",
               cfg_truncation=0.5)
    with pytest.raises(InputError, match="AND"):
        clip("a red circle AND a blue square", **run)
    assert seen == []
    clip("a [red:blue:2] circle", **run)       # a prompt edit at step 2: a schedule with one sub-prompt
    assert seen == [2, 2, 1, 1]


def test_cfg_truncation_in_inpainting(pipe, batches):
    inpaint = InpaintPipeline.from_pipe(pipe)
    image, mask = torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1.0
    inpaint(PROMPT, image, mask, strength=1.0, num_inference_steps=4, guidance_scale=5.0, cfg_truncation=0.75,
            progress=False, output_type="latent")
    assert batches == [2, 2, 2, 1]
