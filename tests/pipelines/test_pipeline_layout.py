"""LayoutToImagePipeline against an independent reference: the segmentation map one-hot encoded with F.one_hot,
brought to the latent grid by 2x2 average pooling (+ the rescaler's 1x1 conv written as an einsum), concatenated
to x_t for diffusers' UNet2DModel on the same weights, diffusers' DDIMScheduler stepping and VQModel decoding
(diffusers has no such pipeline). A learned and the default rescaler, every kind of map, folders both ways, and
bad input refused before any UNet call."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from latentdiff import ConfigError, InputError
from latentdiff.models.conditioners import SpatialRescaler, SpatialRescalerConfig
from latentdiff.models.unet2d import UNet2D
from latentdiff.models.vq import VQModel
from latentdiff.pipelines.base import Pipeline
from latentdiff.pipelines.layout_to_image import LayoutToImagePipeline
from tests._support.ldm import (
    decoded,
    ldm_scheduler,
    manual_ddim,
    no_unet_calls,
    noise,
    ours,
    schedule,
    tiny_unet2d,
    tiny_vq,
)
from tests._support.parity import assert_parity

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, cores are shared

K = 5  # classes


def segmentation(batch=1, size=16, seed=0) -> torch.Tensor:
    """(B, H, W) int64 class ids in [0, K)."""
    return torch.randint(0, K, (batch, size, size), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Reference parts and the pipelines: "learned" (a rescaler with a 1x1 conv to 2 channels) and "default"."""
    root = tmp_path_factory.mktemp("layout")
    torch.manual_seed(5)
    rescaler = SpatialRescaler(SpatialRescalerConfig(n_stages=1, in_channels=K, out_channels=2)).eval()
    ref = {"vq": tiny_vq(scaling_factor=0.5), "learned": tiny_unet2d(in_channels=3 + 2, seed=6),
           "default": tiny_unet2d(in_channels=3 + K, seed=7),
           "conv": rescaler.channel_mapper.weight.detach()[:, :, 0, 0]}
    noise_scheduler, sampler = schedule(ldm_scheduler(), root / "scheduler")
    common = dict(vae=ours(ref["vq"], VQModel, root / "vq"), noise_scheduler=noise_scheduler, sampler=sampler)
    pipes = {"learned": LayoutToImagePipeline(unet=ours(ref["learned"], UNet2D, root / "learned"), rescaler=rescaler,
                                              **common),
             "default": LayoutToImagePipeline(unet=ours(ref["default"], UNet2D, root / "default"), **common)}
    return ref, pipes


def reference(ref, kind, ids, x_T):
    one_hot = F.one_hot(ids, K).permute(0, 3, 1, 2).float()
    grid = F.avg_pool2d(one_hot, 2)  # bilinear halving of an even-sized map = the mean of each 2x2 patch
    if kind == "learned":
        grid = torch.einsum("ok,bkhw->bohw", ref["conv"], grid)
    return decoded(ref["vq"], manual_ddim(lambda x, t: ref[kind](torch.cat([x, grid], 1), t).sample, x_T,
                                          ldm_scheduler()))


@pytest.mark.parametrize("kind", ["learned", "default"])
def test_matches_the_manual_reference(setup, kind):
    ref, pipes = setup
    ids, x_T = segmentation(2), noise((2, 3, 8, 8), seed=1)
    ours_pt = pipes[kind](ids, latents=x_T, output_type="pt", num_inference_steps=4, progress=False).images
    assert ours_pt.shape == (2, 3, 16, 16)
    assert_parity(ours_pt, reference(ref, kind, ids, x_T))


def test_every_kind_of_map_gives_the_same_images(setup):
    _, pipes = setup
    pipe, ids = pipes["learned"], segmentation(seed=2)[0]
    run = dict(latents=noise((1, 3, 8, 8), seed=2), output_type="pt", num_inference_steps=2, progress=False)
    expected = pipe(ids, **run).images
    palette = Image.fromarray(ids.numpy().astype(np.uint8), mode="L").convert("P")
    one_hot = F.one_hot(ids, K).permute(2, 0, 1)
    for layout in (Image.fromarray(ids.numpy().astype(np.uint8)), palette, ids.numpy().astype(np.int32),
                   ids[None].to(torch.int16), [ids], one_hot.float(), one_hot.bool().numpy(), one_hot[None].double()):
        assert torch.equal(pipe(layout, **run).images, expected), type(layout)
    assert torch.equal(pipe(ids, height=16, width=16, **run).images, expected)


