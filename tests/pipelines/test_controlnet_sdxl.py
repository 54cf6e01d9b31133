"""SDXL ControlNets in StableDiffusionXLPipeline against diffusers' StableDiffusionXLControlNetPipeline on the tiny
SDXL of tests/_support/sdxl.py (the ControlNet takes SDXL's added_cond too; guess mode gets the conditional rows of
it), StableDiffusionXLControlNetImg2ImgPipeline and ...InpaintPipeline, folders both ways."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from latentdiff import (
    ControlNet,
    Pipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from tests._support.parity import assert_parity, randomize_
from tests._support.sdxl import tiny_sdxl

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a photo of a cat"


def hint_image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("sdxl-controlnet")
    base = tiny_sdxl(root / "base")
    refs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cn = randomize_(diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32)))
        cn.save_pretrained(root / f"cn{seed}")
        refs.append(cn.eval())
    ours = [ControlNet.from_pretrained(root / f"cn{seed}") for seed in (0, 1)]
    return dict(root=root, base=base, refs=refs, ours=ours)


def reference(setup, controlnet):
    import diffusers

    parts = {k: v for k, v in setup["base"].components.items() if k not in ("feature_extractor", "image_encoder")}
    ref = diffusers.StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("kw", [
    dict(),
    dict(controlnet_conditioning_scale=0.7, control_guidance_start=0.25, control_guidance_end=0.75,
         negative_prompt="blurry"),
    dict(guess_mode=True, original_size=(64, 48), crops_coords_top_left=(4, 2)),
], ids=["plain", "range", "guess_mode"])
def test_sdxl_controlnet_parity(setup, kw):
    ref = reference(setup, setup["refs"][0])
    pipe = StableDiffusionXLPipeline.from_pretrained(setup["root"] / "base", controlnet=setup["ours"][0])
    run = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=5.0, output_type="np") | kw
    with torch.no_grad():
        expected = ref(**run, image=hint_image(0), generator=torch.Generator().manual_seed(0)).images
    ours = pipe(**run, control_image=hint_image(0), generator=torch.Generator().manual_seed(0),
                prompt_syntax="plain", progress=False).images
    assert_parity(torch.from_numpy(ours), torch.from_numpy(expected))
    plain = StableDiffusionXLPipeline.from_pipe(pipe, controlnet=None)
    uncontrolled = {k: v for k, v in run.items() if "control" not in k and k != "guess_mode"}
    without = plain(**uncontrolled, generator=torch.Generator().manual_seed(0), prompt_syntax="plain",
                    progress=False).images
    assert abs(ours - without).max() > 1e-3    # the ControlNet changes the image


def test_two_sdxl_controlnets_and_folders(setup, tmp_path):
    import diffusers

    multi = diffusers.models.controlnets.multicontrolnet.MultiControlNetModel(setup["refs"])
    ref = reference(setup, multi)
    pipe = StableDiffusionXLPipeline.from_pretrained(setup["root"] / "base", controlnet=setup["ours"])
    run = dict(prompt=PROMPT, num_inference_steps=3, controlnet_conditioning_scale=[0.6, 1.2],
               control_guidance_end=[0.5, 1.0], output_type="np")
    hints = [hint_image(1), hint_image(2)]
    with torch.no_grad():
        expected = ref(**run, image=hints, generator=torch.Generator().manual_seed(1)).images
    ours = pipe(**run, control_image=hints, generator=torch.Generator().manual_seed(1), prompt_syntax="plain",
                progress=False).images
    assert_parity(torch.from_numpy(ours), torch.from_numpy(expected))
    pipe.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLControlNetPipeline"
    loaded = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(tmp_path / "ours")
    assert len(loaded.controlnet.nets) == 2
    back = Pipeline.from_pretrained(tmp_path / "ours")
    assert type(back) is StableDiffusionXLPipeline and len(back.controlnets) == 2


def test_a_prompt_schedule_hands_the_controlnet_its_added_cond(setup):
    """A1111 prompt editing: the UNet and the ControlNet get each range's added_cond through the model call."""
    pipe = StableDiffusionXLPipeline.from_pretrained(setup["root"] / "base", controlnet=setup["ours"][0])
    out = pipe("a [cat:dog:0.5]", control_image=hint_image(3), num_inference_steps=2, output_type="latent",
               progress=False).images
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_sdxl_image_to_image_parity(setup, strength):
    """StableDiffusionXLImg2ImgPipeline against StableDiffusionXLControlNetImg2ImgPipeline (its default scale 0.8)."""
    import diffusers

    parts = {k: v for k, v in setup["base"].components.items() if k not in ("feature_extractor", "image_encoder")}
    ref = diffusers.StableDiffusionXLControlNetImg2ImgPipeline(**parts, controlnet=setup["refs"][1],
                                                               add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(setup["root"] / "base", controlnet=setup["ours"][1])
    run = dict(prompt=PROMPT, image=hint_image(7), control_image=hint_image(4), strength=strength,
               num_inference_steps=4, control_guidance_end=0.8, output_type="np")
    with torch.no_grad():
        expected = ref(**run, generator=torch.Generator().manual_seed(2)).images
    ours = pipe(**run, generator=torch.Generator().manual_seed(2), prompt_syntax="plain", progress=False).images
    assert_parity(torch.from_numpy(ours), torch.from_numpy(expected))


@pytest.mark.parametrize("strength", [0.9999, 0.7])
def test_sdxl_inpainting_parity(setup, strength, tmp_path):
    """StableDiffusionXLInpaintPipeline (9-channel UNet) against StableDiffusionXLControlNetInpaintPipeline."""
    import diffusers

    inpaint = tiny_sdxl(tmp_path / "inpaint", kind="inpaint")
    parts = {k: v for k, v in inpaint.components.items() if k not in ("feature_extractor", "image_encoder")}
    ref = diffusers.StableDiffusionXLControlNetInpaintPipeline(**parts, controlnet=setup["refs"][0],
                                                               add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tmp_path / "inpaint", controlnet=setup["ours"][0])
    mask = Image.fromarray(((torch.arange(32)[:, None] + torch.arange(32)[None]) > 30).byte().numpy() * 255)
    run = dict(prompt=PROMPT, image=hint_image(8), mask_image=mask, control_image=hint_image(5), strength=strength,
               num_inference_steps=4, control_guidance_start=0.25, output_type="np", height=32, width=32,
               guidance_scale=6.0)   # diffusers: 7.5 in SDXL inpainting, 5.0 in its ControlNet twin
    with torch.no_grad():
        expected = ref(**run, generator=torch.Generator().manual_seed(3)).images
    ours = pipe(**run, generator=torch.Generator().manual_seed(3), prompt_syntax="plain", progress=False).images
    assert_parity(torch.from_numpy(ours), torch.from_numpy(expected))
