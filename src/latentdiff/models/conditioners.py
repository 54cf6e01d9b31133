"""Conditioning encoders of the LDM family that are not text encoders (Rombach et al. 2022, sec. 3.3).

- `ClassEmbedder`: a class label -> one context token for cross-attention (the ImageNet cin256 model).
- `SpatialRescaler`: a spatial map (one-hot segmentation, low-resolution image) resized to the latent
  grid, optionally mapped to other channels by a 1x1 conv, for concatenation conditioning.

Parameter names follow the original `cond_stage_model.*` layout after its prefix (`embedding.weight`,
`channel_mapper.weight`), so the convert tables map them with a plain prefix.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ComponentConfig
from ..errors import ConfigError, InputError
from ..registry import COMPONENTS
from .base import ModelMixin


@dataclasses.dataclass(frozen=True)
class ClassEmbedderConfig(ComponentConfig):
    num_classes: int = 1000          # rows of the table (cin256-v2: 1001, the last one the null class)
    embed_dim: int = 512             # = the UNet's cross_attention_dim
    null_class: int | None = None    # label used for the unconditional half of classifier-free guidance

    def validate(self) -> None:
        if self.num_classes < 1 or self.embed_dim < 1:
            raise ConfigError("num_classes and embed_dim must be positive", where="num_classes/embed_dim",
                              found=(self.num_classes, self.embed_dim))
        if self.null_class is not None and not 0 <= self.null_class < self.num_classes:
            raise ConfigError("null_class must be a row of the table", where="null_class",
                              expected=f"0 <= null_class < {self.num_classes}", found=self.null_class)


@COMPONENTS.register("class_embedder")
class ClassEmbedder(ModelMixin[ClassEmbedderConfig]):
    """class_labels: (B,) int -> context (B, 1, embed_dim)."""

    config_class = ClassEmbedderConfig

    def __init__(self, config: ClassEmbedderConfig):
        super().__init__(config)
        self.embedding = nn.Embedding(config.num_classes, config.embed_dim)

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(class_labels)[:, None, :]

    def check_labels(self, class_labels: torch.Tensor, *, where: str = "class_labels") -> None:
        """An InputError before any work for labels outside the table (a host sync: call it once per run)."""
        if class_labels.dtype not in (torch.int32, torch.int64) or class_labels.dim() != 1:
            raise InputError("class labels must be a 1-D integer tensor", where=where,
                             expected="(B,) int64", found=f"{tuple(class_labels.shape)} {class_labels.dtype}")
        low, high = int(class_labels.min()), int(class_labels.max())
        if low < 0 or high >= self.config.num_classes:
            raise InputError("class id out of range", where=where,
                             expected=f"0 <= id < {self.config.num_classes}", found=low if low < 0 else high)


@dataclasses.dataclass(frozen=True)
class SpatialRescalerConfig(ComponentConfig):
    n_stages: int = 1
    method: Literal["nearest", "linear", "bilinear", "trilinear", "bicubic", "area"] = "bilinear"
    multiplier: float = 0.5          # scale per stage
    in_channels: int = 3
    out_channels: int | None = None  # None: keep the channels (no 1x1 conv)
    bias: bool = False

    def validate(self) -> None:
        if self.n_stages < 0 or self.multiplier <= 0:
            raise ConfigError("n_stages must be >= 0 and multiplier > 0", where="n_stages/multiplier",
                              found=(self.n_stages, self.multiplier))


@COMPONENTS.register("spatial_rescaler")
class SpatialRescaler(ModelMixin[SpatialRescalerConfig]):
    """x: (B, in_channels, H, W) -> (B, out_channels or in_channels, H * m^n, W * m^n)."""

    config_class = SpatialRescalerConfig

    def __init__(self, config: SpatialRescalerConfig):
        super().__init__(config)
        self.channel_mapper = (nn.Conv2d(config.in_channels, config.out_channels, 1, bias=config.bias)
                               if config.out_channels is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.config.n_stages):
            x = F.interpolate(x, scale_factor=self.config.multiplier, mode=self.config.method)
        return self.channel_mapper(x) if self.channel_mapper is not None else x
