"""`latentdiff generate --controlnet` on a tiny SDXL model (latentdiff-built, tests/_support/sdxl_native) with a
tiny random SDXL ControlNet: the pixels of StableDiffusionXLPipeline(controlnet=) with the same hint, and with a
refiner the ControlNet steers the base's part only (the refiner takes the prompt alone, as A1111's)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import ControlNet, StableDiffusionXLPipeline, UNet2DConditional, control
from latentdiff.cli import main
from latentdiff.pipelines.sdxl_image import StableDiffusionXLImg2ImgPipeline
from tests._support.cli import pixels
from tests._support.parity import randomize_
from tests._support.sdxl_native import write_tiny_sdxl

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red church at dusk"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-control")
    base = write_tiny_sdxl(root / "base")
    torch.manual_seed(3)
    unet = UNet2DConditional.from_pretrained(base / "unet")     # the tiny VAE has factor 2: hints at 2x the latent
    cn = randomize_(ControlNet.from_unet(unet, conditioning_embedding_out_channels=(8, 16)))
    cn.save_pretrained(root / "cn")
    g = torch.Generator().manual_seed(4)
    Image.fromarray((torch.rand(48, 40, 3, generator=g) * 255).byte().numpy()).save(root / "photo.png")
    return base, root / "cn", root / "photo.png", write_tiny_sdxl(root / "refiner", kind="refiner", seed=5)


def test_sdxl_controlnet_matches_the_api_and_the_refiner_runs_without_it(folders, tmp_path, monkeypatch):
    base, cn, photo, refiner_folder = folders
    monkeypatch.chdir(tmp_path)
    argv = ["generate", PROMPT, "--model", str(base), "--seed", "2", "--steps", "2", "--controlnet", str(cn),
            "--control", f"canny:{photo}:0.9"]
    assert main([*argv, "-o", "a.png"]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(base, controlnet=ControlNet.from_pretrained(cn))
    steps, guidance = pipe.default_call(2, None)
    height, width = pipe.image_size(None, None)
    hint = control.canny(Image.open(photo).convert("RGB"))
    common = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance, progress=False)
    expected = pipe([PROMPT], control_image=hint, controlnet_conditioning_scale=0.9,
                    generator=[torch.Generator().manual_seed(2)], **common).images[0]
    assert np.array_equal(pixels("a.png"), np.asarray(expected.convert("RGB")))
    plain = StableDiffusionXLPipeline.from_pretrained(base)([PROMPT], generator=[torch.Generator().manual_seed(2)],
                                                            **common).images[0]
    assert not np.array_equal(np.asarray(plain.convert("RGB")), np.asarray(expected.convert("RGB")))

    assert main([*argv, "-o", "r.png", "--refiner", str(refiner_folder), "--refiner-switch", "0.5"]) == 0
    latents = pipe([PROMPT], control_image=hint, controlnet_conditioning_scale=0.9, denoising_end=0.5,
                   output_type="latent", generator=[torch.Generator().manual_seed(2)], **common).images
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder)
    refined = refiner([PROMPT], image=latents, denoising_start=0.5, num_inference_steps=steps, guidance_scale=guidance,
                      generator=[torch.Generator().manual_seed(2)], progress=False).images[0]
    assert np.array_equal(pixels("r.png"), np.asarray(refined.convert("RGB")))
