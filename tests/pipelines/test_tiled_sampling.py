"""MultiDiffusion tiled sampling (pipelines/tiled_sampling.py) and the two-pass `generate_refined`.

What is proven:
* the window layout covers every latent pixel, stays inside the latent, and the normalised blend weights
  sum to 1 at every pixel (to 1e-12), for even and uneven layouts and both blends;
* one window covering the whole latent is plain sampling bit for bit, with every registered sampler;
* the blend adds no seam: with a pointwise denoiser (whose windows agree wherever they overlap), tiled
  sampling at 2x the native size equals plain sampling to 1e-6, with every registered sampler;
* at 2x the native size the real UNet only ever sees windows of its training size, for every sampler;
* bad tile settings and refine settings are InputErrors before any network runs.
"""
from __future__ import annotations

import pytest
import torch

from latentdiff import LatentDiffusionPipeline
from latentdiff.diffusion.noise_scheduler import NoiseScheduler
from latentdiff.errors import InputError
from latentdiff.pipelines.tiled_sampling import (
    LatentTiling,
    blend_weights,
    latent_tiling,
    tiled_denoiser,
    window_layout,
)
from latentdiff.registry import SAMPLERS
from tests._support.parity import max_rel_error
from tests._support.tiny_builtin import make_tiny_shapes_model

SAMPLER_NAMES = SAMPLERS.names()
PROMPT = "a red circle"
NATIVE = 64          # the tiny model: sample_size 16 latents x f = 4


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> LatentDiffusionPipeline:
    folder = make_tiny_shapes_model(tmp_path_factory.mktemp("tiled") / "shapes-64")
    return LatentDiffusionPipeline.from_pretrained(folder)


def with_sampler(pipe: LatentDiffusionPipeline, name: str) -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline(vae=pipe.vae, unet=pipe.unet, text_encoder=pipe.text_encoder,
                                   noise_scheduler=pipe.noise_scheduler, sampler=SAMPLERS.get(name)())


def run(pipe: LatentDiffusionPipeline, **options) -> torch.Tensor:
    options = dict(num_inference_steps=3, guidance_scale=3.0, output_type="latent", progress=False) | options
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **options).images


# ---- the layout ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height, width, size, overlap", [(32, 32, (16, 16), (8, 8)), (37, 29, (16, 12), (5, 3)),
                                                          (16, 48, (16, 16), (0, 0)), (20, 20, (32, 32), (8, 8))])
@pytest.mark.parametrize("blend", ["linear", "uniform"])
def test_windows_cover_the_latent_and_weights_sum_to_one(height, width, size, overlap, blend):
    tiling = LatentTiling(size=size, overlap=overlap, blend=blend)
    windows, weights = blend_weights(height, width, tiling)
    total = torch.zeros(height, width, dtype=torch.float64)
    for win, weight in zip(windows, weights, strict=True):
        assert win.top >= 0 and win.left >= 0 and win.top + win.height <= height and win.left + win.width <= width
        assert (win.height, win.width) == (min(size[0], height), min(size[1], width))
        assert weight.shape == (win.height, win.width) and bool((weight > 0).all())
        total[win.top:win.top + win.height, win.left:win.left + win.width] += weight
    assert float((total - 1).abs().max()) < 1e-12


def test_window_count_follows_the_stride():
    # side 32, window 16, overlap 8: stride 8 -> starts 0, 8, 16 per side
    windows = window_layout(32, 32, LatentTiling(size=(16, 16), overlap=(8, 8)))
    assert sorted({w.top for w in windows}) == [0, 8, 16] and len(windows) == 9


