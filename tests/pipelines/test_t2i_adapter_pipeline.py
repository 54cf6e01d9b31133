"""T2I-Adapters in the text-to-image pipeline: parity with diffusers' StableDiffusionAdapterPipeline (one adapter,
a one-channel sketch adapter fed a grey picture, two adapters with their own weights) on tiny random weights with
the same fixed latents; folders both ways; with a ControlNet too; bad input refused before any step."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import ControlNet, LatentDiffusionPipeline, T2IAdapter
from latentdiff.errors import ConfigError, InputError
from tests._support.int8 import observed_ranges
from tests._support.parity import assert_parity, max_rel_error, randomize, randomize_
from tests._support.sd import TINY_UNET, tiny_diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a photo of a cat"
STEPS = 3
SIZE = 32   # pixels; the tiny autoencoder's factor is 2: latents 16 x 16
# a cross-attention level, then a plain one: the UNet takes full adapters' features at 1/1 and 1/2 of the latent
UNET = TINY_UNET | dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
ADAPTER = dict(channels=[32, 64], num_res_blocks=1, downscale_factor=2)   # features at 1/2 and 1/4 of the image


def hint(seed: int, *, grey: bool = False) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(SIZE, SIZE, 1 if grey else 3, generator=g) * 255).byte().numpy()
    return Image.fromarray(pixels[..., 0] if grey else pixels)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("t2i_adapter")
    parts = tiny_diffusers_pipeline(root / "sd").components
    torch.manual_seed(0)
    parts["unet"] = randomize(diffusers.UNet2DConditionModel(**UNET), 1).eval()
    diffusers.StableDiffusionPipeline(**parts).save_pretrained(root / "folder")
    refs = {}
    for name, kwargs, seed in (("rgb", ADAPTER, 0), ("rgb2", ADAPTER, 1), ("sketch", ADAPTER | {"in_channels": 1}, 2)):
        torch.manual_seed(seed)
        refs[name] = randomize_(diffusers.T2IAdapter(**kwargs)).eval()
        refs[name].save_pretrained(root / name)
    ours = {name: T2IAdapter.from_pretrained(root / name) for name in refs}
    latents = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(5))
    return dict(root=root, parts=parts, refs=refs, ours=ours, latents=latents)


def reference(setup, adapter):
    import diffusers

    parts = {k: v for k, v in setup["parts"].items() if k != "image_encoder"}
    ref = diffusers.StableDiffusionAdapterPipeline(**parts, adapter=adapter)
    ref.set_progress_bar_config(disable=True)
    return ref


def run_pair(setup, ref, pipe, *, image, **kw):
    with torch.no_grad():
        expected = ref(PROMPT, image=image, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                       latents=setup["latents"], output_type="np", **kw).images
    ours = pipe(PROMPT, control_image=image, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                latents=setup["latents"], output_type="np", progress=False, **kw).images
    return torch.from_numpy(ours), torch.from_numpy(expected)


@pytest.mark.parametrize("name, kw", [("rgb", {}), ("rgb", {"adapter_conditioning_scale": 0.6}),
                                      ("sketch", {"adapter_conditioning_scale": 1.3})],
                         ids=["one", "scale", "sketch-grey"])
def test_one_adapter_matches_diffusers(setup, name, kw):
    pipe = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=setup["ours"][name])
    image = hint(3, grey=name == "sketch")
    ours, expected = run_pair(setup, reference(setup, setup["refs"][name]), pipe, image=image, **kw)
    assert_parity(ours, expected)
    plain = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder")(
        PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=setup["latents"], output_type="np",
        progress=False).images
    assert np.abs(plain - ours.numpy()).max() > 1e-3   # the adapter changed the image: the test can fail


def test_several_images_per_prompt_without_guidance_match_diffusers(setup):
    """The features' rows repeated per image, and the unguided batch (no doubling)."""
    pipe = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=setup["ours"]["rgb"])
    latents = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(6))
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=latents, output_type="np",
              num_images_per_prompt=2, guidance_scale=1.0, adapter_conditioning_scale=0.9)
    with torch.no_grad():
        expected = reference(setup, setup["refs"]["rgb"])(PROMPT, image=hint(8), **kw).images
    ours = pipe(PROMPT, control_image=hint(8), progress=False, **kw).images
    assert ours.shape[0] == 2
    assert_parity(torch.from_numpy(ours), torch.from_numpy(expected))


