"""LPIPS, the learned perceptual distance (Zhang et al., CVPR 2018), VGG16 variant with the v0.1 heads.

d(x, y) = sum_l mean_hw  w_l . (n(F_l(x)) - n(F_l(y)))^2        (Zhang et al. 2018, eq. 1)

F_l are VGG16 activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of the images shifted
and scaled by the LPIPS ScalingLayer constants, n() divides each feature vector by its L2 norm over
channels, and w_l >= 0 are the learned per-channel "linear heads". The first-stage autoencoder loss
of LDM (and taming-transformers) adds this distance to the L1 reconstruction error.

Weights come as two files, both in their publishers' layouts so they load strictly with no key map:
the torchvision `vgg16` state dict (`features.N.weight/bias`, the `classifier.*` head unused here)
and the LPIPS v0.1 heads (`lin0..lin4.model.1.weight`; taming-transformers' `vgg.pth` is the same file,
md5 d507d734...). They are read from local files, or downloaded once into torch's hub cache with a
sha256 check (`remote_weights.read_state_dict`); `HF_HUB_OFFLINE=1` forbids any download. A metric, used by the first
stage's training as a loss (training.autoencoder_loss).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import cast

import torch
from torch import nn

from ..errors import InputError
from ..models.base import check_state_dict
from ..remote_weights import RemoteFile, read_state_dict

# The ScalingLayer: maps images in [-1, 1] to roughly ImageNet-normalised inputs for VGG.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision's VGG16 ("configuration D"): conv widths, "M" a 2x2 max-pool. Building `features` from it
# reproduces torchvision's module indices (conv at 0, 2, 5, ...), hence its state-dict keys.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)             # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
UNUSED_VGG_PREFIXES = ("classifier.",)  # torchvision's ImageNet classifier: LPIPS needs the conv stack only
MIN_SIZE = 16                         # four max-pools before relu5_3 must leave at least one pixel
EPS = 1e-10                           # n(f) = f / (|f| + eps), as in the reference implementation

LPIPS_VGG_V01 = RemoteFile(
    "lpips_vgg_v0.1-a78928a0.pth",
    ("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
     "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1"),  # taming-transformers' copy
    "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868")
TORCHVISION_VGG16 = RemoteFile(
    "vgg16-397923af.pth",  # the name torchvision caches it under: an existing download is reused
    ("https://download.pytorch.org/models/vgg16-397923af.pth",),
    "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0")
PUBLISHED = (LPIPS_VGG_V01, TORCHVISION_VGG16)  # a URL of either is cached under its name, sha256-checked


class VGG16Features(nn.Module):
    """torchvision's `vgg16().features` up to relu5_3. x: (B, 3, H, W) -> five taps (B, C_l, H/2^l, W/2^l)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in VGG16_LAYOUT:
            if isinstance(width, str):        # "M": a max pool
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAPS:
                taps.append(x)
        return taps


class LinearHead(nn.Module):
    """w_l: a bias-free 1x1 conv to one channel. Named `model.1` as in the official checkpoints,
    whose index 0 was a Dropout (inactive at evaluation, so absent here)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(OrderedDict([("1", nn.Conv2d(channels, 1, kernel_size=1, bias=False))]))

    @property
    def weight(self) -> torch.Tensor:
        return cast(nn.Conv2d, self.model[0]).weight     # the one layer __init__ put there


class LPIPS(nn.Module):
    """The LPIPS distance, frozen and always in eval mode; gradients flow to the images.

    `LPIPS(pretrained=True)` (same as `LPIPS.from_pretrained()`) loads the published weights;
    `pretrained=False` keeps a randomly initialised VGG with all heads w_l = 1 (the paper's unlearned
    "baseline" weighting), for tests and CPU smoke runs.
    """

    shift: torch.Tensor           # buffers (1, 3, 1, 1): the input normalisation
    scale: torch.Tensor

    def __init__(self, *, pretrained: bool):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        for i, channels in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{i}", LinearHead(channels))
        for w in self.heads:
            nn.init.ones_(w)
        self.requires_grad_(False)
        self.eval()
        if pretrained:
            self.load_weights()

    @property
    def heads(self) -> list[torch.Tensor]:
        """The five head weights w_l: (1, C_l, 1, 1)."""
        return [getattr(self, f"lin{i}").weight for i in range(len(TAP_CHANNELS))]

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode whatever the parent module asks: LPIPS is a fixed distance."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, 3, H, W) in [-1, 1], H, W >= 16 -> d(x, y): (B,)"""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape != y.shape or min(x.shape[-2:]) < MIN_SIZE:
            raise InputError("LPIPS compares two batches of RGB images of one shape", where="LPIPS(x, y)",
                             expected=f"(B, 3, H, W) twice, H and W >= {MIN_SIZE}",
                             found=f"{tuple(x.shape)} and {tuple(y.shape)}")
        # One VGG pass over both batches: half the kernel launches of two passes.
        taps = self.net((torch.cat([x, y]) - self.shift) / self.scale)
        terms = []
        for features, w in zip(taps, self.heads, strict=True):      # one head per tap (TAP_CHANNELS)
            fx, fy = (features / (features.square().sum(dim=1, keepdim=True).sqrt() + EPS)).chunk(2)
            # The 1x1 conv is linear, so averaging over space first gives the same number with a
            # C_l-vector dot product instead of a convolution over every pixel.
            terms.append((fx - fy).square().mean(dim=(2, 3)) @ w.flatten().to(fx.dtype))
        return sum(terms)

    @classmethod
    def from_pretrained(cls, path_or_url: str | os.PathLike | None = None, *,
                        vgg_path: str | os.PathLike | None = None,
                        cache_dir: str | os.PathLike | None = None) -> LPIPS:
        """LPIPS with published weights: the heads from `path_or_url` (default: the v0.1 release), the VGG
        from `vgg_path` (default: torchvision's release). Local files are safetensors or `.pth` (read with
        weights_only); a URL is downloaded into `cache_dir` (default: torch's hub cache). A file that holds
        the whole LPIPS state dict (`net.features.*` and `lin*`) needs no `vgg_path`."""
        model = cls(pretrained=False)
        return model.load_weights(path_or_url, vgg_path=vgg_path, cache_dir=cache_dir)

    def load_weights(self, path_or_url: str | os.PathLike | None = None, *,
                     vgg_path: str | os.PathLike | None = None,
                     cache_dir: str | os.PathLike | None = None) -> LPIPS:
        """Load weights in place, strictly (see `from_pretrained`); returns self."""
        state, where = read_state_dict(path_or_url, default=LPIPS_VGG_V01, cache_dir=cache_dir, known=PUBLISHED)
        if any(k.startswith("net.") for k in state):
            if vgg_path is not None:
                raise InputError("the LPIPS file already holds the VGG weights; drop vgg_path", where=where,
                                 expected="vgg_path=None", found=str(vgg_path))
        else:
            vgg, vgg_where = read_state_dict(vgg_path, default=TORCHVISION_VGG16, cache_dir=cache_dir,
                                             known=PUBLISHED)
            vgg = {k: v for k, v in vgg.items() if not k.startswith(UNUSED_VGG_PREFIXES)}
            check_state_dict(self.net, vgg, source=vgg_where)
            state = {**state, **{f"net.{k}": v for k, v in vgg.items()}}
        check_state_dict(self, state, source=where)
        self.load_state_dict(state, strict=True)
        return self
