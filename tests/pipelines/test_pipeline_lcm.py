"""LCM through a whole pipeline: a tiny Stable Diffusion folder whose scheduler is diffusers' LCMScheduler loads with
LCMSampler, and samples as diffusers' StableDiffusionPipeline does (fp32, same random weights, same seeds: the noise
between steps included)."""
from __future__ import annotations

import pytest

from latentdiff import LatentDiffusionPipeline
from latentdiff.diffusion.samplers import LCMSampler
from tests._support.parity import assert_parity
from tests._support.sd import run_both, tiny_diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("lcm-sd")
    ref = tiny_diffusers_pipeline(root, scheduler_class="LCMScheduler")
    ref.save_pretrained(root / "sd")
    return ref, LatentDiffusionPipeline.from_pretrained(root / "sd")


@pytest.mark.parametrize("steps,gens", [(4, (0,)), (2, (3, 4))])
def test_lcm_pipeline_matches_diffusers(pipes, steps, gens):
    ref, ours = pipes
    assert isinstance(ours.sampler, LCMSampler)
    prompt = ["a red circle"] * len(gens)
    (image, latents), (ref_image, ref_latents) = run_both(ref, ours, prompt, num_inference_steps=steps,
                                                          guidance_scale=1.0, height=32, width=32, gens=gens)
    assert_parity(latents, ref_latents, tol=1e-4)
    assert_parity(image, ref_image, tol=1e-4)
