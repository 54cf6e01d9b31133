"""ControlNets inside the SD pipelines: parity with diffusers' StableDiffusionControlNetPipeline (one and two
ControlNets, scale lists, start / end, guess mode), its Img2Img and Inpaint pipelines, on tiny random weights (every
zero convolution randomised, or the ControlNet would add nothing) with the same seeds; folders both ways."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from latentdiff import ControlNet, LatentDiffusionPipeline
from latentdiff.diffusion.scheduler_io import load_scheduler_folder
from latentdiff.pipelines.base import Pipeline
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.inpaint import InpaintPipeline
from tests._support.parity import assert_parity, randomize_
from tests._support.sd import random_image, random_mask, seeds, tiny_diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a photo of a cat"
STEPS = 4


def hint_image(seed: int) -> Image.Image:
    """A 32 x 32 control image (the tiny pipelines' generation size)."""
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("controlnet")
    sd = tiny_diffusers_pipeline(root / "4")
    sd9 = tiny_diffusers_pipeline(root / "9", unet_in_channels=9)
    refs_cn = []
    for seed in (0, 1):   # ControlNets of the 4-channel UNet (the inpainting one's take the latents alone too)
        torch.manual_seed(seed)
        cn = randomize_(diffusers.ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(16, 32)))
        cn.save_pretrained(root / f"cn{seed}")
        refs_cn.append(cn.eval())
    ours_cn = [ControlNet.from_pretrained(root / f"cn{seed}") for seed in (0, 1)]
    sd.save_pretrained(root / "sd")
    sd9.save_pretrained(root / "sd9")
    return dict(root=root, sd=sd, sd9=sd9, refs_cn=refs_cn, ours_cn=ours_cn)


def reference(setup, kind: str, controlnet):
    import diffusers

    cls = {"t2i": diffusers.StableDiffusionControlNetPipeline,
           "i2i": diffusers.StableDiffusionControlNetImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline,
           "inpaint4": diffusers.StableDiffusionControlNetInpaintPipeline}[kind]
    parts = (setup["sd9"] if kind == "inpaint" else setup["sd"]).components
    ref = cls(**parts, controlnet=controlnet)
    ref.set_progress_bar_config(disable=True)
    return ref


def run_pair(ref, pipe, ref_kw: dict, our_kw: dict, gen: int = 0):
    """(ours, diffusers') images and final latents of one run each with the same seed."""
    final = {}

    def grab(_, i, t, tensors):
        final["ref"] = tensors["latents"]
        return tensors

    with torch.no_grad():
        expected = ref(**ref_kw, num_inference_steps=STEPS, generator=seeds(gen), callback_on_step_end=grab,
                       output_type="np").images
    ours = pipe(**our_kw, num_inference_steps=STEPS, generator=seeds(gen), output_type="np", progress=False,
                callback=lambda i, t, x: final.update(ours=x.clone())).images
    return (torch.from_numpy(ours), final["ours"]), (torch.from_numpy(expected), final["ref"])


def check(pair) -> None:
    (ours, latents), (expected, expected_latents) = pair
    assert ours.shape == expected.shape
    assert_parity(ours, expected)
    assert_parity(latents, expected_latents)


