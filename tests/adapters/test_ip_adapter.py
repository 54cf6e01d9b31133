"""IP-Adapter (plain and plus) on the tiny Stable Diffusion pipeline: parity with diffusers' `load_ip_adapter` +
StableDiffusionPipeline on the same tiny files (released key layout, random weights), with an image and with
precomputed embeddings; the native CLIP vision tower and preprocessing against transformers'; loading errors that
change nothing; unload giving the base model back; pipelines sharing a UNet."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdiff import CheckpointError, InputError, LatentDiffusionPipeline
from latentdiff.models.clip_vision import CLIPVisionModelWithProjection
from latentdiff.models.ip_adapter import cross_attentions
from latentdiff.pipelines.clip_image import clip_pixels
from tests._support.ip_adapter import PLAIN_NAME, PLUS_NAME, fixed_latents, ip_adapter_state, ip_setup, photo, reference
from tests._support.parity import assert_parity

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of a cat"
STEPS = 3
latents = fixed_latents


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return ip_setup(tmp_path_factory.mktemp("ip"))


@pytest.mark.parametrize("weight_name", [PLAIN_NAME, PLUS_NAME])
def test_parity_with_diffusers(setup, weight_name):
    root, pipe, _ = setup
    ref = reference(root, weight_name)
    pipe.load_ip_adapter(root / "ip", subfolder="models", weight_name=weight_name)
    pipe.set_ip_adapter_scale(0.6)
    kw = dict(num_inference_steps=STEPS, guidance_scale=7.5, output_type="np")
    image = photo()
    with torch.no_grad():
        expected = ref(PROMPT, ip_adapter_image=image, latents=latents(), **kw).images
        # diffusers' own embeddings, negative first: the same result through ip_adapter_image_embeds
        embeds = ref.prepare_ip_adapter_image_embeds(image, None, torch.device("cpu"), 1, True)
    got = pipe(PROMPT, ip_adapter_image=image, latents=latents(), progress=False, **kw).images
    assert_parity(torch.from_numpy(got), torch.from_numpy(expected))
    from_embeds = pipe(PROMPT, ip_adapter_image_embeds=embeds, latents=latents(), progress=False, **kw).images
    assert_parity(torch.from_numpy(from_embeds), torch.from_numpy(expected))
    without = pipe(PROMPT, latents=latents(), progress=False, **kw).images   # no image: the base model
    assert np.abs(without - got).max() > 1e-3
    pipe.unload_ip_adapter()


def test_native_encoder_and_preprocessing_match_transformers(setup):
    from transformers import CLIPImageProcessor
    from transformers import CLIPVisionModelWithProjection as Reference

    root, _, _ = setup
    folder = root / "ip" / "models" / "image_encoder"
    ref, ours = Reference.from_pretrained(folder).eval(), CLIPVisionModelWithProjection.from_pretrained(folder)
    processor = CLIPImageProcessor(size=32, crop_size=32)
    images = [photo(1, (40, 52)), photo(2, (61, 33)), np.asarray(photo(3, (32, 32)))]
    for image in images:
        assert torch.equal(clip_pixels(image, size=32), processor(image, return_tensors="pt").pixel_values)
    pixels = clip_pixels(images[:2], size=32)
    with torch.no_grad():
        a, b = ref(pixels, output_hidden_states=True), ours(pixels, output_hidden_states=True)
    assert_parity(b.image_embeds, a.image_embeds, tol=1e-5)
    assert_parity(b.hidden_states[-2], a.hidden_states[-2], tol=1e-5)
    assert_parity(b.last_hidden_state, a.last_hidden_state, tol=1e-5)
    # a transformers model object works as the pipeline's encoder too, and from_transformers gives ours
    with torch.no_grad():
        converted = CLIPVisionModelWithProjection.from_transformers(ref)(pixels).image_embeds
    assert_parity(converted, a.image_embeds, tol=0)


def test_transformers_encoder_object_and_bin_file(setup, tmp_path):
    from transformers import CLIPVisionModelWithProjection as Reference

    root, pipe, inner = setup
    flat = ip_adapter_state(plus=False, inner=inner, context_dim=32)
    nested = {"image_proj": {k[11:]: v for k, v in flat.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[11:]: v for k, v in flat.items() if k.startswith("ip_adapter.")}}
    torch.save(nested, tmp_path / "ip-adapter_sd15.bin")
    encoder = Reference.from_pretrained(root / "ip" / "models" / "image_encoder").eval()
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="latent", progress=False)
    pipe.load_ip_adapter(tmp_path / "ip-adapter_sd15.bin", image_encoder=encoder)
    a = pipe(PROMPT, ip_adapter_image=photo(), latents=latents(), **kw).images
    pipe.load_ip_adapter(root / "ip" / "models" / PLAIN_NAME)   # the pipeline's encoder is kept (as diffusers)
    assert pipe.image_encoder is encoder
    pipe.unload_ip_adapter()
    pipe.load_ip_adapter(root / "ip" / "models" / PLAIN_NAME)   # the image_encoder/ folder beside the file
    assert isinstance(pipe.image_encoder, CLIPVisionModelWithProjection)
    b = pipe(PROMPT, ip_adapter_image=photo(), latents=latents(), **kw).images
    assert_parity(a, b, tol=1e-5)
    pipe.unload_ip_adapter()


def test_unload_gives_the_base_model_back_bit_for_bit(setup):
    root, pipe, _ = setup
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="latent", progress=False)
    before = pipe(PROMPT, latents=latents(), **kw).images
    keys = set(pipe.unet.state_dict())
    pipe.load_ip_adapter(root / "ip", subfolder="models", weight_name=PLUS_NAME)
    assert set(pipe.unet.state_dict()) == keys            # nothing added to the UNet's weights
    assert torch.equal(pipe(PROMPT, latents=latents(), **kw).images, before)   # no image prompt: the base model
    pipe.set_ip_adapter_scale(0.0)
    assert torch.equal(pipe(PROMPT, ip_adapter_image=photo(), latents=latents(), **kw).images, before)
    pipe.unload_ip_adapter()
    assert pipe.image_encoder is None and pipe.ip_adapter is None
    assert all(layer.extra == () for _, layer in cross_attentions(pipe.unet))
    assert torch.equal(pipe(PROMPT, latents=latents(), **kw).images, before)


def test_errors_change_nothing(setup, tmp_path):
    root, pipe, inner = setup
    from safetensors.torch import save_file

    with pytest.raises(CheckpointError, match="no image encoder"):   # a file with no image_encoder/ beside it
        save_file(ip_adapter_state(plus=False, inner=inner, context_dim=32), str(tmp_path / "alone.safetensors"))
        pipe.load_ip_adapter(tmp_path / "alone.safetensors")
    bad = ip_adapter_state(plus=False, inner=inner[:-1], context_dim=32)   # one cross-attention short
    with pytest.raises(CheckpointError, match="cross-attentions"):
        pipe.load_ip_adapter(bad, image_encoder=False)
    with pytest.raises(CheckpointError, match="not an IP-Adapter"):
        pipe.load_ip_adapter({"foo": torch.zeros(1)}, image_encoder=False)
    assert pipe.ip_adapter is None and all(layer.extra == () for _, layer in cross_attentions(pipe.unet))
    with pytest.raises(InputError, match="no IP-Adapter is loaded"):
        pipe(PROMPT, ip_adapter_image=photo(), num_inference_steps=1, progress=False)
    pipe.load_ip_adapter(root / "ip" / "models" / PLAIN_NAME, image_encoder=False)   # embeddings only
    with pytest.raises(InputError, match="without an image encoder"):
        pipe(PROMPT, ip_adapter_image=photo(), num_inference_steps=1, progress=False)
    with pytest.raises(InputError, match="wrong shape"):
        pipe(PROMPT, ip_adapter_image_embeds=[torch.zeros(2, 1, 7)], num_inference_steps=1, progress=False)
    with pytest.raises(InputError, match="finite number"):
        pipe.set_ip_adapter_scale(float("nan"))
    with pytest.raises(InputError, match="keys down, mid, up"):
        pipe.set_ip_adapter_scale({"left": 1.0})
    with pytest.raises(InputError, match="no such up block"):
        pipe.set_ip_adapter_scale({"up": {"block_1": 1.0}})      # up block 1 has no attention
    with pytest.raises(InputError, match="one scale per transformer"):
        pipe.set_ip_adapter_scale({"up": {"block_0": [1.0, 0.0]}})
    pipe.unload_ip_adapter()


def test_pipelines_sharing_a_unet_hold_one_adapter(setup):
    """from_pipe shares the UNet: a second pipeline's load replaces the first's adapter in it (never two sets of
    image attentions reading one token count), and the first pipeline then says so instead of running without."""
    root, pipe, _ = setup
    pipe.load_ip_adapter(root / "ip", subfolder="models", weight_name=PLAIN_NAME)
    other = LatentDiffusionPipeline.from_pipe(pipe)
    other.load_ip_adapter(root / "ip", subfolder="models", weight_name=PLUS_NAME)
    assert all(len(layer.extra) == 1 for _, layer in cross_attentions(pipe.unet))
    with pytest.raises(InputError, match="no longer in its UNet"):
        pipe(PROMPT, ip_adapter_image=photo(), num_inference_steps=1, progress=False)
    pipe.unload_ip_adapter()                      # removes only its own (none left): other's stays
    assert all(len(layer.extra) == 1 for _, layer in cross_attentions(pipe.unet))
    other.unload_ip_adapter()
    assert all(layer.extra == () for _, layer in cross_attentions(pipe.unet))