@pytest.mark.parametrize("kind", ["learned", "default"])
def test_save_and_load_round_trip(setup, tmp_path, kind):
    _, pipes = setup
    pipe = pipes[kind]
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "LatentDiffusionLayoutPipeline"
    assert index["rescaler"] == ["latentdiff", "SpatialRescaler"] and index["vqvae"] == ["diffusers", "VQModel"]
    back = Pipeline.from_pretrained(tmp_path / "saved")
    assert type(back) is LayoutToImagePipeline and back.rescaler.config == pipe.rescaler.config
    run = dict(latents=noise((1, 3, 8, 8), seed=3), output_type="pt", num_inference_steps=2, progress=False)
    assert torch.equal(back(segmentation(seed=3), **run).images, pipe(segmentation(seed=3), **run).images)


def test_single_file_with_the_default_rescaler_only(setup, tmp_path):
    _, pipes = setup
    pipe = pipes["default"]
    pipe.save_single_file(tmp_path / "layout.safetensors")
    back = Pipeline.from_single_file(tmp_path / "layout.safetensors", task="layout-to-image",
                                     noise_scheduler=pipe.noise_scheduler, sampler=pipe.sampler)
    assert type(back) is LayoutToImagePipeline and back.rescaler.config == pipe.rescaler.config
    run = dict(latents=noise((1, 3, 8, 8), seed=5), output_type="pt", num_inference_steps=2, progress=False)
    assert_parity(back(segmentation(seed=5), **run).images, pipe(segmentation(seed=5), **run).images)
    with pytest.raises(ConfigError, match="rescaler"):
        pipes["learned"].save_single_file(tmp_path / "learned.safetensors")
    assert not (tmp_path / "learned.safetensors").exists()


def test_parts_that_do_not_fit_are_a_config_error(setup):
    _, pipes = setup
    pipe = pipes["learned"]
    quarter = SpatialRescaler(SpatialRescalerConfig(n_stages=2, in_channels=K, out_channels=2))
    with pytest.raises(ConfigError, match="latent grid"):
        LayoutToImagePipeline(vae=pipe.vae, unet=pipe.unet, rescaler=quarter)
    wider = SpatialRescaler(SpatialRescalerConfig(n_stages=1, in_channels=K, out_channels=4))
    with pytest.raises(ConfigError, match="in_channels"):
        LayoutToImagePipeline(vae=pipe.vae, unet=pipe.unet, rescaler=wider)
    with pytest.raises(ConfigError, match="one channel per class"):
        LayoutToImagePipeline(vae=pipe.vae, unet=UNet2D(pipe.unet.config.replace(in_channels=3)))


def ids_with(value, size=16):
    ids = segmentation(size=size)[0]
    ids[3, 4] = value
    return ids


@pytest.mark.parametrize("layout, kwargs, match", [
    (ids_with(K), {}, "class id out of range"),
    (ids_with(-1), {}, "class id out of range"),
    (Image.fromarray(ids_with(7).numpy().astype(np.uint8)), {}, "class id out of range"),
    (segmentation(size=15), {}, "multiples of the autoencoder factor"),
    (segmentation(), dict(height=32), "size of the image"),
    (segmentation(), dict(width=8), "size of the image"),
    (torch.rand(K + 1, 16, 16), {}, "one channel per class"),
    (torch.full((K, 16, 16), 2.0), {}, r"\[0, 1\]"),
    (Image.new("RGB", (16, 16)), {}, "mode"),
    (torch.zeros(1, 1, 16, 16, dtype=torch.long), {}, "class ids"),
    ([segmentation(size=16)[0], segmentation(size=8)[0]], {}, "same size"),
    ([], {}, "empty"),
    ("a map", {}, "unsupported"),
    (segmentation(), dict(latents=torch.zeros(1, 3, 16, 16)), "latents"),
    (segmentation(2), dict(generator=[torch.Generator()]), "generator"),
    (segmentation(), dict(output_type="jpeg"), "output_type"),
])
def test_bad_input_is_refused_before_any_unet_call(setup, layout, kwargs, match):
    _, pipes = setup
    pipe = pipes["learned"]
    with no_unet_calls(pipe), pytest.raises(InputError, match=match):
        pipe(layout, num_inference_steps=2, progress=False, **kwargs)
