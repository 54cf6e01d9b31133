"""Token merging under `pipe.compile()` (fullgraph=True): the random destinations are drawn before each UNet call
(`pipelines.token_merging.draw_ahead`) and the matching's indices have static shapes (a stable sort of the
destination mask, not nonzero()), so the compiled forward is one graph, reused across calls, and gives the eager
ToMe latents (fp32, 1e-4). Dynamo alone (backend "eager") runs in the fast lane; inductor's C++ kernels take
~50 s on two busy cores, so that test is marked slow, as tests/pipelines/test_acceleration.py's."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from latentdiff import LatentDiffusionPipeline, UNet2DConditional
from latentdiff.models.unet import UNetConfig
from tests._support.parity import max_rel_error
from tests._support.tiny_builtin import make_tiny_shapes_model

pytestmark = pytest.mark.usefixtures("one_thread")
COMPILE_TOL = 1e-4


@pytest.fixture
def pipe(tmp_path) -> LatentDiffusionPipeline:
    """The tiny shapes model's text encoder and autoencoder around a one-level UNet with attention (its blocks
    merge: level 0), to keep inductor's kernel count down."""
    base = LatentDiffusionPipeline.from_pretrained(make_tiny_shapes_model(tmp_path / "m"))
    torch.manual_seed(0)
    unet = UNet2DConditional(UNetConfig(in_channels=4, out_channels=4, sample_size=16, channels=(8,),
                                        attention_levels=(True,), attention_heads=2, layers_per_level=1,
                                        norm_num_groups=8, cross_attention_dim=32, mid_block="none")).eval()
    return LatentDiffusionPipeline(vae=base.vae, unet=unet, text_encoder=base.text_encoder)


def run(pipe, prompt: str, seed: int) -> torch.Tensor:
    return pipe(prompt, num_inference_steps=2, guidance_scale=3.0, output_type="latent", progress=False,
                generator=torch.Generator().manual_seed(seed)).images


def compiled_equals_eager(pipe, backend: str) -> None:
    assert pipe.enable_tome(0.5) == 3                  # level 0: one block down, two up
    torch._dynamo.reset()
    calls = [("a red circle", 0), ("a blue square", 1)]
    eager = [run(pipe, *call) for call in calls]
    pipe.disable_tome()
    plain = run(pipe, *calls[0])
    pipe.enable_tome(0.5)
    counter = CompileCounterWithBackend(backend)
    pipe.compile(backend=counter)
    compiled = [run(pipe, *call) for call in calls]
    assert counter.frame_count == 1                    # fullgraph: one graph, reused (new draws, prompt, seed)
    for got, expected in zip(compiled, eager, strict=True):
        assert max_rel_error(got, expected) <= COMPILE_TOL
    assert max_rel_error(plain, eager[0]) > 10 * COMPILE_TOL   # merging changes the latents: the match means something


def test_tome_traces_one_full_graph_equal_to_eager(pipe):
    compiled_equals_eager(pipe, "eager")


@pytest.mark.slow
def test_tome_compiled_by_inductor_equals_eager(pipe):
    compiled_equals_eager(pipe, "inductor")
