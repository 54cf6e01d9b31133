"""The issue-20 switches on the SDXL pipelines' every path (tiny random SDXL base and refiner built by diffusers,
tests/_support/sdxl.py): FreeU against diffusers' own `enable_freeu` on text-to-image, image-to-image and the
base -> refiner hand-off (fp32, 1e-4); DeepCache in the refiner and in a base stopped at denoising_end, its full
passes on the published 1:N rule over the steps each call runs; ToMe in the refiner (tomesd's default reach is a
UsageError there, max_downsample=2 merges); CFG truncation in the refiner, over its own steps."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import Pipeline, StableDiffusionXLImg2ImgPipeline
from latentdiff.errors import UsageError
from latentdiff.pipelines.step_cache import DeepCache
from tests._support.parity import assert_parity, max_rel_error
from tests._support.sdxl import tiny_sdxl

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of a cat"
SDXL_FREEU = (0.6, 0.4, 1.1, 1.2)   # FreeU's published SDXL factors


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "base"
    return tiny_sdxl(folder), Pipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "refiner"
    return tiny_sdxl(folder, kind="refiner"), Pipeline.from_pretrained(folder)


def seed(value: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(value)


def ours(pipe, *args, **kw):
    return pipe(*args, generator=seed(), prompt_syntax="plain", progress=False, **kw).images


def theirs(ref, *args, **kw):
    with torch.no_grad():
        return ref(*args, generator=seed(), **kw).images


def handoff_latents(base) -> torch.Tensor:
    """diffusers' base latents at denoising_end=0.7 (no switch): the refiner's input."""
    return theirs(base[0], PROMPT, num_inference_steps=10, denoising_end=0.7, output_type="latent")


class Passes:
    """UNet calls (conv_in runs in every pass) and full passes (the mid block runs only in those), and the full
    passes seen after each step (`note`, a step callback)."""

    def __init__(self, unet: torch.nn.Module):
        self.calls, self.full, self.seen = 0, 0, []
        self.hooks = [unet.conv_in.register_forward_hook(lambda *_: self.count("calls")),
                      unet.mid_block.register_forward_hook(lambda *_: self.count("full"))]

    def count(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def note(self, i, t, x, denoised=None) -> None:
        self.seen.append(self.full)

    def full_steps(self) -> list[int]:
        return [i for i, n in enumerate(self.seen) if n > (self.seen[i - 1] if i else 0)]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


# ---- FreeU: diffusers' enable_freeu is the reference --------------------------------------------------------------
@pytest.mark.parametrize("path", ["text-to-image", "image-to-image", "refiner"])
def test_freeu_equals_diffusers_enable_freeu(base, refiner, path):
    import diffusers

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    if path == "text-to-image":
        (ref, pipe), args, kw = base, (PROMPT,), dict(num_inference_steps=4, guidance_scale=5.0)
    elif path == "image-to-image":
        ref = diffusers.StableDiffusionXLImg2ImgPipeline(**base[0].components)
        pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(base[1])
        args, kw = (PROMPT,), dict(image=image, strength=0.6, num_inference_steps=10, guidance_scale=5.0)
    else:
        (ref, pipe), args = refiner, (PROMPT,)
        kw = dict(image=handoff_latents(base), num_inference_steps=10, denoising_start=0.7, guidance_scale=5.0)
    plain = ours(pipe, *args, output_type="np", **kw)
    ref.enable_freeu(*SDXL_FREEU)
    pipe.enable_freeu(*SDXL_FREEU)
    try:
        got, expected = ours(pipe, *args, output_type="np", **kw), theirs(ref, *args, output_type="np", **kw)
    finally:
        ref.disable_freeu()
        pipe.disable_freeu()
    assert_parity(torch.from_numpy(got), torch.from_numpy(expected))
    assert max_rel_error(torch.from_numpy(plain), torch.from_numpy(expected)) > 1e-3   # FreeU changes the image
    assert np.array_equal(ours(pipe, *args, output_type="np", **kw), plain)             # and is off again


# ---- DeepCache: the published rule over the steps each call runs -------------------------------------------------
@pytest.mark.parametrize("interval, uniform", [(2, True), (3, True), (2, False)])
def test_deepcache_in_the_refiner_counts_its_own_steps(base, refiner, interval, uniform):
    pipe = refiner[1]
    kw = dict(image=handoff_latents(base), num_inference_steps=12, denoising_start=0.7, guidance_scale=5.0,
              output_type="latent")
    plain = ours(pipe, PROMPT, **kw)
    pipe.enable_deepcache(interval, 1, uniform=uniform)
    passes = Passes(pipe.unet)
    try:
        cached = ours(pipe, PROMPT, callback=passes.note, **kw)
        calls, full = passes.calls, passes.full
        pipe.enable_deepcache(1, 1)
        assert torch.equal(ours(pipe, PROMPT, **kw), plain)          # interval 1: the plain run exactly
    finally:
        pipe.disable_deepcache()
        passes.remove()
    steps = len(passes.seen)
    assert 0 < steps < 12 and calls == steps                         # the refiner's share of the plan
    assert passes.full_steps() == sorted(DeepCache(interval, uniform=uniform).full_steps(steps))
    assert full == len(passes.full_steps()) == (math.ceil(steps / interval) if uniform else full)
    assert not torch.equal(cached, plain)


def test_deepcache_in_a_base_stopped_at_denoising_end(base):
    pipe = base[1]
    pipe.enable_deepcache(2, 0)
    passes = Passes(pipe.unet)
    try:
        ours(pipe, PROMPT, num_inference_steps=10, denoising_end=0.7, guidance_scale=5.0, output_type="latent",
             callback=passes.note)
    finally:
        pipe.disable_deepcache()
        passes.remove()
    assert len(passes.seen) == 7 and passes.full_steps() == [0, 2, 4, 6]


# ---- ToMe and CFG truncation in the refiner ------------------------------------------------------------------------
def test_tome_in_the_refiner(base, refiner):
    pipe = refiner[1]
    kw = dict(image=handoff_latents(base), num_inference_steps=10, denoising_start=0.7, guidance_scale=5.0,
              output_type="latent")
    plain = ours(pipe, PROMPT, **kw)
    with pytest.raises(UsageError, match="max_downsample >= 2") as error:
        pipe.enable_tome(0.5)                          # tomesd's default: SDXL has no attention at full resolution
    assert error.value.where == "max_downsample"
    try:
        assert pipe.enable_tome(0.0, max_downsample=2) == 12   # level 1's 2 x 2, the mid block's 2, up level 0's 3 x 2
        assert torch.equal(ours(pipe, PROMPT, **kw), plain)
        pipe.enable_tome(0.5, max_downsample=2)
        merged = ours(pipe, PROMPT, **kw)
    finally:
        pipe.disable_tome()
    assert not torch.equal(merged, plain)
    assert torch.equal(ours(pipe, PROMPT, **kw), plain)


def test_cfg_truncation_in_the_refiner_counts_its_own_steps(base, refiner):
    pipe = refiner[1]
    batches: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: batches.append(args[0].shape[0]),
                                               with_kwargs=True)
    kw = dict(image=handoff_latents(base), num_inference_steps=12, denoising_start=0.7, guidance_scale=5.0,
              output_type="latent")
    try:
        ours(pipe, PROMPT, **kw)
        steps = len(batches)
        batches.clear()
        ours(pipe, PROMPT, cfg_truncation=0.5, **kw)
    finally:
        hook.remove()
    assert batches == [2] * (steps // 2) + [1] * (steps - steps // 2)   # (i + 1) / steps <= 0.5: guided
