"""SDXL adapters through the whole pipeline: StableDiffusionXLPipeline's images with a kohya SDXL LoRA (runtime,
fused, and `<lora:NAME:W_unet:W_te>` tags found in `lora_dirs=`) and with an SDXL embedding in the prompt and the
negative prompt equal diffusers' StableDiffusionXLPipeline's (peft; two load_textual_inversion calls) on the tiny
SDXL, with CFG and two Euler steps, fp32 max rel err <= 1e-4; unloading gives the base images bit for bit; the
refiner's image-to-image with a LoRA of its UNet and bigG equals diffusers' refiner's; an SD 1.x LoRA on the
pipeline is refused with nothing changed."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from latentdiff import CheckpointError, StableDiffusionXLPipeline
from tests._support.lora import kohya, parameters, same_parameters, targets
from tests._support.parity import assert_parity
from tests._support.sdxl import TE1_HIDDEN, TE2_HIDDEN, tiny_sdxl
from tests._support.sdxl_lora import kohya_sdxl, kohya_unet_names, sdxl_targets

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("peft")
PROMPT = "a mystyle photo of a cat"
RUN = dict(num_inference_steps=2, guidance_scale=5.0, negative_prompt="blurry mystyle", height=32, width=32,
           output_type="pt")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, diffusers):
    root = tmp_path_factory.mktemp("sdxl_adapters_pipeline")
    ref = tiny_sdxl(root / "base")
    pipe = StableDiffusionXLPipeline.from_pretrained(root / "base")
    found = sdxl_targets(pipe.unet, {"text_encoder": pipe.text_encoder.model,
                                     "text_encoder_2": pipe.text_encoder_2.model})
    names = kohya_unet_names(pipe.unet, [n for c, n, _ in found if c == "unet"], ref.unet.config)
    save_file(kohya_sdxl(found, names, seed=7, std=0.1), root / "style.safetensors")
    g = torch.Generator().manual_seed(3)
    save_file({"clip_l": torch.randn(2, TE1_HIDDEN, generator=g), "clip_g": torch.randn(2, TE2_HIDDEN, generator=g)},
              root / "mystyle.safetensors")
    return root, ref, pipe


def images(pipe, prompt=PROMPT, **kw):
    """One call's images from latents drawn by the same seed (diffusers' and latentdiff's draws agree)."""
    g = torch.Generator().manual_seed(0)
    if isinstance(pipe, StableDiffusionXLPipeline):
        return pipe(prompt, generator=g, prompt_syntax="plain", progress=False, **RUN, **kw).images
    with torch.no_grad():
        return pipe(prompt, generator=g, **RUN, **kw).images


def test_lora_images(setup):
    root, ref, pipe = setup
    plain = images(pipe)
    ref.load_lora_weights(root / "style.safetensors", adapter_name="style")
    pipe.load_lora_weights(root / "style.safetensors")                   # adapter name: the file's stem
    try:
        ref.set_adapters(["style"], adapter_weights=[0.5])
        pipe.set_adapters(["style"], adapter_weights=[0.5])
        expected = images(ref)
        assert_parity(images(pipe), expected, 1e-4)
        assert (expected - plain).abs().max() > 1e-3
        pipe.fuse_lora()
        assert_parity(images(pipe), expected, 1e-4)
        pipe.unfuse_lora()
        # a tag weighs the UNet by 0.8 and both text encoders by 0.3, for this call only
        ref.set_adapters(["style"], adapter_weights=[{"unet": 0.8, "text_encoder": 0.3, "text_encoder_2": 0.3}])
        pipe.set_adapters([], adapter_weights=[])
        tagged = images(pipe, PROMPT + " <lora:style:0.8:0.3>", prompt_2=PROMPT + " <lora:style:0.8:0.3>",
                        lora_dirs=[root])
        assert_parity(tagged, images(ref, prompt_2=PROMPT + " "), 1e-4)
        assert pipe.get_active_adapters() == []
    finally:
        ref.unload_lora_weights()
        pipe.unload_lora_weights()
    assert torch.equal(images(pipe), plain)


def test_embedding_images(setup):
    root, ref, pipe = setup
    plain = images(pipe)
    from safetensors.torch import load_file

    state = load_file(root / "mystyle.safetensors")
    ref.load_textual_inversion(state["clip_l"], token="mystyle", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token="mystyle", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    pipe.load_textual_inversion(root / "mystyle.safetensors")
    try:
        expected = images(ref)
        assert_parity(images(pipe), expected, 1e-4)
        assert (expected - plain).abs().max() > 1e-3
    finally:
        ref.unload_textual_inversion()
        pipe.unload_textual_inversion()
    assert torch.equal(images(pipe), plain)


def test_sd15_lora_refused(setup, tmp_path):
    _, _, pipe = setup
    from tests._support.sd import tiny_diffusers_pipeline

    sd = tiny_diffusers_pipeline(tmp_path)
    save_file(kohya(targets(sd.unet, sd.text_encoder), seed=1), tmp_path / "sd15.safetensors")
    before = parameters(pipe.unet, pipe.text_encoder.model, pipe.text_encoder_2.model)
    with pytest.raises(CheckpointError, match="another model family"):
        pipe.load_lora_weights(tmp_path / "sd15.safetensors")
    assert same_parameters(before, pipe.unet, pipe.text_encoder.model, pipe.text_encoder_2.model)


def test_refiner_lora_images(setup):
    """The refiner (image-to-image, bigG only) with a kohya LoRA of its UNet and lora_te2_ keys."""
    import numpy as np
    from PIL import Image

    from latentdiff import StableDiffusionXLImg2ImgPipeline

    root = setup[0]
    ref = tiny_sdxl(root / "refiner", kind="refiner")
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(root / "refiner")
    found = sdxl_targets(pipe.unet, {"text_encoder_2": pipe.text_encoder_2.model})
    names = kohya_unet_names(pipe.unet, [n for c, n, _ in found if c == "unet"], ref.unet.config)
    save_file(kohya_sdxl(found, names, seed=9, std=0.1), root / "refiner_style.safetensors")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    run = dict(image=image, strength=0.6, num_inference_steps=4, guidance_scale=5.0, negative_prompt="x",
               output_type="pt")
    ref.load_lora_weights(root / "refiner_style.safetensors", adapter_name="r")
    pipe.load_lora_weights(root / "refiner_style.safetensors", adapter_name="r")
    with torch.no_grad():
        expected = ref(PROMPT, generator=torch.Generator().manual_seed(0), **run).images
    ours = pipe(PROMPT, generator=torch.Generator().manual_seed(0), prompt_syntax="plain", progress=False,
                **run).images
    assert_parity(ours, expected, 1e-4)
