"""The VQ-regularised autoencoder: LDM's other first stage (Rombach et al. 2022, sec. 3.1 and app. G).

The encoder maps an image x (B, 3, H, W) in [-1, 1] to latents h (B, D, H/f, W/f); a vector-quantization
layer (van den Oord et al. 2017) "absorbed by the decoder" snaps every latent pixel to its nearest
entry of a learned codebook of `num_vq_embeddings` vectors. As in LDM, the diffusion model works on the
continuous h, before quantization, and `decode` quantizes first: `encode` returns h, `decode(h)`
quantizes and decodes (diffusers' VQModel does the same). LDM's VQ models use scaling_factor 1.0.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ComponentConfig
from ..errors import ConfigError, InputError
from ..registry import COMPONENTS
from .autoencoder_parts import Decoder, Encoder, FirstStage, Generator, validate_first_stage
from .diffusers_tables import VQ_MODEL
from .vae_tiling import TilingMixin


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantization with a straight-through gradient (VQ-VAE, van den Oord et al. 2017).

    z: (B, D, h, w) -> z_q (B, D, h, w), loss (scalar), indices (B, h, w). The codebook is
    `embedding.weight` (num_embeddings, D), named as in diffusers and the original.
    """

    def __init__(self, num_embeddings: int, embed_dim: int, *, beta: float = 0.25, legacy: bool = True):
        super().__init__()
        self.num_embeddings, self.embed_dim = num_embeddings, embed_dim
        self.beta = beta
        # legacy=True keeps the original's (taming-transformers') weighting, which puts beta on the codebook
        # term instead of the commitment term; every released LDM/diffusers VQ model was trained with it.
        self.legacy = legacy
        self.embedding = nn.Embedding(num_embeddings, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry (L2) of every latent pixel. z: (B, D, h, w) -> (B, h, w) long."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codebook = self.embedding.weight
        if flat.dtype in (torch.float16, torch.bfloat16):
            # Distances between close codes vanish in half precision: compare them in fp32.
            flat, codebook = flat.float(), codebook.float()
        # argmin_k |z - e_k|^2 = argmin_k (|e_k|^2 - 2 z.e_k): |z|^2 is the same for every k, so it is dropped.
        distances = torch.addmm(codebook.pow(2).sum(1), flat, codebook.t(), alpha=-2.0)
        return distances.argmin(dim=1).view(b, h, w)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (z_q, loss, indices). loss = beta * |sg(z_q) - z|^2 + |z_q - sg(z)|^2 (means over all elements),
        the two weights swapped when `legacy`; z_q = z + sg(z_q - z) passes the decoder's gradient to z."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise InputError("latents have the wrong shape", where="VectorQuantizer(z)",
                             expected=f"(B, {self.embed_dim}, h, w)", found=tuple(z.shape))
        indices = self.nearest(z)
        z_q = self.get_codebook_entry(indices).to(z.dtype)
        if not z.requires_grad:
            # Inference: both terms have the same value and no gradient is needed, so skip the extra ops.
            return z_q, (1.0 + self.beta) * F.mse_loss(z_q, z), indices
        commitment = F.mse_loss(z, z_q.detach())  # pulls the encoder to its code
        codebook = F.mse_loss(z_q, z.detach())    # pulls the code to the encoder
        loss = commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook
        return z + (z_q - z).detach(), loss, indices

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Codebook vectors for `indices` (B, h, w) -> (B, D, h, w).

        Flat indices (B*h*w,) need `shape` = (B, h, w, D), the original's and diffusers' convention.
        """
        if indices.is_floating_point() or indices.is_complex():
            raise InputError("codebook indices must be integers", where="get_codebook_entry(indices)",
                             expected="a long tensor", found=str(indices.dtype))
        if shape is not None:
            if len(shape) != 4 or shape[3] != self.embed_dim or indices.numel() != shape[0] * shape[1] * shape[2]:
                raise InputError("shape does not match the indices", where="get_codebook_entry(shape)",
                                 expected=f"(B, h, w, {self.embed_dim}) with B*h*w = {indices.numel()}",
                                 found=tuple(shape))
            indices = indices.reshape(shape[:3])
        if indices.ndim != 3:
            raise InputError("codebook indices must be (B, h, w), or flat with shape=", where="get_codebook_entry",
                             expected="(B, h, w)", found=tuple(indices.shape))
        return F.embedding(indices, self.embedding.weight).permute(0, 3, 1, 2).contiguous()


@dataclasses.dataclass(frozen=True)
class VQModelConfig(ComponentConfig):
    """Defaults: LDM's vq-f4 (the first stage of LDM-4 on CelebA-HQ, FFHQ, LSUN and of LDM-SR)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 3                          # encoder output width (the original's z_channels)
    channels: tuple[int, ...] = (128, 256, 512)       # width per level; downsampling f = 2^(levels - 1)
    layers_per_level: int = 2                         # resnets per encoder level (the decoder has one more)
    attention_levels: tuple[bool, ...] | None = None  # self-attention in level i (None: only in the mid block)
    num_vq_embeddings: int = 8192                     # codebook size (n_embed)
    vq_embed_dim: int | None = 3                      # codebook width (embed_dim); None: latent_channels
    norm_num_groups: int = 32
    sample_size: int | None = 256                     # training image size; informative only
    scaling_factor: float = 1.0                       # LDM trains on unscaled VQ latents
    norm_type: str = "group"                          # diffusers' "spatial" (MoVQ decoder) is not implemented
    mid_block_attention: bool = True
    lookup_from_codebook: bool = False                # decode(indices, force_not_quantize=True) looks codes up
    force_upcast: bool = False                        # kept so a saved config round-trips; pipelines decide

    def validate(self) -> None:
        validate_first_stage(self, _bad)
        if self.num_vq_embeddings < 1:
            _bad("num_vq_embeddings", "a positive integer", self.num_vq_embeddings)
        if self.vq_embed_dim is not None and self.vq_embed_dim < 1:
            _bad("vq_embed_dim", "a positive integer or None", self.vq_embed_dim)
        if self.norm_type != "group":
            _bad("norm_type", "'group' (the LDM VQ models; spatial normalization is not implemented)",
                 self.norm_type)

    @property
    def embed_dim(self) -> int:
        """Width of a codebook vector, and channels of the diffusion latent."""
        return self.vq_embed_dim if self.vq_embed_dim is not None else self.latent_channels


