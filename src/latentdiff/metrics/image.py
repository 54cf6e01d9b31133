"""Reconstruction fidelity: PSNR and SSIM per image, on batches of tensors (any device).

SSIM follows Wang et al. (2004) as scikit-image's `structural_similarity` computes it with the settings
used to evaluate autoencoders (LDM's first-stage tables, and most reproductions):

    structural_similarity(x, y, data_range=R, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                          use_sample_covariance=False)   # K1=0.01, K2=0.03, 11x11 window

i.e. local statistics under an 11-tap Gaussian window (sigma 1.5, truncated at 3.5 sigma), population
covariances, the SSIM map averaged over the pixels at least a window radius from the border, then over
channels. `gaussian_weights=False` gives the uniform-window variant (`win_size`, default 7).
Inputs are used as given: quantise or clip them beforehand if the protocol asks for it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError

K1, K2 = 0.01, 0.03       # stabilisers of Wang et al. (2004), eq. 7-9
TRUNCATE = 3.5            # Gaussian window radius in sigmas (gives 11 taps at sigma 1.5)
UNIFORM_WIN_SIZE = 7      # scikit-image's window for gaussian_weights=False


def psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio 10 log10(R^2 / MSE) in dB, per image. x, y: (B, C, H, W) -> (B,)

    Identical images give +inf (zero error), as in scikit-image.
    """
    _check_pair(x, y, where="psnr(x, y)")
    dtype = _float_dtype(x)
    mse = (x.to(dtype) - y.to(dtype)).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(data_range ** 2 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, gaussian_weights: bool = True,
         sigma: float = 1.5, win_size: int | None = None, use_sample_covariance: bool = False) -> torch.Tensor:
    """Mean structural similarity per image (Wang et al. 2004). x, y: (B, C, H, W) -> (B,)

    gaussian_weights=True: an 11x11 Gaussian window (sigma, truncated at 3.5 sigma; `win_size` must be
    None); False: a uniform `win_size` x `win_size` window (odd, default 7).
    """
    _check_pair(x, y, where="ssim(x, y)")
    window = _window(gaussian_weights=gaussian_weights, sigma=sigma, win_size=win_size, like=x)
    size = window.numel()
    if min(x.shape[-2:]) < size:
        raise InputError("images are smaller than the SSIM window", where="ssim(x, y)",
                         expected=f"H and W >= {size}", found=tuple(x.shape))
    b, c = x.shape[:2]
    x, y = x.to(window.dtype), y.to(window.dtype)
    # All five local statistics in one separable depthwise convolution. Without padding the output is
    # exactly the region scikit-image keeps after cropping the border, so its padding mode never matters.
    stats = _filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), window).unflatten(1, (5, c))
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.unbind(dim=1)
    cov_norm = size ** 2 / (size ** 2 - 1) if use_sample_covariance else 1.0
    var_x = cov_norm * (e_xx - mu_x * mu_x)
    var_y = cov_norm * (e_yy - mu_y * mu_y)
    cov_xy = cov_norm * (e_xy - mu_x * mu_y)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(b, -1).mean(dim=1)


def _window(*, gaussian_weights: bool, sigma: float, win_size: int | None, like: torch.Tensor) -> torch.Tensor:
    """The normalised 1D window, in float32 (float64 if the images are): (win_size,)"""
    dtype = _float_dtype(like)
    if gaussian_weights:
        if win_size is not None:
            raise InputError("with gaussian_weights the window size follows from sigma", where="win_size",
                             expected="None", found=win_size)
        if sigma <= 0:
            raise InputError("sigma must be positive", where="sigma", expected="> 0", found=sigma)
        radius = int(TRUNCATE * sigma + 0.5)  # as scipy.ndimage rounds it
        taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
        window = torch.exp(-0.5 * (taps / sigma) ** 2)
    else:
        size = UNIFORM_WIN_SIZE if win_size is None else win_size
        if size < 1 or size % 2 == 0:
            raise InputError("the SSIM window size must be a positive odd number", where="win_size",
                             expected="1, 3, 5, 7, ...", found=size)
        window = torch.ones(size, dtype=torch.float64)
    return (window / window.sum()).to(device=like.device, dtype=dtype)


def _filter(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Weighted local means, "valid" region only: (B, K, H, W) -> (B, K, H - n + 1, W - n + 1)"""
    channels, n = images.shape[1], window.numel()
    rows = window.view(1, 1, n, 1).expand(channels, 1, n, 1)
    cols = window.view(1, 1, 1, n).expand(channels, 1, 1, n)
    return F.conv2d(F.conv2d(images, rows, groups=channels), cols, groups=channels)


def _float_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_pair(x: torch.Tensor, y: torch.Tensor, *, where: str) -> None:
    if x.ndim != 4 or x.shape != y.shape:
        raise InputError("expected two image batches of one shape", where=where, expected="(B, C, H, W) twice",
                         found=f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() == 0:
        raise InputError("empty image batch", where=where, expected="B, C, H, W >= 1", found=tuple(x.shape))
