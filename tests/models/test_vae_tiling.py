"""Tiled and sliced first-stage calls (models/vae_tiling.py, AutoencoderKL.enable_tiling / enable_slicing) and the
pipeline's decode safety nets (out-of-memory fall-back to tiles, fp16 NaN/Inf redone in fp32).

What is proven: the blending is a partition of unity placed right (a function that looks at each pixel alone gives
the untiled result to 1e-6 through any tiling); one tile covering the input gives the untiled result exactly;
slicing gives the batch result to 1e-6; on a tiny random VAE tiled decode/encode stay within the stated tolerance
of the untiled result, and closer to it than diffusers' own tiling on the same weights.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from latentdiff.errors import ConfigError, InputError
from latentdiff.models.autoencoder_kl import AutoencoderKL
from latentdiff.models.identity import IdentityFirstStage, IdentityFirstStageConfig
from latentdiff.models.unet2d import UNet2D, UNet2DConfig
from latentdiff.models.vae_tiling import TileSettings, is_out_of_memory, ramp_weights, tile_starts, tiled_map
from latentdiff.pipelines.denoising import DenoisingPipeline
from tests._support.first_stage import make_pair, tiny_config
from tests._support.parity import assert_parity, max_rel_error

# Measured on the tiny VAE below (f = 4, widths 8/16/16, 4 GroupNorm groups, random weights; seeds 0-2),
# 32x24 latents in tiles of 16 latent pixels (64 px) overlapping by 4: max relative error of tiled against
# untiled 0.19-0.24 for decode and 0.13-0.15 for the encoder's moments (mean relative error 0.15-0.22 and
# 0.07-0.08); diffusers' tiling on the same weights: 0.36-0.50 and 0.30-0.35. Tiles that see half the image
# change the GroupNorm statistics and the global mid-block attention; larger tiles change less (see docs/memory.md).
DECODE_TOLERANCE = 0.3
ENCODE_TOLERANCE = 0.2


@pytest.fixture(scope="module")
def pair():
    return make_pair(tiny_config(levels=3), seed=0)  # (ours, diffusers'), f = 4


@pytest.fixture
def vae(pair):
    return copy.deepcopy(pair[0])


def latents(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---- the algorithm ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,tile,overlap", [(8, 8, 2), (9, 8, 2), (32, 16, 4), (33, 16, 4), (50, 16, 8),
                                               (40, 16, 0), (100, 7, 3)])
def test_tile_starts_cover_the_axis_with_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, size) == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))  # overlap at least `overlap`
    assert all(b > a for a, b in zip(starts, starts[1:], strict=False))
    # the fewest tiles: one less could not cover the axis with that overlap
    assert (len(starts) - 2) * (tile - overlap) + tile < size or len(starts) == 1


def test_two_tile_ramps_sum_to_one_over_the_overlap():
    starts = tile_starts(24, 16, 8)
    w0, w1 = ramp_weights(starts, 16, 2, like=torch.zeros(0))
    overlap = (starts[0] + 16 - starts[1]) * 2
    total = torch.zeros(48)
    total[:32] += w0
    total[starts[1] * 2:] += w1
    torch.testing.assert_close(total, torch.ones(48), rtol=0, atol=1e-6)
    assert (w0[-overlap:].diff() < 0).all() and (w1[:overlap].diff() > 0).all()  # linear ramps, no step


def pointwise_decoder(factor):
    """A decoder that looks at each latent pixel alone: any tile gives exactly the untiled crop."""
    weight = latents(3, 4, 1, 1, seed=5)
    return lambda z: F.interpolate(F.conv2d(z, weight), scale_factor=factor, mode="nearest")


@pytest.mark.parametrize("shape,tile,overlap", [((2, 4, 20, 13), 8, 2), ((1, 4, 31, 40), 8, 4), ((1, 4, 16, 16), 8, 0),
                                                ((1, 4, 23, 9), 5, 2)])
def test_a_pointwise_decoder_is_unchanged_by_tiling(shape, tile, overlap):
    """Proves the weights sum to 1 at every pixel and each tile lands where it came from (3-way overlaps too)."""
    decode, z = pointwise_decoder(4), latents(*shape)
    assert_parity(tiled_map(decode, z, tile=tile, overlap=overlap, out_scale=4), decode(z), tol=1e-6)


def test_a_blockwise_encoder_is_unchanged_by_tiling():
    weight = latents(8, 3, 1, 1, seed=6)
    encode = lambda x: F.avg_pool2d(F.conv2d(x, weight), 4)  # noqa: E731  looks at each 4x4 block alone
    x = latents(2, 3, 4 * 19, 4 * 26)
    assert_parity(tiled_map(encode, x, tile=8, overlap=3, in_scale=4), encode(x), tol=1e-6)


def test_one_tile_covering_the_input_is_exact(vae):
    z = latents(2, 4, 12, 10)
    with torch.no_grad():
        expected = vae.decode(z)
        assert torch.equal(tiled_map(vae.decode, z, tile=12, overlap=3, out_scale=4), expected)
        vae.enable_tiling(tile_sample_size=48)  # 12 latent pixels: the whole latent
        assert torch.equal(vae.decode(z), expected)
        x = latents(2, 3, 48, 40)
        assert torch.equal(vae.encode(x).moments, (vae.disable_tiling(), vae.encode(x).moments)[1])


# ---- AutoencoderKL.enable_tiling / enable_slicing --------------------------------------------------------------
def test_tiled_decode_is_within_the_stated_tolerance_and_closer_than_diffusers(pair, vae):
    theirs = copy.deepcopy(pair[1])
    z = latents(2, 4, 32, 24)
    with torch.no_grad():
        expected = vae.decode(z)
        vae.enable_tiling(tile_sample_size=64, overlap=0.25)
        tiled = vae.decode(z)
        theirs.enable_tiling()
        theirs.tile_sample_min_size, theirs.tile_latent_min_size = 64, 16
        theirs_tiled = theirs.decode(z).sample
    assert tiled.shape == expected.shape
    error = max_rel_error(tiled, expected)
    assert 1e-3 < error <= DECODE_TOLERANCE  # > 1e-3: the tiles really were used
    assert error < max_rel_error(theirs_tiled, expected)


def test_tiled_encode_is_within_the_stated_tolerance_and_closer_than_diffusers(pair, vae):
    theirs = copy.deepcopy(pair[1])
    x = latents(2, 3, 128, 96).tanh()
    with torch.no_grad():
        expected = vae.encode(x).moments
        vae.enable_tiling(tile_sample_size=64, overlap=0.25)
        tiled = vae.encode(x).moments
        theirs.enable_tiling()
        theirs.tile_sample_min_size, theirs.tile_latent_min_size = 64, 16
        theirs_tiled = theirs.encode(x).latent_dist.parameters
    error = max_rel_error(tiled, expected)
    assert 1e-3 < error <= ENCODE_TOLERANCE
    assert error < max_rel_error(theirs_tiled, expected)


# Batch 1 and batch 3 take different convolution kernels: 1.7e-6 measured in fp32 (rounding of ~30 layers);
# in float64 the same comparison shows the results are equal up to rounding, not merely close.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_slicing_gives_the_batch_result(vae, dtype, tol):
    vae = vae.to(dtype)
    z, x = latents(3, 4, 8, 6).to(dtype), latents(3, 3, 32, 24).tanh().to(dtype)
    with torch.no_grad():
        decoded, moments = vae.decode(z), vae.encode(x).moments
        vae.enable_slicing()
        assert_parity(vae.decode(z), decoded, tol=tol)
        assert_parity(vae.encode(x).moments, moments, tol=tol)
        vae.enable_tiling(tile_sample_size=16)  # both: each sample in tiles, as tiling alone
        sliced_tiled = vae.decode(z)
        vae.disable_slicing()
        assert_parity(sliced_tiled, vae.decode(z), tol=tol)


def test_calls_go_through_the_tiles(vae, monkeypatch):
    """The decoder sees tiles of the configured size, not the whole latent; slicing gives it one sample."""
    seen = []
    original = vae._decode
    monkeypatch.setattr(vae, "_decode", lambda z: seen.append(tuple(z.shape)) or original(z))
    vae.enable_tiling(tile_sample_size=32, overlap=0.25)  # 8 latent pixels, overlap 2
    vae.enable_slicing()
    with torch.no_grad():
        vae.decode(latents(2, 4, 8, 14))
    assert seen == [(1, 4, 8, 8)] * 4  # two samples x two tiles (starts 0 and 6)


@pytest.mark.parametrize("options,where", [(dict(tile_sample_size=30), "tile_sample_size"),
                                           (dict(tile_sample_size=0), "tile_sample_size"),
                                           (dict(tile_sample_size=True), "tile_sample_size"),
                                           (dict(overlap=0.6), "overlap"), (dict(overlap=-0.1), "overlap")])
def test_bad_tiling_options_are_refused(vae, options, where):
    with pytest.raises(InputError) as info:
        vae.enable_tiling(**options)
    assert info.value.where == where
    assert vae.tiling is None


def test_tiling_is_off_by_default_and_not_saved(vae, tmp_path):
    assert vae.tiling is None and vae.slicing is False
    vae.enable_tiling()
    vae.save_pretrained(tmp_path / "vae")
    assert AutoencoderKL.from_pretrained(tmp_path / "vae").tiling is None


# ---- the pipeline's decode: pass-throughs and safety nets ------------------------------------------------------
def pipeline(vae) -> DenoisingPipeline:
    unet = UNet2D(UNet2DConfig(in_channels=vae.latent_channels, out_channels=vae.latent_channels, channels=(8,),
                               attention_levels=(False,), layers_per_level=1, norm_num_groups=4,
                               attention_head_dim=None, mid_block=False))
    return DenoisingPipeline(vae=vae, unet=unet)


def test_pipeline_passes_tiling_and_slicing_to_the_vae(vae):
    pipe = pipeline(vae)
    pipe.enable_vae_tiling(tile_sample_size=32, overlap=0.5)
    pipe.enable_vae_slicing()
    assert vae.tiling == TileSettings(tile_sample_size=32, overlap=0.5) and vae.slicing
    pipe.disable_vae_tiling()
    pipe.disable_vae_slicing()
    assert vae.tiling is None and not vae.slicing


def test_a_first_stage_without_tiling_is_named():
    pipe = pipeline(IdentityFirstStage(IdentityFirstStageConfig(channels=4)))
    with pytest.raises(ConfigError) as info:
        pipe.enable_vae_tiling()
    assert info.value.where == "vae" and info.value.found == "IdentityFirstStage"


def out_of_memory_above(vae, monkeypatch, side, error):
    """vae.decode raises `error` for latents wider than `side`, as a device would for a too-large image."""
    original = vae.decode
    calls = []

    def decode(z):
        calls.append(tuple(z.shape))
        if z.shape[-1] > side:
            raise error
        return original(z)
    monkeypatch.setattr(vae, "decode", decode)
    return calls


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 18.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")])
def test_out_of_memory_falls_back_to_tiles_with_a_warning(vae, monkeypatch, error):
    z = latents(2, 4, 16, 20)
    with torch.no_grad():
        vae.enable_tiling(tile_sample_size=32, overlap=0.25)
        vae.enable_slicing()
        expected = vae.decode_latents(z)  # what enable_tiling + enable_slicing give, with the fall-back's tiles
        vae.disable_tiling()
        vae.disable_slicing()
        pipe = pipeline(vae)
        pipe.fallback_tiling = TileSettings(tile_sample_size=32, overlap=0.25)
        calls = out_of_memory_above(vae, monkeypatch, 8, error)
        with pytest.warns(RuntimeWarning, match="out of memory"):
            images = pipe.decode(z)
    assert calls[0] == (2, 4, 16, 20) and set(calls[1:]) == {(1, 4, 8, 8)}
    assert torch.equal(images, expected)


def test_other_errors_and_an_already_tiling_vae_are_not_retried(vae, monkeypatch):
    pipe = pipeline(vae)
    out_of_memory_above(vae, monkeypatch, 8, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"), torch.no_grad():
        pipe.decode(latents(1, 4, 16, 16))
    monkeypatch.undo()
    vae.enable_tiling(tile_sample_size=32)
    out_of_memory_above(vae, monkeypatch, 8, torch.OutOfMemoryError("out of memory"))
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        pipe.decode(latents(1, 4, 16, 16))


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("expected scalar type Float"))
    assert not is_out_of_memory(ValueError("out of memory"))


def overflow_in_fp16(module, inputs, output):
    """A forward hook: what fp16 overflow does (values past 65504 become inf); fp32 passes untouched."""
    return output * float("inf") if output.dtype == torch.float16 else None


def test_fp16_nan_is_redone_in_fp32_with_a_warning(vae):
    vae = vae.half()
    vae.decoder.up_blocks[0].resnets[0].register_forward_hook(overflow_in_fp16)
    pipe, z = pipeline(vae), latents(2, 4, 8, 6)
    with torch.inference_mode():  # as inside every pipeline's __call__
        assert not torch.isfinite(vae.decode_latents(z.half())).all()  # the hook does break fp16
        with pytest.warns(RuntimeWarning, match="NaN/Inf"):
            images = pipe.decode(z)
        expected = copy.deepcopy(vae).float().decode_latents(z)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert torch.equal(images, expected)
    assert vae.dtype == torch.float16  # cast back after the redo


def test_the_vae_is_cast_back_when_the_fp32_redo_fails(vae):
    def fail_in_fp32(module, inputs, output):
        if output.dtype == torch.float32:
            raise RuntimeError("fp32 failure")
        return output * float("inf")
    vae = vae.half()
    vae.decoder.conv_out.register_forward_hook(fail_in_fp32)
    with torch.inference_mode(), pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="fp32 failure"):
        pipeline(vae).decode(latents(1, 4, 8, 6))
    assert vae.dtype == torch.float16


def test_fp16_decode_that_is_finite_is_not_redone(vae, recwarn):
    pipe, z = pipeline(vae.half()), latents(1, 4, 8, 6)
    with torch.inference_mode():
        images = pipe.decode(z)
    assert images.dtype == torch.float16 and torch.isfinite(images).all()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_unscaled_decode_goes_through_the_same_path(vae):
    pipe, z = pipeline(vae), latents(1, 4, 8, 6)
    with torch.no_grad():
        assert torch.equal(pipe.decode_first_stage(z, scaled=False), vae.decode(z))
        assert torch.equal(pipe.decode(z), vae.decode_latents(z))
