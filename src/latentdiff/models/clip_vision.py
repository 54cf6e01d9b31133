"""CLIP's vision tower with its projection (Radford et al. 2021): the image encoder of IP-Adapter.

A ViT (Dosovitskiy et al. 2021): the image cut into patch x patch squares, each a token (one strided convolution),
a learned class token in front, learned positions, a LayerNorm (`pre_layrnorm`, transformers' spelling), the same
pre-LN transformer layers as the text tower (`clip_text.CLIPEncoderLayer`, here without a causal mask), then the
class token's state through `post_layernorm` and the bias-free `visual_projection` into the joint space.

transformers' CLIPVisionModelWithProjection computes the same thing; this one exists so that running an
IP-Adapter does not import transformers. Its folder is transformers' (config.json with CLIPVisionConfig keys,
read strictly, + model.safetensors; keys `vision_model.*` + `visual_projection.weight`), as h94/IP-Adapter ships
it in `models/image_encoder/`, and it saves back to that layout.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .. import limits
from ..config import ComponentConfig
from ..errors import ConfigError, InputError, describe
from . import structure
from .base import ModelMixin
from .clip_text import FIXED_KEYS as TEXT_FIXED_KEYS
from .clip_text import MACHINERY_KEYS, UNREAD_KEYS, CLIPTextEncoder
from .diffusers_config import check_supported

MODEL_TYPE = "clip_vision_model"
ARCHITECTURE = "CLIPVisionModelWithProjection"
FILE_KEYS = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
             "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "initializer_range",
             "initializer_factor")
# Keys accepted only at the value implemented here (the text tower's, with this class's names).
FIXED_KEYS: dict[str, Any] = {**TEXT_FIXED_KEYS, "model_type": MODEL_TYPE, "architectures": ([ARCHITECTURE], None)}
POSITION_IDS_KEY = "vision_model.embeddings.position_ids"   # transformers < 4.31 saved this buffer


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(ComponentConfig):
    """Defaults: transformers' CLIPVisionConfig (ViT-B/32). IP-Adapter SD 1.5: OpenCLIP ViT-H/14 (1280 wide, 32
    layers, 16 heads, patch 14, projection 1024, gelu)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224                   # the input side the positions are learned for
    patch_size: int = 32
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02         # init settings: kept for the file only
    initializer_factor: float = 1.0

    def validate(self) -> None:
        for name in ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                     "num_attention_heads", "num_channels", "image_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive", where=name, expected=">= 1", found=getattr(self, name))
        structure.check_counts([("hidden_size", self.hidden_size, limits.MAX_CHANNELS),
                                ("intermediate_size", self.intermediate_size, 4 * limits.MAX_CHANNELS),
                                ("num_hidden_layers", self.num_hidden_layers, limits.MAX_TEXT_LAYERS),
                                ("num_attention_heads", self.num_attention_heads, limits.MAX_HEADS),
                                ("projection_dim", self.projection_dim, limits.MAX_CHANNELS),
                                ("image_size", self.image_size, limits.MAX_SIDE)])
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must split evenly into the attention heads", where="num_attention_heads",
                              expected=f"a divisor of hidden_size {self.hidden_size}", found=self.num_attention_heads)
        if self.image_size % self.patch_size:
            raise ConfigError("the image must split into whole patches", where="patch_size",
                              expected=f"a divisor of image_size {self.image_size}", found=self.patch_size)

    @property
    def positions(self) -> int:
        """The class token and one token per patch."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass
class CLIPVisionOutput:
    """What transformers' CLIPVisionModelOutput holds: image_embeds (B, projection_dim); last_hidden_state (B, P, D)
    (no final norm: CLIP norms the class token only); hidden_states: None, or the embeddings after pre_layrnorm then
    every layer's output (num_hidden_layers + 1), with output_hidden_states=True. out[0] is image_embeds."""

    image_embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, index: int | str) -> Any:
        if isinstance(index, str):
            return getattr(self, index)
        values = (self.image_embeds, self.last_hidden_state, self.hidden_states)
        return tuple(v for v in values if v is not None)[index]


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, 1 + (S/p)^2, D): the class token, then the patches row by row, plus positions."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTower(nn.Module):
    """`vision_model` in transformers' names: embeddings, pre_layrnorm, encoder.layers, post_layernorm."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPTextEncoder(config, causal=False)   # the text tower's layers, every patch seeing all
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPVisionModelWithProjection(ModelMixin[CLIPVisionConfig]):
    """pixel_values (B, C, image_size, image_size), normalised as CLIP's processor does -> CLIPVisionOutput.

        encoder = CLIPVisionModelWithProjection.from_pretrained("h94/IP-Adapter", subfolder="models/image_encoder")
        out = encoder(pixels, output_hidden_states=True)
        out.image_embeds, out.hidden_states[-2]      # plain IP-Adapter's input, plus's input
    """

    config_class = CLIPVisionConfig
    weights_name = "model"   # transformers' file name: model.safetensors

    def __init__(self, config: CLIPVisionConfig):
        super().__init__(config)
        self.vision_model = CLIPVisionTower(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        self.check_pixels(pixel_values)
        tower = self.vision_model
        x = tower.pre_layrnorm(tower.embeddings(pixel_values))
        hidden = [x] if output_hidden_states else None
        for layer in tower.encoder.layers:
            x = layer(x, None)
            if hidden is not None:
                hidden.append(x)
        pooled = tower.post_layernorm(x[:, 0])
        return CLIPVisionOutput(image_embeds=self.visual_projection(pooled), last_hidden_state=x,
                                hidden_states=tuple(hidden) if hidden is not None else None)

    def check_pixels(self, pixel_values: Any) -> None:
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 \
                or tuple(pixel_values.shape[1:]) != want or not pixel_values.is_floating_point():
            raise InputError("pixel_values must be CLIP-preprocessed images of the encoder's size",
                             where="pixel_values", expected=f"a float tensor (B, {', '.join(map(str, want))})",
                             found=describe(pixel_values))

    # ---- transformers' folder ---------------------------------------------------------------------
    @classmethod
    def from_file_config(cls, data: Mapping[str, Any], *, source: str | None = None) -> CLIPVisionConfig:
        known = set(FILE_KEYS) | set(FIXED_KEYS) | MACHINERY_KEYS | UNREAD_KEYS
        unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in a CLIP vision model config", where=source,
                              expected=f"keys among {sorted(known)}", found=unknown)
        check_supported(data, FIXED_KEYS, source=source)
        try:
            return CLIPVisionConfig(**{key: data[key] for key in FILE_KEYS if key in data})
        except ConfigError as e:
            raise ConfigError(e.message, where=f"{source}: {e.where}" if source else e.where, expected=e.expected,
                              found=e.found) from None

    def to_file_config(self) -> dict[str, Any]:
        return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "attention_dropout": 0.0,
                **self.config.to_dict()}

    def file_config(self) -> dict[str, Any]:
        """transformers' config.json as it is (transformers loads the folder)."""
        return dict(self.to_file_config())

    def save_pretrained(self, save_directory: str | os.PathLike, *, variant: str | None = None) -> Path:
        """config.json + model.safetensors in transformers' layout (each file atomically); the folder may hold
        other files."""
        folder = Path(save_directory)
        self.write_files(folder, variant=variant)
        return folder

    @classmethod
    def from_state_dict(cls, config: CLIPVisionConfig, state: Mapping[str, torch.Tensor], *,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        source: str | None = None,
                        key_names: Mapping[str, str] | None = None) -> CLIPVisionModelWithProjection:
        """Strict load of transformers' keys; an old position-id buffer is dropped."""
        state = {k: v for k, v in state.items() if k != POSITION_IDS_KEY}
        return super().from_state_dict(config, state, torch_dtype=torch_dtype, device=device, source=source,
                                       key_names=key_names)

    @classmethod
    def from_transformers(cls, model: Any) -> CLIPVisionModelWithProjection:
        """The same weights from a transformers CLIPVisionModelWithProjection object (its config read strictly)."""
        config = cls.from_file_config(model.config.to_dict(), source=type(model).__name__)
        first = next(model.parameters())
        return cls.from_state_dict(config, model.state_dict(), torch_dtype=first.dtype, device=first.device,
                                   source=type(model).__name__)
