"""IP-Adapter (plain and plus) on the tiny Stable Diffusion pipeline: parity with diffusers' `load_ip_adapter` +
StableDiffusionPipeline on the same tiny files (released key layout, random weights), with an image and with
precomputed embeddings; the native CLIP vision tower and preprocessing against transformers'; loading errors that
change nothing; unload giving the base model back."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import CheckpointError, InputError, LatentDiffusionPipeline
from latentdiff.models.clip_vision import CLIPVisionModelWithProjection
from latentdiff.models.ip_adapter import cross_attentions
from latentdiff.pipelines.clip_image import clip_pixels
from tests._support.ip_adapter import PLAIN_NAME, PLUS_NAME, ip_adapter_state, write_tiny_ip_adapter
from tests._support.parity import assert_parity
from tests._support.sd import tiny_diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of a cat"
STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ip")
    sd = tiny_diffusers_pipeline(root)
    sd.save_pretrained(root / "sd")
    pipe = LatentDiffusionPipeline.from_pretrained(root / "sd")
    inner = [layer.to_k.out_features for _, layer in cross_attentions(pipe.unet)]
    for plus in (False, True):
        write_tiny_ip_adapter(root / "ip", plus=plus, inner=inner, context_dim=32, seed=int(plus))
    return root, pipe, inner


def photo(seed: int = 0, size: tuple[int, int] = (40, 52)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def reference(root, weight_name):
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(root / "sd", safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(root / "ip"), subfolder="models", weight_name=weight_name)
    ref.set_ip_adapter_scale(0.6)
    return ref


def latents():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))


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


def test_parity_per_block_scales(setup):
    """diffusers' InstantStyle-type scale dict: per block, per transformer, the rest 0."""
    root, pipe, _ = setup
    ref = reference(root, PLAIN_NAME)
    pipe.load_ip_adapter(root / "ip", subfolder="models", weight_name=PLAIN_NAME)
    scales = {"down": {"block_1": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.5, 0.5]}}
    ref.set_ip_adapter_scale(scales)
    pipe.set_ip_adapter_scale(scales)
    assert [a.scale for a in pipe.ip_adapter.attentions()] == [0.0, 1.0, 0.0, 1.5, 0.5, 0.0]   # down, up, mid
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np")
    with torch.no_grad():
        expected = ref(PROMPT, ip_adapter_image=photo(), latents=latents(), **kw).images
    got = pipe(PROMPT, ip_adapter_image=photo(), latents=latents(), progress=False, **kw).images
    assert_parity(torch.from_numpy(got), torch.from_numpy(expected))
    pipe.unload_ip_adapter()


