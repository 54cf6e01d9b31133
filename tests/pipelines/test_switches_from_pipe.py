"""The issue-20 switches across `from_pipe`: DeepCache, FreeU and ToMe live on the UNet (`step_cache.SETTINGS`, the
transformer blocks' `token_merging`), so a pipeline derived with `from_pipe` (sharing the UNet) runs with the
switches of the pipeline it came from, exactly as a pipeline of its class on independent copies of the same
weights with the switch enabled on it directly; disabling on either pipeline turns the switch off for both; a
derived pipeline given another UNet has that UNet's switches (none)."""
from __future__ import annotations

import copy

import pytest
import torch

from latentdiff import ImageToImagePipeline, InpaintPipeline, LatentDiffusionPipeline
from tests._support.tiny_builtin import make_tiny_shapes_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle on the left, blue background"
SWITCHES = {
    "deepcache": (lambda p: p.enable_deepcache(2, 0), lambda p: p.disable_deepcache()),
    "freeu": (lambda p: p.enable_freeu(0.9, 0.2, 1.5, 1.6), lambda p: p.disable_freeu()),
    "tome": (lambda p: p.enable_tome(0.5), lambda p: p.disable_tome()),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_shapes_model(tmp_path_factory.mktemp("from_pipe") / "m")


def img2img(pipe) -> torch.Tensor:
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return pipe(PROMPT, image, strength=0.75, num_inference_steps=8, guidance_scale=3.0, output_type="latent",
                generator=torch.Generator().manual_seed(0), progress=False).images


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_a_switch_enabled_before_from_pipe_is_in_effect_after(folder, switch: str) -> None:
    enable, disable = SWITCHES[switch]
    text = LatentDiffusionPipeline.from_pretrained(folder)
    enable(text)
    derived = img2img(ImageToImagePipeline.from_pipe(text))
    direct_pipe = ImageToImagePipeline.from_pipe(LatentDiffusionPipeline.from_pretrained(folder))   # own weights
    plain = img2img(direct_pipe)
    enable(direct_pipe)
    direct = img2img(direct_pipe)
    assert torch.equal(derived, direct)
    assert not torch.equal(direct, plain)        # the switch changes this run: the equality above says something
    disable(text)
    assert torch.equal(img2img(ImageToImagePipeline.from_pipe(text)), plain)


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_switches_are_shared_both_ways_and_stay_with_their_unet(folder, switch: str) -> None:
    enable, disable = SWITCHES[switch]
    text = LatentDiffusionPipeline.from_pretrained(folder)
    plain = img2img(ImageToImagePipeline.from_pipe(text))
    inpaint, derived = InpaintPipeline.from_pipe(text), ImageToImagePipeline.from_pipe(text)
    enable(derived)                               # enabled on the derived pipeline: the source has it too
    switched = img2img(ImageToImagePipeline.from_pipe(text))
    assert not torch.equal(switched, plain)
    assert torch.equal(img2img(derived), switched)
    other = ImageToImagePipeline.from_pipe(text, unet=copy.deepcopy(LatentDiffusionPipeline.from_pretrained(
        folder).unet))
    assert torch.equal(img2img(other), plain)     # another UNet: its own switches (none)
    disable(inpaint)                              # disabled on a third sharer: off for all
    assert torch.equal(img2img(derived), plain)
