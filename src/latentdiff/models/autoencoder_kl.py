"""The KL-regularised autoencoder: LDM's first stage (Rombach et al. 2022, sec. 3.1 and app. G).

The encoder maps an image x (B, 3, H, W) in [-1, 1] to the moments of a diagonal Gaussian posterior
q(z|x) over latents z (B, C, H/f, W/f); a slight KL penalty towards N(0, I) keeps the latent space
from drifting. The decoder maps z back to an image. Diffusion runs on z scaled by `scaling_factor`
(sec. 4.3.2: roughly unit variance); `encode`/`decode` work on unscaled latents, like diffusers, and
`encode_latents`/`decode_latents` apply the scaling for pipelines and training.

kl-f16 and kl-f32 add self-attention inside some levels (`attention_levels`); see autoencoder_parts.
"""
from __future__ import annotations

import dataclasses
import math
from functools import cached_property
from typing import Any

import torch
from torch import nn

from ..config import ComponentConfig
from ..errors import ConfigError, InputError
from ..registry import COMPONENTS
from .autoencoder_parts import Decoder, Encoder, FirstStage, Generator, validate_first_stage
from .diffusers_tables import AUTOENCODER_KL
from .vae_tiling import TilingMixin


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(ComponentConfig):
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level; downsampling f = 2^(levels - 1)
    layers_per_level: int = 2                         # resnets per encoder level (the decoder has one more)
    attention_levels: tuple[bool, ...] | None = None  # self-attention in level i (None: only in the mid block)
    norm_num_groups: int = 32
    sample_size: int | None = 512                     # training image size; informative only
    scaling_factor: float = 0.18215                   # 1 / std of the latents (LDM sec. 4.3.2)
    shift_factor: float | None = None                 # subtracted before scaling (SD3-style VAEs)
    latents_mean: tuple[float, ...] | None = None     # per-channel mean / std used instead of a shift
    latents_std: tuple[float, ...] | None = None      # (SDXL-style pipelines, e.g. Playground v2.5)
    mid_block_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    force_upcast: bool = True                         # kept so a saved config round-trips; pipelines decide

    def validate(self) -> None:
        validate_first_stage(self, _bad)
        if self.shift_factor is not None and not math.isfinite(self.shift_factor):
            _bad("shift_factor", "a finite number or None", self.shift_factor)
        if (self.latents_mean is None) != (self.latents_std is None):
            _bad("latents_std" if self.latents_std is None else "latents_mean",
                 "latents_mean and latents_std both set or both None", (self.latents_mean, self.latents_std))
        if self.latents_mean is not None:
            if self.shift_factor is not None:
                _bad("shift_factor", "None when latents_mean/latents_std are set (they replace the shift)",
                     self.shift_factor)
            for name in ("latents_mean", "latents_std"):
                if len(getattr(self, name)) != self.latent_channels:
                    _bad(name, f"{self.latent_channels} values (one per latent channel)", getattr(self, name))
            if self.latents_std is not None and not all(math.isfinite(s) and s > 0 for s in self.latents_std):
                _bad("latents_std", "finite positive values", self.latents_std)


def _bad(field: str, expected: str, found: Any) -> None:
    raise ConfigError(f"invalid AutoencoderKLConfig field {field!r}", where=field, expected=expected, found=repr(found))


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) the encoder predicts.

    moments: (B, 2C, h, w), the mean in the first C channels and the log-variance in the last C.
    """

    def __init__(self, moments: torch.Tensor):
        if moments.ndim != 4 or moments.shape[1] % 2:
            raise InputError("posterior moments must be (B, 2C, h, w)", where="DiagonalGaussian(moments)",
                             expected="4 dims with an even channel count", found=tuple(moments.shape))
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamped as in the original, so exp() can neither overflow nor reach an exact zero variance.
        self.logvar = logvar.clamp(-30.0, 20.0)

    @cached_property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @cached_property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """z = mean + std * eps (reparameterisation), eps ~ N(0, I) drawn from `generator`. -> (B, C, h, w)"""
        return self.mean + self.std * _noise_like(self.mean, generator)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || other), other = N(0, I) when None; summed over C, h, w as in LDM. -> (B,)"""
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=(1, 2, 3))

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """-log q(sample), summed over `dims`. sample: (B, C, h, w) -> (B,)"""
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=dims)


