"""`copy.deepcopy` of a UNet (or a pipeline) with token merging on gives an independent copy: switching ToMe off
(or to other settings) on either one leaves the other merging as before, each copy draws its random destinations
from its own generator, and its hook is its own; a compiled UNet's copy runs its own blocks (its compiled forward
was the original's, bound to the original UNet: a copy with ToMe off kept merging). Checked on the tiny stand-in
for the built-in model (attention at the latent's full resolution, where tomesd's reach merges)."""
from __future__ import annotations

import copy

import pytest
import torch

from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.pipelines.token_merging import HOOK, tome_settings
from tests._support.parity import max_rel_error
from tests._support.tiny_builtin import make_tiny_shapes_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle on the left, blue background"
COMPILE_TOL = 1e-4   # compiled against eager, fp32 (tests/pipelines/test_tome_compile.py)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_shapes_model(tmp_path_factory.mktemp("m") / "shapes")


def run(pipe) -> torch.Tensor:
    return pipe(PROMPT, latents=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
                guidance_scale=5.0, num_inference_steps=3, progress=False, output_type="latent").images


@pytest.fixture
def runs(folder, one_thread):
    """The plain run, and the runs with ToMe at 0.5 and 0.3, of a fresh pipeline (no copies involved; on one
    thread, as the runs they are compared with)."""
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    plain = run(pipe)
    pipe.enable_tome(0.5)
    half = run(pipe)
    pipe.enable_tome(0.3)
    third = run(pipe)
    assert not torch.equal(half, plain) and not torch.equal(third, half)   # the settings change the run
    return {"plain": plain, 0.5: half, 0.3: third}


def merged_pair(folder, how: str):
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.enable_tome(0.5)
    if how == "pipeline":
        return pipe, copy.deepcopy(pipe)
    return pipe, LatentDiffusionPipeline.from_pipe(pipe, unet=copy.deepcopy(pipe.unet))


@pytest.mark.parametrize("how", ["unet", "pipeline"])
@pytest.mark.parametrize("disabled", ["copy", "original"])
def test_disabling_tome_on_one_deep_copy_leaves_the_other_merging(folder, runs, how, disabled):
    original, copied = merged_pair(folder, how)
    assert original.unet is not copied.unet
    off, on = (copied, original) if disabled == "copy" else (original, copied)
    off.disable_tome()
    assert tome_settings(off.unet) is None and getattr(off.unet, HOOK) is None
    assert tome_settings(on.unet) is not None and getattr(on.unet, HOOK) is not None
    assert torch.equal(run(off), runs["plain"])
    assert torch.equal(run(on), runs[0.5])


@pytest.mark.parametrize("how", ["unet", "pipeline"])
def test_new_settings_on_a_deep_copy_stay_on_it(folder, runs, how):
    original, copied = merged_pair(folder, how)
    copied.enable_tome(0.3)
    assert torch.equal(run(copied), runs[0.3]) and torch.equal(run(original), runs[0.5])
    original.enable_tome(0.3)
    copied.disable_tome()
    assert torch.equal(run(original), runs[0.3]) and torch.equal(run(copied), runs["plain"])


def test_a_deep_copy_has_its_own_settings_generator_and_hook(folder):
    original, copied = merged_pair(folder, "unet")
    mine, theirs = tome_settings(original.unet), tome_settings(copied.unet)
    assert mine == theirs and mine is not theirs and mine.generator is not theirs.generator
    assert getattr(original.unet, HOOK) is not getattr(copied.unet, HOOK)
    assert len(original.unet._forward_pre_hooks) == len(copied.unet._forward_pre_hooks) == 1


@pytest.mark.parametrize("disabled", ["copy", "original"])
def test_a_deep_copy_of_a_compiled_unet_runs_its_own_blocks(folder, runs, disabled):
    """Dynamo alone (backend "eager"): the copy is compiled as the original was, from its own forward."""
    original = LatentDiffusionPipeline.from_pretrained(folder)
    original.enable_tome(0.5)
    torch._dynamo.reset()
    original.compile(backend="eager")
    copied = LatentDiffusionPipeline.from_pipe(original, unet=copy.deepcopy(original.unet))
    off, on = (copied, original) if disabled == "copy" else (original, copied)
    off.disable_tome()
    assert max_rel_error(run(off), runs["plain"]) <= COMPILE_TOL
    assert max_rel_error(run(on), runs[0.5]) <= COMPILE_TOL
    assert max_rel_error(runs["plain"], runs[0.5]) > 10 * COMPILE_TOL   # the matches above mean something