# ---- tiled == plain where it must be ---------------------------------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_one_window_over_the_latent_is_plain_sampling(pipe, sampler):
    pipe = with_sampler(pipe, sampler)
    plain = run(pipe)
    assert torch.equal(run(pipe, tile_size=NATIVE), plain)
    assert torch.equal(run(pipe, tile_size=4 * NATIVE, tile_overlap=0), plain)   # clamped to the latent


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize("blend", ["linear", "uniform"])
def test_blending_adds_no_seam_with_every_sampler(sampler, blend):
    """Windows of a pointwise denoiser agree where they overlap, so any seam would be the blend's own."""
    def pointwise(x_t, t):
        return torch.tanh(x_t) * 0.7 + 1e-4 * t.float()

    tiling = LatentTiling(size=(16, 16), overlap=(6, 10), blend=blend)
    x_T = torch.randn(2, 4, 32, 40, generator=torch.Generator().manual_seed(1))
    sampler_obj, schedule = SAMPLERS.get(sampler)(), NoiseScheduler()
    plain = sampler_obj.sample(pointwise, x_T, schedule, 4, generator=torch.Generator().manual_seed(2))
    tiled = sampler_obj.sample(tiled_denoiser(pointwise, tiling), x_T, schedule, 4,
                               generator=torch.Generator().manual_seed(2))
    assert max_rel_error(tiled, plain) <= 1e-6


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_twice_the_native_size_runs_the_unet_on_native_windows(pipe, sampler):
    pipe = with_sampler(pipe, sampler)
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        z = run(pipe, height=2 * NATIVE, width=2 * NATIVE, num_inference_steps=2, tile_size=NATIVE,
                tile_overlap=NATIVE // 2)
    finally:
        handle.remove()
    assert z.shape == (1, 4, 32, 32) and bool(torch.isfinite(z).all())
    assert set(seen) == {(16, 16)} and len(seen) % 9 == 0   # 3 x 3 windows per model call


# ---- the two-pass helper ---------------------------------------------------------------------------------
@pytest.mark.parametrize("upscale", ["latent", "image"])
def test_generate_refined_makes_large_images(pipe, upscale):
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        out = pipe.generate_refined(PROMPT, height=2 * NATIVE, width=3 * NATIVE // 2, refine_strength=0.5,
                                    upscale=upscale, num_inference_steps=4, guidance_scale=3.0,
                                    generator=torch.Generator().manual_seed(0), output_type="pt", progress=False)
    finally:
        handle.remove()
    assert out.images.shape == (1, 3, 128, 96) and bool(torch.isfinite(out.images).all())
    # 4 native steps, then 2 refine steps over 3 x 2 windows (32 x 24 latents, 16-windows overlapping by 8)
    assert set(seen) == {(16, 16)} and len(seen) == 4 + 2 * 6


def test_refine_starts_from_the_first_pass(pipe):
    """The first pass is a plain run with the same seed; a weak refine stays near it, a full-strength one
    (noised back to the first timestep) moves much further."""
    options = dict(height=NATIVE, width=NATIVE, num_inference_steps=4, guidance_scale=3.0, output_type="latent",
                   progress=False)
    strong = pipe.generate_refined(PROMPT, refine_strength=1.0, generator=torch.Generator().manual_seed(0), **options)
    weak = pipe.generate_refined(PROMPT, refine_strength=0.25, generator=torch.Generator().manual_seed(0), **options)
    plain = run(pipe, num_inference_steps=4)
    assert max_rel_error(weak.images, plain) < max_rel_error(strong.images, plain)


# ---- settings checked before any work --------------------------------------------------------------------
@pytest.mark.parametrize("options, where", [
    (dict(tile_size=30), "tile_size"),                          # not a multiple of f = 4
    (dict(tile_size=64, tile_overlap=64), "tile_overlap"),      # overlap as large as the tile
    (dict(tile_size=64, tile_overlap=6), "tile_overlap"),       # not a multiple of f
    (dict(tile_overlap=16), "tile_overlap"),                    # overlap without tiles
    (dict(tile_size=(64, 64, 64)), "tile_size"),
])
def test_bad_tile_settings_are_input_errors(pipe, options, where):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InputError) as info:
            run(pipe, **options)
    finally:
        handle.remove()
    assert info.value.where == where and not calls


@pytest.mark.parametrize("options, where", [(dict(refine_strength=0.0), "strength"),
                                            (dict(refine_strength=1.5), "strength"),
                                            (dict(upscale="nearest"), "upscale")])
def test_bad_refine_settings_are_input_errors(pipe, options, where):
    with pytest.raises(InputError) as info:
        pipe.generate_refined(PROMPT, height=128, width=128, num_inference_steps=4, progress=False, **options)
    assert info.value.where == where


def test_latent_tiling_converts_pixels_to_latents():
    assert latent_tiling(64, None, factor=4) == LatentTiling(size=(16, 16), overlap=(8, 8))
    assert latent_tiling((64, 32), (16, 8), factor=8) == LatentTiling(size=(8, 4), overlap=(2, 1))