def _noise_like(like: torch.Tensor, generator: Generator) -> torch.Tensor:
    """N(0, I) noise shaped like `like`, drawn on the generator's device and moved, so a seed gives the same
    noise on CPU and GPU. One generator draws the whole batch at once (as diffusers does); a list gives
    one generator per sample."""
    if generator is None:
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)
    if isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)
    if len(generator) != like.shape[0]:
        raise InputError("one generator per sample is needed", where="generator",
                         expected=f"a list of {like.shape[0]} generators", found=f"a list of {len(generator)}")
    return torch.cat([torch.randn((1, *like.shape[1:]), generator=g, dtype=like.dtype, device=g.device)
                      .to(like.device) for g in generator])


@COMPONENTS.register("autoencoder_kl")
class AutoencoderKL(TilingMixin, FirstStage[AutoencoderKLConfig]):
    """Image (B, in_channels, H, W) <-> posterior over latents (B, latent_channels, H/f, W/f).

    Parameter names are those of diffusers' AutoencoderKL, so its checkpoints load with no key map.
    `enable_tiling()` / `enable_slicing()` (vae_tiling.TilingMixin) bound the memory of large images and batches.
    """

    config_class = AutoencoderKLConfig
    diffusers_class_name = "AutoencoderKL"
    diffusers_config = AUTOENCODER_KL

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__(config)
        c = config
        self.encoder = Encoder(in_channels=c.in_channels, z_channels=c.latent_channels, channels=c.channels,
                               layers_per_level=c.layers_per_level, groups=c.norm_num_groups,
                               mid_block_attention=c.mid_block_attention, double_z=True,
                               attention_levels=c.attention_levels)
        self.decoder = Decoder(z_channels=c.latent_channels, out_channels=c.out_channels, channels=c.channels,
                               layers_per_level=c.layers_per_level, groups=c.norm_num_groups,
                               mid_block_attention=c.mid_block_attention, attention_levels=c.attention_levels)
        # 1x1 convs between the encoder/decoder and the latent (the original's quant_conv naming).
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the diffusion model sees (the same attribute on every first stage)."""
        return self.config.latent_channels

    # ---- the autoencoder ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) in [-1, 1], H and W multiples of f -> posterior q(z|x).

        The posterior is over unscaled latents (B, latent_channels, H/f, W/f).
        """
        self.check_image(x)
        return DiagonalGaussian(self.run_encode(self._moments, x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, latent_channels, h, w), unscaled -> image (B, out_channels, h*f, w*f), roughly in [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise InputError("latents have the wrong shape", where=f"{type(self).__name__}.decode(z)",
                             expected=f"(B, {self.config.latent_channels}, h, w)", found=tuple(z.shape))
        return self.run_decode(self._decode, z)

    # The plain paths, which `run_encode` / `run_decode` (vae_tiling.TilingMixin) call on the whole input, on
    # one sample at a time (enable_slicing) or on overlapping tiles (enable_tiling).
    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, H, W) -> posterior moments (B, 2 * latent_channels, H/f, W/f)."""
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, *, sample_posterior: bool = False, generator: Generator = None) -> torch.Tensor:
        """Reconstruction: decode a sample (or the mode) of q(z|x). x: (B, in_channels, H, W) -> same shape."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    # ---- scaled latents, the diffusion model's space --------------------------------------------
    def encode_latents(self, x: torch.Tensor, *, generator: Generator = None, sample: bool = True) -> torch.Tensor:
        """Image x (B, in_channels, H, W) -> scaled latent (B, latent_channels, H/f, W/f) for diffusion.

        Draws z ~ q(z|x) (sample=True, as LDM trains) or takes its mode, then applies `scale_latents`.
        """
        posterior = self.encode(x)
        return self.scale_latents(posterior.sample(generator) if sample else posterior.mode())

    def scale_latents(self, latent: torch.Tensor) -> torch.Tensor:
        """Autoencoder latent -> diffusion latent: (latent - shift) * scaling_factor, or with per-channel
        statistics (latent - latents_mean) * scaling_factor / latents_std."""
        c = self.config
        if c.latents_mean is not None:
            mean, std = self._latent_statistics(latent)
            return (latent - mean) * c.scaling_factor / std
        if c.shift_factor is not None:
            latent = latent - c.shift_factor
        return latent * c.scaling_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `scale_latents`: z / scaling_factor + shift, or with per-channel statistics
        z * latents_std / scaling_factor + latents_mean."""
        c = self.config
        if c.latents_mean is not None:
            mean, std = self._latent_statistics(z)
            return z * std / c.scaling_factor + mean
        z = z / c.scaling_factor
        return z + c.shift_factor if c.shift_factor is not None else z

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents_mean and latents_std as (1, C, 1, 1) tensors on `like`'s device and dtype."""
        c = self.config
        mean = torch.tensor(c.latents_mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(c.latents_std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return mean, std