def _bad(field: str, expected: str, found: Any) -> None:
    raise ConfigError(f"invalid VQModelConfig field {field!r}", where=field, expected=expected, found=repr(found))


@COMPONENTS.register("vq_model")
class VQModel(TilingMixin, FirstStage[VQModelConfig]):
    """Image (B, in_channels, H, W) <-> latents (B, embed_dim, H/f, W/f), quantized before decoding.

    Parameter names are those of diffusers' VQModel (encoder., quant_conv, quantize.embedding.weight,
    post_quant_conv, decoder.), so its checkpoints load with no key map. `model.quantize(h)` is the
    quantization layer itself: h (B, embed_dim, h, w) -> (z_q, loss, indices (B, h, w)).
    """

    config_class = VQModelConfig
    diffusers_class_name = "VQModel"
    diffusers_config = VQ_MODEL

    def __init__(self, config: VQModelConfig):
        super().__init__(config)
        c = config
        common: dict[str, Any] = dict(
            channels=c.channels, layers_per_level=c.layers_per_level, groups=c.norm_num_groups,
            mid_block_attention=c.mid_block_attention, attention_levels=c.attention_levels)
        self.encoder = Encoder(in_channels=c.in_channels, z_channels=c.latent_channels, double_z=False, **common)
        self.quant_conv = nn.Conv2d(c.latent_channels, c.embed_dim, 1)
        self.quantize = VectorQuantizer(c.num_vq_embeddings, c.embed_dim, beta=0.25, legacy=True)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.latent_channels, 1)
        self.decoder = Decoder(z_channels=c.latent_channels, out_channels=c.out_channels, **common)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the diffusion model sees: the codebook width (`config.embed_dim`), which
        differs from `config.latent_channels` (the encoder's output width, diffusers' name) when vq_embed_dim is set."""
        return self.config.embed_dim

    # ---- the autoencoder ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) in [-1, 1], H and W multiples of f -> h (B, embed_dim, H/f, W/f), not quantized."""
        self.check_image(x)
        return self.run_encode(self._encode, x)

    def decode(self, h: torch.Tensor, *, force_not_quantize: bool = False) -> torch.Tensor:
        """h: (B, embed_dim, h, w), unscaled -> image (B, out_channels, h*f, w*f), roughly in [-1, 1].

        h is quantized first, unless force_not_quantize; then, with config.lookup_from_codebook, h holds
        codebook indices (B, h, w) to look up (as in diffusers), else it is decoded as it is.
        """
        if force_not_quantize and self.config.lookup_from_codebook:
            if h.ndim != 3:
                raise InputError("with lookup_from_codebook, force_not_quantize decodes codebook indices",
                                 where="VQModel.decode(h)", expected="(B, h, w) integer indices",
                                 found=tuple(h.shape))
            return self.run_decode(self._decode, self.quantize.get_codebook_entry(h))
        if h.ndim != 4 or h.shape[1] != self.config.embed_dim:
            raise InputError("latents have the wrong shape", where="VQModel.decode(h)",
                             expected=f"(B, {self.config.embed_dim}, h, w)", found=tuple(h.shape))
        # Quantization looks at each latent pixel alone, so it runs inside each tile: the same codes, and a
        # (pixels x codebook) distance matrix the size of one tile's.
        return self.run_decode(self._decode if force_not_quantize else self._quantize_and_decode, h)

    # The plain paths, which run_encode / run_decode (vae_tiling.TilingMixin) call whole, sliced or tiled.
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def _decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def _quantize_and_decode(self, h: torch.Tensor) -> torch.Tensor:
        return self._decode(self.quantize(h)[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction: x (B, in_channels, H, W) -> decode(quantize(encode(x))), the same shape."""
        return self.decode(self.encode(x))

    # ---- scaled latents, the diffusion model's space --------------------------------------------
    def encode_latents(self, x: torch.Tensor, *, generator: Generator = None, sample: bool = True) -> torch.Tensor:
        """Image x (B, in_channels, H, W) -> scaled latent h * scaling_factor (B, embed_dim, H/f, W/f).

        The VQ encoder is deterministic: `generator` and `sample` exist so that every first stage is
        called alike (AutoencoderKL draws from its posterior) and change nothing here.
        """
        return self.scale_latents(self.encode(x))

    def scale_latents(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.config.scaling_factor if self.config.scaling_factor != 1.0 else latent

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.config.scaling_factor if self.config.scaling_factor != 1.0 else z