CASES = {
    "one": dict(),
    "scale_and_range": dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.25, control_guidance_end=0.75),
    "guess_mode": dict(guess_mode=True, controlnet_conditioning_scale=1.5),
    "no_guidance": dict(guidance_scale=1.0, guess_mode=True),
    "euler": dict(control_guidance_end=0.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_text_to_image_parity(setup, case, tmp_path):
    import diffusers

    ref = reference(setup, "t2i", setup["refs_cn"][0])
    pipe = LatentDiffusionPipeline.from_pretrained(setup["root"] / "sd", controlnet=setup["ours_cn"][0])
    kw = dict(prompt=PROMPT) | CASES[case]
    if case == "euler":   # the scheduler read as a folder's (its timestep spacing), fixed latents
        ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
        ref.scheduler.save_pretrained(tmp_path)
        pipe.noise_scheduler, pipe.sampler = load_scheduler_folder(tmp_path)
        kw["latents"] = torch.randn(1, 4, 16, 16, generator=seeds(5))
    check(run_pair(ref, pipe, kw | dict(image=hint_image(0)), kw | dict(control_image=hint_image(0))))


def test_two_controlnets_with_their_own_scales_and_ranges(setup):
    import diffusers

    multi = diffusers.models.controlnets.multicontrolnet.MultiControlNetModel(setup["refs_cn"])
    ref = reference(setup, "t2i", multi)
    pipe = LatentDiffusionPipeline.from_pretrained(setup["root"] / "sd", controlnet=setup["ours_cn"])
    kw = dict(prompt=[PROMPT, "a dog"], controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[0.0, 0.25],
              control_guidance_end=[0.5, 1.0], num_images_per_prompt=2)
    per_net = [hint_image(0), hint_image(1)]                                      # one image for all rows each
    check(run_pair(ref, pipe, kw | dict(image=per_net), kw | dict(control_image=per_net)))
    per_prompt = [[hint_image(2), hint_image(3)], [hint_image(4), hint_image(5)]]   # diffusers' list of lists
    check(run_pair(ref, pipe, kw | dict(image=per_prompt), kw | dict(control_image=per_prompt)))


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_image_to_image_parity(setup, strength):
    """The step range counts the steps run (diffusers' controlnet_keep over the timesteps it runs)."""
    ref = reference(setup, "i2i", setup["refs_cn"][1])
    pipe = ImageToImagePipeline.from_pretrained(setup["root"] / "sd", controlnet=setup["ours_cn"][1])
    kw = dict(prompt=PROMPT, image=Image.fromarray(random_image()), strength=strength, control_guidance_end=0.6)
    check(run_pair(ref, pipe, kw | dict(control_image=hint_image(3)), kw | dict(control_image=hint_image(3))))


@pytest.mark.parametrize("channels, strength", [(9, 1.0), (9, 0.7), (4, 0.8)])
def test_inpaint_parity(setup, channels, strength):
    """An inpainting UNet (mask inputs the ControlNet does not see) and a plain one (the known region blended)."""
    ref = reference(setup, "inpaint" if channels == 9 else "inpaint4", setup["refs_cn"][0])
    pipe = InpaintPipeline.from_pretrained(setup["root"] / ("sd9" if channels == 9 else "sd"),
                                           controlnet=setup["ours_cn"][0])
    kw = dict(prompt=PROMPT, image=Image.fromarray(random_image()), mask_image=Image.fromarray(random_mask()),
              strength=strength, control_guidance_start=0.2)
    check(run_pair(ref, pipe, kw | dict(control_image=hint_image(4)), kw | dict(control_image=hint_image(4))))


# ---- folders ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("several", [False, True])
def test_folders_both_ways(setup, several, tmp_path):
    """Ours saved -> diffusers' ControlNet pipeline loads it (MultiControlNetModel for several), and back."""
    import diffusers

    cn = setup["ours_cn"] if several else setup["ours_cn"][0]
    pipe = ImageToImagePipeline.from_pretrained(setup["root"] / "sd", controlnet=cn)
    pipe.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionControlNetImg2ImgPipeline"
    assert index["controlnet"] == ["diffusers", "MultiControlNetModel" if several else "ControlNetModel"]
    assert (tmp_path / "ours" / "controlnet_1").is_dir() == several
    ref = diffusers.StableDiffusionControlNetImg2ImgPipeline.from_pretrained(tmp_path / "ours")
    nets = ref.controlnet.nets if several else [ref.controlnet]
    assert len(nets) == (2 if several else 1)
    for ours, theirs in zip(setup["ours_cn"], nets, strict=False):
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    ref.save_pretrained(tmp_path / "theirs")
    back = Pipeline.from_pretrained(tmp_path / "theirs")
    assert type(back) is ImageToImagePipeline and len(back.controlnets) == len(nets)
    for ours, again in zip(setup["ours_cn"], back.controlnets, strict=False):
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())