def test_parity_two_adapters(setup):
    """Plain and plus loaded together (a list of weight names), one scale each, one image each, as diffusers."""
    import diffusers

    root, pipe, _ = setup
    ref = diffusers.StableDiffusionPipeline.from_pretrained(root / "sd", safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    for p in (ref, pipe):
        p.load_ip_adapter(str(root / "ip"), subfolder="models", weight_name=[PLAIN_NAME, PLUS_NAME])
        p.set_ip_adapter_scale([0.6, {"up": {"block_0": [0.0, 1.0, 0.5]}}])
    assert [a.is_plus for a in pipe.ip_adapters] == [False, True]
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np")
    images = [photo(10), [photo(11), photo(12)]]
    with torch.no_grad():
        expected = ref(PROMPT, ip_adapter_image=images, latents=latents(), **kw).images
        embeds = ref.prepare_ip_adapter_image_embeds(images, None, torch.device("cpu"), 1, True)
    got = pipe(PROMPT, ip_adapter_image=images, latents=latents(), progress=False, **kw).images
    assert_parity(torch.from_numpy(got), torch.from_numpy(expected))
    from_embeds = pipe(PROMPT, ip_adapter_image_embeds=embeds, latents=latents(), progress=False, **kw).images
    assert_parity(torch.from_numpy(from_embeds), torch.from_numpy(expected))
    with pytest.raises(InputError, match="one entry per loaded IP-Adapter"):
        pipe(PROMPT, ip_adapter_image=photo(), num_inference_steps=1, progress=False)
    with pytest.raises(InputError, match="one IP-Adapter scale per loaded adapter"):
        pipe.set_ip_adapter_scale([0.1, 0.2, 0.3])
    pipe.unload_ip_adapter()
    assert all(layer.extra == () for _, layer in cross_attentions(pipe.unet))


def test_parity_several_images_and_images_per_prompt(setup):
    """Two images for the adapter ([[a, b]]: 8 tokens) and num_images_per_prompt=2, as diffusers lays them out."""
    root, pipe, _ = setup
    ref = reference(root, PLUS_NAME)
    pipe.load_ip_adapter(root / "ip", subfolder="models", weight_name=PLUS_NAME)
    pipe.set_ip_adapter_scale(0.6)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np", num_images_per_prompt=2)
    images = [[photo(7), photo(8, (33, 61))]]
    with torch.no_grad():
        expected = ref(PROMPT, ip_adapter_image=images, latents=noise, **kw).images
    got = pipe(PROMPT, ip_adapter_image=images, latents=noise, progress=False, **kw).images
    assert_parity(torch.from_numpy(got), torch.from_numpy(expected))
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


def test_compiled_unet_reads_the_image_token_count():
    """torch.compile(fullgraph=True) cannot read the context variable: the compiled path reads its global twin."""
    from latentdiff.models.ip_adapter import IPAdapter, image_tokens
    from latentdiff.models.unet import UNet2DConditional, UNetConfig

    torch.manual_seed(0)
    unet = UNet2DConditional(UNetConfig(channels=(32, 64), attention_levels=(True, False), attention_heads=2,
                                        cross_attention_dim=16, norm_num_groups=8, sample_size=8)).eval()
    adapter = IPAdapter.for_unet(unet, image_embed_dim=8)
    for (_, layer), attention in zip(cross_attentions(unet), adapter.attentions(), strict=True):
        layer.extra = (attention,)
    compiled = torch.compile(unet.forward, backend="eager", fullgraph=True)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 9, 16)
    with torch.no_grad():
        with image_tokens((4,)):
            eager, fast = unet(x, 10, context), compiled(x, 10, context)
        text_only = unet(x, 10, context[:, :5])
        assert torch.equal(compiled(x, 10, context[:, :5]), text_only)
    assert torch.equal(fast, eager) and not torch.equal(eager, text_only)


def test_parity_with_a_controlnet(setup):
    """IP-Adapter and a ControlNet together, against diffusers' StableDiffusionControlNetPipeline + load_ip_adapter:
    the ControlNet sees the text context alone, the UNet the text and image tokens."""
    import diffusers

    from latentdiff import ControlNet
    from tests._support.parity import randomize_

    root, _, _ = setup
    torch.manual_seed(3)
    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "sd", subfolder="unet")
    cn = randomize_(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))).eval()
    cn.save_pretrained(root / "cn")
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(root / "sd", controlnet=cn, safety_checker=None,
                                                                      requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(root / "ip"), subfolder="models", weight_name=PLUS_NAME)
    ref.set_ip_adapter_scale(0.6)
    pipe = LatentDiffusionPipeline.from_pretrained(root / "sd", controlnet=ControlNet.from_pretrained(root / "cn"))
    pipe.load_ip_adapter(root / "ip", subfolder="models", weight_name=PLUS_NAME)
    pipe.set_ip_adapter_scale(0.6)
    hint = photo(9, (32, 32))
    kw = dict(num_inference_steps=STEPS, guidance_scale=7.5, output_type="np", controlnet_conditioning_scale=0.8)
    with torch.no_grad():
        expected = ref(PROMPT, image=hint, ip_adapter_image=photo(), latents=latents(), **kw).images
    got = pipe(PROMPT, control_image=hint, ip_adapter_image=photo(), latents=latents(), progress=False, **kw).images
    assert_parity(torch.from_numpy(got), torch.from_numpy(expected))
    without = pipe(PROMPT, control_image=hint, latents=latents(), progress=False, **kw).images
    assert np.abs(without - got).max() > 1e-3


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
