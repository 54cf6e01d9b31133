"""Token merging and CFG truncation in the SDXL pipelines (tiny random SDXL): SDXL has no attention at the latent's
full resolution, so tomesd's default merges nothing and max_downsample=2 merges the next level; CFG truncation
drops the unconditional half with its added conditioning (the conditional rows of text_embeds / time_ids)."""
from __future__ import annotations

import pytest
import torch

from latentdiff.errors import UsageError
from latentdiff.layers.attention import BasicTransformerBlock
from latentdiff.pipelines.sdxl import StableDiffusionXLPipeline
from latentdiff.pipelines.sdxl_image import StableDiffusionXLImg2ImgPipeline
from tests._support.sdxl_native import write_tiny_sdxl

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = dict(prompt="a red circle", num_inference_steps=4, guidance_scale=5.0, height=32, width=32, progress=False,
           output_type="latent")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return StableDiffusionXLPipeline.from_pretrained(write_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "base"))


def run(pipe, **kw):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    xs: list[torch.Tensor] = []
    pipe(**(RUN | kw), latents=latents, callback=lambda i, t, x: xs.append(x.clone()))
    return xs


def test_tome_in_sdxl(pipe):
    plain = run(pipe)
    tokens: list[int] = []
    hooks = [b.attn1.register_forward_hook(lambda m, args, out: tokens.append(args[0].shape[1]))
             for b in pipe.unet.modules() if isinstance(b, BasicTransformerBlock)]
    try:
        with pytest.raises(UsageError, match="max_downsample >= 2"):   # no transformer block at the full resolution
            pipe.enable_tome(0.5)
        assert torch.equal(run(pipe)[-1], plain[-1])
        assert pipe.enable_tome(0.0, max_downsample=2) > 0
        assert torch.equal(run(pipe)[-1], plain[-1])
        merged_blocks = pipe.enable_tome(0.5, max_downsample=2)
        tokens.clear()
        merged = run(pipe, num_inference_steps=1)
    finally:
        pipe.disable_tome()
        for hook in hooks:
            hook.remove()
    assert tokens == [32] * merged_blocks == [32] * 12    # level 1 (8 x 8 = 64 tokens) and the mid block: halved
    assert not torch.equal(merged[-1], run(pipe, num_inference_steps=1)[-1])


def test_cfg_truncation_in_sdxl_and_its_img2img(pipe):
    batches: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: batches.append(args[0].shape[0]),
                                               with_kwargs=True)
    try:
        guided = run(pipe)
        batches.clear()
        truncated = run(pipe, cfg_truncation=0.5)
        assert batches == [2, 2, 1, 1]
        assert all(torch.equal(a, b) for a, b in zip(truncated[:2], guided[:2], strict=True))
        assert not torch.allclose(truncated[-1], guided[-1])
        batches.clear()
        img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
        img2img(prompt="a red circle", image=torch.rand(1, 3, 32, 32), strength=0.5, num_inference_steps=8,
                guidance_scale=5.0, cfg_truncation=0.25, progress=False, output_type="latent")
        assert batches == [2, 1, 1, 1]                          # 4 steps run, 1 guided
    finally:
        hook.remove()
