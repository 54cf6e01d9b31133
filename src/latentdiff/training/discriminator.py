"""The patch discriminator of the first-stage GAN loss, and the two discriminator objectives.

A PatchGAN (pix2pix, Isola et al. 2017) as taming-transformers and LDM use it: strided 4x4 convs with
LeakyReLU(0.2) give a map of logits, one per overlapping receptive-field patch (70x70 pixels for
n_layers=3), so the generator is judged on local texture rather than on the whole image. Parameter
names (`main.N.*`) follow the original, so the `loss.discriminator.*` weights of an LDM checkpoint load
as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.2
KERNEL = 4
MAX_WIDTH_MULT = 8  # widths double per layer up to 8 * ndf


class ActNorm(nn.Module):
    """Per-channel affine y = scale * (x + loc) with data-dependent initialisation (Kingma & Dhariwal 2018):
    the first training batch sets loc = -mean and scale = 1 / std per channel. x: (B, C, H, W)."""

    loc: nn.Parameter
    scale: nn.Parameter
    initialized: torch.Tensor                 # a uint8 buffer: 1 once the first batch set loc and scale

    def __init__(self, channels: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._initialized: bool | None = None  # host copy of the buffer: no device sync per forward

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized = None  # the buffer may have changed: read it again on the next forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self._initialized:
            if self._initialized is None:
                self._initialized = bool(self.initialized)
            if not self._initialized:
                with torch.no_grad():
                    flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1)
                    self.loc.copy_(-flat.mean(dim=1).view_as(self.loc))
                    self.scale.copy_(1.0 / (flat.std(dim=1).view_as(self.scale) + 1e-6))
                    self.initialized.fill_(1)
                self._initialized = True
        return self.scale * (x + self.loc)


def weights_init(module: nn.Module) -> None:
    """LDM's initialisation (after DCGAN): conv weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02), BN bias 0.
    Conv biases keep PyTorch's default, as in the original."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    """pix2pix's NLayerDiscriminator. x: (B, in_channels, H, W) -> logits (B, 1, h, w), one per patch.

    Layers: conv(stride 2) + LeakyReLU; n_layers - 1 x [conv(stride 2) + norm + LeakyReLU]; one
    conv(stride 1) + norm + LeakyReLU; a final conv(stride 1) to one channel. Norm is BatchNorm (its
    affine shift makes conv biases redundant, so those convs have none) or ActNorm (convs keep biases).
    """

    def __init__(self, in_channels: int = 3, *, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        bias = use_actnorm
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, KERNEL, stride=2, padding=1),
                                   nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]
        width = ndf
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1  # the last hidden layer widens the receptive field without striding
            out = ndf * min(2 ** n, MAX_WIDTH_MULT)
            layers += [nn.Conv2d(width, out, KERNEL, stride=stride, padding=1, bias=bias), norm(out),
                       nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]
            width = out
        layers.append(nn.Conv2d(width, 1, KERNEL, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss (Lim & Ye 2017): 1/2 [E relu(1 - D(x)) + E relu(1 + D(x_hat))]. -> scalar"""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The original GAN loss on logits: 1/2 [E -log sigmoid(D(x)) + E -log(1 - sigmoid(D(x_hat)))]
    = 1/2 [E softplus(-D(x)) + E softplus(D(x_hat))]. -> scalar"""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
