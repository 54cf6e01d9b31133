"""LoRA files read as diffusers + peft read them (`load_lora_weights`), on the tiny Stable Diffusion: a diffusers /
PEFT file in a folder and a kohya file with diffusers-style names give the same images as diffusers at weight 1
and 0.5 (`set_adapters`), runtime and fused alike."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests._support.lora import kohya, peft, targets
from tests._support.parity import assert_parity
from tests._support.sd import tiny_diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("peft")
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, diffusers):
    root = tmp_path_factory.mktemp("lora_parity")
    sd = tiny_diffusers_pipeline(root)
    sd.save_pretrained(root / "sd")
    found = targets(sd.unet, sd.text_encoder)
    (root / "peft").mkdir()
    save_file(peft(found, seed=1), root / "peft" / "pytorch_lora_weights.safetensors")
    save_file(kohya(found, seed=2, alpha=2.0), root / "kohya_style.safetensors")
    return root, sd, LatentDiffusionPipeline.from_pretrained(root / "sd")


def images(pipe, **kw):
    gen = torch.Generator().manual_seed(0)
    if isinstance(pipe, LatentDiffusionPipeline):
        return pipe(PROMPT, num_inference_steps=2, output_type="pt", generator=gen, progress=False, **kw).images
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=2, output_type="pt", generator=gen, **kw).images


@pytest.mark.parametrize("file", ["peft", "kohya_style.safetensors"])
def test_same_images_as_diffusers(setup, file):
    root, sd, pipe = setup
    base = images(pipe)
    sd.load_lora_weights(root / file, adapter_name="a")
    pipe.load_lora_weights(root / file, adapter_name="a")
    try:
        for weight in (1.0, 0.5):
            sd.set_adapters(["a"], adapter_weights=[weight])
            pipe.set_adapters(["a"], adapter_weights=[weight])
            ours, expected = images(pipe), images(sd)
            assert_parity(ours, expected, 1e-4)
            assert (ours - base).abs().max() > 1e-3     # the LoRA does change the image
        pipe.fuse_lora()
        assert_parity(images(pipe), expected, 1e-4)     # fused == runtime at weight 0.5
        pipe.unfuse_lora()
    finally:
        sd.unload_lora_weights()
        pipe.unload_lora_weights()
    assert torch.equal(images(pipe), base)