def test_two_adapters_with_weights_match_diffusers_multi_adapter(setup):
    refs, ours = setup["refs"], setup["ours"]
    pipe = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=[ours["rgb"], ours["rgb2"]])
    images = [hint(3), hint(4)]
    got, expected = run_pair(setup, reference(setup, [refs["rgb"], refs["rgb2"]]), pipe, image=images,
                             adapter_conditioning_scale=[0.7, 0.4])
    assert_parity(got, expected)


def test_features_are_computed_once_per_call(setup):
    """An adapter sees no latent and no timestep: one forward per call, not one per step (or per guidance half)."""
    pipe = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=setup["ours"]["rgb"])
    runs = []
    handle = pipe.adapter.register_forward_hook(lambda *_: runs.append(1))
    try:
        pipe(PROMPT, control_image=hint(3), height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent",
             progress=False)
    finally:
        handle.remove()
    assert len(runs) == 1


def test_tiled_sampling_gives_each_window_its_features(setup):
    """MultiDiffusion windows: the adapter runs once per window on the hint's pixels under it."""
    pipe = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=setup["ours"]["rgb"])
    runs = []
    handle = pipe.adapter.register_forward_hook(lambda _m, args, _out: runs.append(tuple(args[0].shape[-2:])))
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=setup["latents"], output_type="latent",
              progress=False, tile_size=16, tile_overlap=8)
    try:
        tiled = pipe(PROMPT, control_image=hint(3), **kw).images
    finally:
        handle.remove()
    assert runs[0] == (SIZE, SIZE) and set(runs[1:]) == {(16, 16)} and len(runs) == 1 + 9   # 3 x 3 windows
    without = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder")(PROMPT, **kw).images
    assert torch.isfinite(tiled).all() and (tiled - without).abs().max() > 1e-4


def test_folders_both_ways(setup, tmp_path):
    import diffusers

    ours = setup["ours"]
    pipe = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=ours["rgb"])
    pipe.save_pretrained(tmp_path / "one")
    index = json.loads((tmp_path / "one" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionAdapterPipeline" and index["adapter"] == ["diffusers", "T2IAdapter"]
    theirs = diffusers.StableDiffusionAdapterPipeline.from_pretrained(tmp_path / "one")
    theirs.set_progress_bar_config(disable=True)
    back = LatentDiffusionPipeline.from_pretrained(tmp_path / "one")
    assert isinstance(back.adapter, T2IAdapter) and back.adapter.config == ours["rgb"].config
    got, expected = run_pair(setup, theirs, back, image=hint(6), adapter_conditioning_scale=0.8)
    assert_parity(got, expected)
    multi = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=[ours["rgb"], ours["sketch"]])
    multi.save_pretrained(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "model_index.json").read_text())["adapter"] == ["diffusers", "MultiAdapter"]
    assert (tmp_path / "two" / "adapter_1").is_dir()
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "two")
    assert [a.config.in_channels for a in loaded.adapters] == [3, 1]
    assert len(diffusers.StableDiffusionAdapterPipeline.from_pretrained(tmp_path / "two").adapter.adapters) == 2


