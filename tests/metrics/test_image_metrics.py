"""PSNR and SSIM against scikit-image (the reference implementation used for evaluation), per image."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import metrics as skimage_metrics  # in the `test` extra

from latentdiff.errors import InputError
from latentdiff.metrics.image import psnr, ssim
from tests._support.parity import assert_parity

# The evaluation setting latentdiff's default reproduces (Wang et al. 2004's window and constants).
EVAL = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def sk_ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float, **options) -> torch.Tensor:
    """scikit-image per image; (B, C, H, W) -> (B,), channels last as it expects."""
    return torch.tensor([skimage_metrics.structural_similarity(
        a.permute(1, 2, 0).double().numpy(), b.permute(1, 2, 0).double().numpy(), data_range=data_range,
        channel_axis=-1, **options) for a, b in zip(x, y, strict=False)])


def sk_psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float) -> torch.Tensor:
    return torch.tensor([skimage_metrics.peak_signal_noise_ratio(a.double().numpy(), b.double().numpy(),
                                                                 data_range=data_range)
                         for a, b in zip(x, y, strict=False)])


def random_pair(seed: int, shape=(3, 3, 37, 29), noise: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    return x, (x + noise * torch.randn(shape, generator=g)).clamp(0, 1)


def structured_pair(size: int = 48):
    """Gradients, a checkerboard, a disc and a sinusoid; the second batch blurred, shifted, noised, contrast-changed."""
    v, u = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    checker = ((torch.arange(size)[:, None] // 6 + torch.arange(size)[None] // 6) % 2).float()
    disc = (((u - 0.5) ** 2 + (v - 0.4) ** 2) < 0.09).float()
    wave = 0.5 + 0.5 * torch.sin(12 * u + 5 * v)
    x = torch.stack([torch.stack([u, v, u * v]), torch.stack([checker, disc, wave]),
                     torch.stack([disc, wave, checker])])
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    y = torch.stack([blurred[0], x[1].roll(2, dims=-1),
                     (0.6 * x[2] + 0.2 + 0.05 * torch.randn(x[2].shape, generator=torch.Generator().manual_seed(0)))])
    return x, y.clamp(0, 1)


@pytest.mark.parametrize("pair", ["random", "structured"])
@pytest.mark.parametrize("options", [{}, {"gaussian_weights": False}, {"gaussian_weights": False, "win_size": 5,
                                                                         "use_sample_covariance": True},
                                     {"sigma": 1.0, "use_sample_covariance": True}])
def test_ssim_matches_scikit_image(pair, options):
    x, y = random_pair(0) if pair == "random" else structured_pair()
    sk_options = {**EVAL, **options}
    if not sk_options["gaussian_weights"]:
        sk_options.pop("sigma")
        sk_options.setdefault("win_size", 7)
    expected = sk_ssim(x, y, data_range=1.0, **sk_options)
    actual = ssim(x, y, data_range=1.0, **options)
    assert actual.shape == (3,) and actual.dtype == torch.float32
    assert_parity(actual, expected, tol=1e-4)
    assert (actual - expected).abs().max() < 1e-4


def test_ssim_data_range_grayscale_float64_and_uint8_scale():
    x, y = random_pair(1, shape=(2, 1, 23, 40), noise=0.3)
    expected = sk_ssim(x * 255, y * 255, data_range=255.0, **EVAL)
    actual = ssim((x * 255).double(), (y * 255).double(), data_range=255.0)
    assert actual.dtype == torch.float64
    assert_parity(actual, expected, tol=1e-10)
    # [-1, 1] images: data_range 2
    assert_parity(ssim(2 * x - 1, 2 * y - 1, data_range=2.0), sk_ssim(2 * x - 1, 2 * y - 1, data_range=2.0, **EVAL))


def test_ssim_identity_and_unrelated():
    x, _ = random_pair(2)
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    unrelated, _ = random_pair(3)
    assert (ssim(x, unrelated) < 0.1).all()


@pytest.mark.parametrize("pair", ["random", "structured"])
def test_psnr_matches_scikit_image(pair):
    x, y = random_pair(4) if pair == "random" else structured_pair()
    assert_parity(psnr(x, y), sk_psnr(x, y, data_range=1.0), tol=1e-5)
    assert_parity(psnr(x * 2 - 1, y * 2 - 1, data_range=2.0), sk_psnr(x * 2 - 1, y * 2 - 1, data_range=2.0), tol=1e-5)


def test_psnr_known_noise_level_and_identity():
    x = torch.zeros(2, 3, 8, 8)
    y = x + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)  # MSE 1e-2 and 1e-4: 20 dB and 40 dB
    torch.testing.assert_close(psnr(x, y), torch.tensor([20.0, 40.0]))
    assert math.isinf(psnr(x, x)[0].item())


def test_bad_inputs():
    x, y = random_pair(5)
    with pytest.raises(InputError):
        ssim(x, y[:, :2])
    with pytest.raises(InputError):
        psnr(x[0], y[0])
    with pytest.raises(InputError, match="smaller than the SSIM window"):
        ssim(x[..., :10, :10], y[..., :10, :10])
    with pytest.raises(InputError, match="win_size"):
        ssim(x, y, win_size=7)
    with pytest.raises(InputError, match="odd"):
        ssim(x, y, gaussian_weights=False, win_size=6)
    np.testing.assert_array_less(0, ssim(x[..., :11, :11], y[..., :11, :11]).numpy())  # 11 x 11 is enough