def test_with_a_controlnet_the_residuals_add_up(setup):
    """ControlNet hints first, then the adapter's: both act in one run."""
    torch.manual_seed(3)
    pipe = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=setup["ours"]["rgb"])
    controlnet = ControlNet.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    both = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=setup["ours"]["rgb"],
                                                   controlnet=controlnet)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=setup["latents"], output_type="latent",
              progress=False)
    together = both(PROMPT, control_image=[hint(7), hint(3)], **kw).images
    adapter_only = pipe(PROMPT, control_image=hint(3), **kw).images
    controlnet_only = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", controlnet=controlnet)(
        PROMPT, control_image=hint(7), **kw).images
    assert (together - adapter_only).abs().max() > 1e-4 and (together - controlnet_only).abs().max() > 1e-4
    with pytest.raises(InputError, match="per ControlNet, then one per adapter"):
        both(PROMPT, control_image=hint(3), **kw)


def test_bad_input_is_refused_before_any_step(setup):
    ours = setup["ours"]
    steps = []
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent", progress=False,
              callback=lambda *a: steps.append(1))
    rgb = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=ours["rgb"])
    sketch = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=ours["sketch"])
    two = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=[ours["rgb"], ours["rgb2"]])
    plain = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder")
    with pytest.raises(InputError, match="1 channel|3 channel"):
        rgb(PROMPT, control_image=torch.rand(1, 1, SIZE, SIZE), **kw)
    with pytest.raises(InputError, match="grey"):
        sketch(PROMPT, control_image=hint(3), **kw)
    with pytest.raises(InputError):   # another size, and no resizing asked for
        rgb(PROMPT, control_image=torch.rand(1, 3, 16, 16), control_resize_mode=None, **kw)
    with pytest.raises(InputError, match="needs a control_image"):
        rgb(PROMPT, **kw)
    with pytest.raises(InputError, match="one image .or batch. each"):
        two(PROMPT, control_image=hint(3), **kw)
    with pytest.raises(InputError, match="one entry per adapter"):
        two(PROMPT, control_image=[hint(3), hint(4)], adapter_conditioning_scale=[1.0, 0.5, 0.2], **kw)
    with pytest.raises(InputError, match="needs a T2I-Adapter"):
        plain(PROMPT, adapter_conditioning_scale=0.5, **kw)
    assert not steps
    wide = T2IAdapter(T2IAdapter.from_file_config(ADAPTER | {"channels": [32, 128]}))
    with pytest.raises(ConfigError, match="do not fit the UNet"):
        LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=wide)
    with pytest.raises(ConfigError, match="adapter"):
        LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=[ours["rgb"], "sketch.pth"])


def test_int8_static_calibrates_with_the_adapter_hint_and_bounds_the_error(setup):
    """quantize(..., "int8-static", calibration_options=) with a T2I-Adapter: the int8 layers' ranges are those of
    the calibration prompts run with the hint (the adapter's features enter the UNet's way down; written out here
    on the same calls), not those without it; the adapted image stays within 6 % of fp32 (the int8-static bound
    of tests/pipelines/test_int8_static.py)."""
    from latentdiff.layers import int8
    from latentdiff.pipelines import cpu_paths

    pipe = LatentDiffusionPipeline.from_pretrained(setup["root"] / "folder", adapter=setup["ours"]["rgb"])
    options = dict(control_image=hint(3), height=SIZE, width=SIZE)
    prompts = ["a red circle", "a blue square"]
    layers = int8.int8_candidates(pipe.unet)

    def image(p) -> torch.Tensor:
        return p(PROMPT, num_inference_steps=STEPS, latents=setup["latents"], output_type="pt", progress=False,
                 **options).images

    expected = observed_ranges(pipe, prompts, **options)
    unadapted = observed_ranges(pipe, prompts, **options | dict(adapter_conditioning_scale=0.0))
    assert expected != unadapted   # the adapter's features move the ranges
    reference = image(pipe)
    cpu_paths.quantize(pipe, "int8-static", calibration=prompts, calibration_steps=2, calibration_options=options)
    assert {name: layer.forward.input_range for name, layer in layers.items()} == expected
    assert 1e-4 < max_rel_error(image(pipe), reference) <= 0.06
