"""The LDM denoiser without cross-attention: unconditional and concatenation-conditioned latent diffusion.

Rombach et al. 2022 (LDM), sec. 4.1 and 4.3: the unconditional LDMs (CelebA-HQ, FFHQ, LSUN churches and
bedrooms) and the x4 super-resolution LDM, which conditions by concatenating the low-resolution image to
z_t (6 input channels). Same UNet as unet.py (the level classes are shared), but its attention layers are
LDM's AttentionBlock: GroupNorm, multi-head self-attention over pixels, + input (no transformer, no
context). Parameter names are exactly those of diffusers' UNet2DModel, so its checkpoints load with no key
map; config.json is mapped both ways by `diffusers_tables.UNET_2D`. The LSUN-churches LDM's options are
implemented too: scale-shift norms (use_scale_shift_norm), ResnetBlock up/downsampling (resblock_updown)
and a head width per level.

`forward(x, t, context=None, class_labels=None)` has the signature of UNet2DConditional, so every sampler
and pipeline runs either model; `context` must stay None.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import nn

from .. import limits
from ..config import ComponentConfig
from ..errors import ConfigError, InputError
from ..layers.attention import SpatialSelfAttention, attention
from ..layers.embeddings import TimestepEmbedding, timestep_embedding, to_dtype
from ..layers.resnet import ResnetBlock
from ..registry import COMPONENTS
from . import structure
from .base import DEPRECATED_ATTENTION_NAMES, ModelMixin, rename_deprecated_attention  # noqa: F401 (re-exported)
from .deep_cache import DeepCacheState, run_levels
from .diffusers_tables import UNET_2D
from .freeu import FreeU
from .unet import DownLevel, UpLevel, check_timestep, shape_of, timestep_batch, upsample_sizes

ClassEmbedType: TypeAlias = Literal["timestep", "identity"]
ResampleType: TypeAlias = Literal["conv", "resnet"]


@dataclasses.dataclass(frozen=True)
class UNet2DConfig(ComponentConfig):
    """Architecture of the UNet without cross-attention. Defaults are diffusers UNet2DModel's (CelebA-HQ LDM widths)."""

    in_channels: int = 3                     # latent channels (+ concatenated conditioning: 6 for x4 super-resolution)
    out_channels: int = 3
    sample_size: int | None = None           # latent side the model was trained at (default image size)
    channels: tuple[int, ...] = (224, 448, 672, 896)           # width per resolution level
    attention_levels: tuple[bool, ...] = (False, True, True, True)
    layers_per_level: int = 2                # ResnetBlocks per level on the way down (one more on the way up)
    # width of one head (LDM num_head_channels), or one width per level (the mid block takes the last level's);
    # None: one head per layer. Per-level widths are latentdiff's: diffusers' UNet2DModel takes one int
    attention_head_dim: int | tuple[int, ...] | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None  # GroupNorm groups of the mid-block attention; None: norm_num_groups
    mid_attention_norm: bool = True          # False: no GroupNorm in the mid-block attention (a diffusers quirk)
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True             # sinusoid order [cos, sin] (LDM) rather than [sin, cos]
    freq_shift: float = 0
    time_embedding_dim: int | None = None    # None: 4 * channels[0]
    # class conditioning, added to the time embedding: num_class_embeds -> a label table; "timestep": labels
    # through the sinusoid and their own MLP; "identity": class_labels are already (B, time_embedding_dim)
    class_embed_type: ClassEmbedType | None = None
    num_class_embeds: int | None = None
    mid_block: bool = True                   # False: no mid block (diffusers mid_block_type None)
    mid_block_attention: bool = True         # resnet-attention-resnet, else resnet-resnet (diffusers add_attention)
    mid_block_scale_factor: float = 1.0      # mid-block resnets and attention divide their output by this
    downsample_padding: int = 1              # 0: pad right/bottom only, as the original LDM autoencoder
    # LDM use_scale_shift_norm: the time embedding scales and shifts each ResnetBlock's second GroupNorm
    time_scale_shift: bool = False
    # LDM resblock_updown: "resnet" resamples with a ResnetBlock (avg-pool down / nearest up) instead of a conv
    downsample_type: ResampleType = "conv"
    upsample_type: ResampleType = "conv"
    dropout: float = 0.0                     # in the ResnetBlocks
    center_input_sample: bool = False        # map the input from [0, 1] to [-1, 1] first

    def validate(self) -> None:
        n = len(self.channels)
        if n == 0 or any(c <= 0 for c in self.channels):
            raise ConfigError("channels must list positive widths, one per level", where="channels",
                              expected="non-empty tuple of positive ints", found=self.channels)
        if len(self.attention_levels) != n:
            raise ConfigError("attention_levels needs one entry per level of channels", where="attention_levels",
                              expected=f"{n} entries (len(channels))", found=self.attention_levels)
        structure.check_levels(self.channels)
        structure.check_counts([("layers_per_level", self.layers_per_level, limits.MAX_LAYERS_PER_LEVEL),
                                ("in_channels", self.in_channels, limits.MAX_CHANNELS),
                                ("out_channels", self.out_channels, limits.MAX_CHANNELS),
                                ("time_embedding_dim", self.time_embedding_dim, limits.MAX_CHANNELS),
                                ("num_class_embeds", self.num_class_embeds, limits.MAX_VOCAB)])
        structure.check_parameters(structure.estimate_unet_parameters(
            self.channels, (self.layers_per_level,) * n, attention=self.attention_levels), what="this UNet",
            key="channels")
        for name in ("in_channels", "out_channels", "layers_per_level", "norm_num_groups", "sample_size",
                     "attn_norm_num_groups", "time_embedding_dim", "num_class_embeds"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be positive", where=name, expected=">= 1", found=value)
        dims = self.attention_head_dim if isinstance(self.attention_head_dim, tuple) else (self.attention_head_dim,) * n
        if len(dims) != n or any(d is not None and d < 1 for d in dims):
            raise ConfigError("attention_head_dim must be positive, one int or one per level",
                              where="attention_head_dim", expected=f"an int >= 1 or {n} of them",
                              found=self.attention_head_dim)
        if any(c % self.norm_num_groups for c in self.channels):
            raise ConfigError("every level width must be divisible by norm_num_groups", where="norm_num_groups",
                              expected=f"a divisor of {self.channels}", found=self.norm_num_groups)
        for width, head_dim in self.attention_widths():
            if head_dim is not None and width % head_dim:
                raise ConfigError(f"attention width {width} is not a whole number of {head_dim}-wide heads",
                                  where="attention_head_dim", expected=f"a divisor of {width}",
                                  found=self.attention_head_dim)
        if not self.mid_attention_norm and not self.time_scale_shift:
            raise ConfigError("a mid-block attention without GroupNorm exists only with scale-shift norms (as in "
                              "diffusers, which drops it there alone)", where="mid_attention_norm",
                              expected="True without time_scale_shift", found=self.mid_attention_norm)
        if self.has_mid_attention and self.channels[-1] % (self.attn_norm_num_groups or self.norm_num_groups):
            raise ConfigError("the mid-block width must be divisible by attn_norm_num_groups",
                              where="attn_norm_num_groups", expected=f"a divisor of {self.channels[-1]}",
                              found=self.attn_norm_num_groups)
        if self.class_embed_type is not None and self.num_class_embeds is not None:
            raise ConfigError("num_class_embeds sizes a label table, used only without class_embed_type",
                              where="num_class_embeds", expected="None with a class_embed_type",
                              found=self.num_class_embeds)
        if self.downsample_padding not in (0, 1):
            raise ConfigError("downsample_padding must be 0 or 1", where="downsample_padding",
                              expected="0 or 1", found=self.downsample_padding)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout must be in [0, 1)", where="dropout", expected="[0, 1)", found=self.dropout)
        if self.norm_eps <= 0 or self.mid_block_scale_factor <= 0:
            raise ConfigError("norm_eps and mid_block_scale_factor must be positive",
                              where="norm_eps/mid_block_scale_factor", expected="> 0",
                              found=(self.norm_eps, self.mid_block_scale_factor))

    @property
    def has_mid_attention(self) -> bool:
        return self.mid_block and self.mid_block_attention

    def head_dim(self, level: int) -> int | None:
        """Head width at a level (-1: the last level, whose width the mid block takes too)."""
        dims = self.attention_head_dim
        return dims[level] if isinstance(dims, tuple) else dims

    def attention_widths(self) -> list[tuple[int, int | None]]:
        """(width, head width) of the levels that hold attention layers (the last level again for the mid block's)."""
        widths = [(c, self.head_dim(lvl))
                  for lvl, (c, a) in enumerate(zip(self.channels, self.attention_levels, strict=True)) if a]
        return widths + [(self.channels[-1], self.head_dim(-1))] if self.has_mid_attention else widths

    @property
    def time_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.channels[0]

    @property
    def class_conditional(self) -> bool:
        return self.class_embed_type is not None or self.num_class_embeds is not None


class AttentionBlock(SpatialSelfAttention):
    """LDM's AttentionBlock (diffusers `Attention` with group_norm and residual_connection): GroupNorm, multi-head
    self-attention over pixels, + input, all divided by `rescale` (the mid block's scale factor).

    x: (B, C, H, W) -> (B, C, H, W). `context` is accepted only for the call protocol of the level classes.
    """

    def __init__(self, channels: int, *, head_dim: int | None, groups: int | None, eps: float, rescale: float = 1.0):
        super().__init__(channels, groups=groups or 1, eps=eps)
        if groups is None:  # diffusers' mid block with scale-shift norms and no attn_norm_num_groups: no norm
            self.group_norm = None  # type: ignore[assignment]  # only here: forward() below checks for None
        self.heads = channels // (head_dim or channels)  # head_dim None: one head as wide as the layer
        self.rescale = rescale if rescale != 1.0 else None  # a division by 1 is a wasted op per call

    def forward(self, x: torch.Tensor, context: None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.group_norm(x) if self.group_norm is not None else x
        tokens = normed.reshape(b, c, h * w).transpose(1, 2)
        out = attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), self.heads,
                        chunk_size=self.chunk_size, max_bytes=self.max_bytes)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w) + x
        return out / self.rescale if self.rescale is not None else out


class MidBlock(nn.Module):
    """diffusers UNetMidBlock2D: resnet, (attention), resnet; both resnets exist without attention too."""

    def __init__(self, channels: int, *, resnet: Callable[..., ResnetBlock],
                 attend: Callable[[int], AttentionBlock] | None):
        super().__init__()
        self.resnets = nn.ModuleList([resnet(channels, channels), resnet(channels, channels)])
        self.attentions = nn.ModuleList([attend(channels)]) if attend else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, emb, temb_activated=True)
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self.resnets[1](h, emb, temb_activated=True)


class ResnetDownLevel(DownLevel):
    """diffusers ResnetDownsampleBlock2D / AttnDownBlock2D(downsample_type="resnet"): DownLevel whose downsampler
    is a ResnetBlock(down=True) (LDM resblock_updown), which takes the time embedding."""

    resnet_resampler = True

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, resnet: Callable[..., ResnetBlock],
                 attend: Callable[[int], AttentionBlock] | None, downsample: bool):
        super().__init__(in_channels, out_channels, layers=layers, resnet=resnet, attend=attend, downsample=False,
                         padding=1)
        if downsample:
            self.downsamplers = nn.ModuleList([resnet(out_channels, out_channels, down=True)])


class ResnetUpLevel(UpLevel):
    """diffusers ResnetUpsampleBlock2D / AttnUpBlock2D(upsample_type="resnet"): UpLevel whose upsampler is a
    ResnetBlock(up=True) (LDM resblock_updown), which takes the time embedding."""

    resnet_resampler = True

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int, *, layers: int,
                 resnet: Callable[..., ResnetBlock], attend: Callable[[int], AttentionBlock] | None, upsample: bool):
        super().__init__(in_channels, out_channels, skip_channels, layers=layers, resnet=resnet, attend=attend,
                         upsample=False)
        if upsample:
            self.upsamplers = nn.ModuleList([resnet(out_channels, out_channels, up=True)])


@COMPONENTS.register("unet2d")
class UNet2D(ModelMixin[UNet2DConfig]):
    """eps_theta(x_t, t): the unconditional / concat-conditioned LDM denoiser (diffusers UNet2DModel layout)."""

    config_class = UNet2DConfig
    diffusers_class_name = "UNet2DModel"
    diffusers_config = UNET_2D

    def __init__(self, config: UNet2DConfig):
        super().__init__(config)
        cfg, ch, n = config, config.channels, len(config.channels)
        resnet = partial(ResnetBlock, temb_channels=cfg.time_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                         dropout=cfg.dropout, time_scale_shift=cfg.time_scale_shift)
        attend = partial(AttentionBlock, groups=cfg.norm_num_groups, eps=cfg.norm_eps)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_dim)
        # "identity" needs no module: the labels are added as they are
        self.class_embedding = (nn.Embedding(cfg.num_class_embeds, cfg.time_dim) if cfg.num_class_embeds else
                                TimestepEmbedding(ch[0], cfg.time_dim) if cfg.class_embed_type == "timestep" else None)
        down_level = ResnetDownLevel if cfg.downsample_type == "resnet" else \
            partial(DownLevel, padding=cfg.downsample_padding)
        up_level = ResnetUpLevel if cfg.upsample_type == "resnet" else UpLevel
        self.down_blocks = nn.ModuleList(
            down_level(ch[max(lvl - 1, 0)], ch[lvl], layers=cfg.layers_per_level, resnet=resnet,
                       attend=partial(attend, head_dim=cfg.head_dim(lvl)) if cfg.attention_levels[lvl] else None,
                       downsample=lvl < n - 1) for lvl in range(n))
        mid_groups = (cfg.attn_norm_num_groups or cfg.norm_num_groups) if cfg.mid_attention_norm else None
        mid_attend = partial(attend, head_dim=cfg.head_dim(-1), groups=mid_groups, rescale=cfg.mid_block_scale_factor)
        self.mid_block = MidBlock(ch[-1], resnet=partial(resnet, output_scale_factor=cfg.mid_block_scale_factor),
                                  attend=mid_attend if cfg.mid_block_attention else None) if cfg.mid_block else None
        self.up_blocks = nn.ModuleList(
            up_level(ch[min(lvl + 1, n - 1)], ch[lvl], ch[max(lvl - 1, 0)], layers=cfg.layers_per_level + 1,
                     resnet=resnet, attend=partial(attend, head_dim=cfg.head_dim(lvl)) if cfg.attention_levels[lvl]
                     else None, upsample=lvl > 0)
            for lvl in reversed(range(n)))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, *, cache: DeepCacheState | None = None,
                freeu: FreeU | None = None) -> torch.Tensor:
        """x: (B, in_channels, H, W); t: number, 0-d, (1,) or (B,); context: None (no cross-attention);
        class_labels: (B,) integers (num_class_embeds), (B,) numbers (class_embed_type "timestep") or
        (B, time_embedding_dim) ("identity"); cache: a DeepCache run (`deep_cache.DeepCacheState`); freeu: FreeU's
        factors (`freeu.FreeU`) -> (B, out_channels, H, W), the prediction (eps, v or x0, as trained).
        A float t stays a float (diffusers' UNet2DModel truncates a Python float to an integer)."""
        upsample_to = self._check_inputs(x, t, context, class_labels)
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        emb = self.time_embedding(to_dtype(self._sinusoid(timestep_batch(t, x)), x.dtype))
        if class_labels is not None:  # _check_inputs: given exactly when the model is class-conditional
            emb = emb + to_dtype(self._embed_classes(class_labels, emb.dtype), emb.dtype)
        emb = F.silu(emb)  # every ResnetBlock projects SiLU(emb): once here, not once per block

        h = run_levels(self, self.conv_in(x), emb, None, upsample_to, mid_args=(emb,), cache=cache, freeu=freeu)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def _sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, channels[0]) float32 sinusoidal features."""
        return timestep_embedding(t, self.config.channels[0], flip_sin_to_cos=self.config.flip_sin_to_cos,
                                  freq_shift=self.config.freq_shift)

    def _embed_classes(self, class_labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """class_labels -> (B, time_embedding_dim), added to the time embedding."""
        kind = self.config.class_embed_type
        if kind == "identity":
            return class_labels
        assert self.class_embedding is not None  # class-conditional, not "identity": __init__ built the module
        if kind == "timestep":
            return self.class_embedding(to_dtype(self._sinusoid(class_labels), dtype))
        return self.class_embedding(class_labels)

    def _check_inputs(self, x: torch.Tensor, t: Any, context: Any,
                      class_labels: torch.Tensor | None) -> list[tuple[int, int] | None]:
        """Raise InputError before any work; return each up level's upsample target size (None: plain x2)."""
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise InputError("x must be a (B, C, H, W) latent with the model's input channels", where="x",
                             expected=f"(B, {cfg.in_channels}, H, W)", found=shape_of(x))
        b = x.shape[0]
        check_timestep(t, b)
        if context is not None:
            raise InputError("this UNet has no cross-attention: pass no context (concatenate image conditioning to x)",
                             where="context", expected=None, found=shape_of(context))
        if not cfg.class_conditional:
            if class_labels is not None:
                raise InputError("this UNet is not class-conditional: pass no class_labels", where="class_labels",
                                 expected=None, found=shape_of(class_labels))
        elif not _labels_fit(class_labels, b, cfg):
            kind: dict[str | None, str] = {"identity": f"({b}, {cfg.time_dim}) floating", "timestep": f"({b},)"}
            raise InputError("this UNet is class-conditional: class_labels do not fit its class embedding",
                             where="class_labels", expected=f"{kind.get(cfg.class_embed_type, f'({b},) integer')} "
                             "tensor", found=shape_of(class_labels))
        # a ResnetBlock downsamples by 2x2 average pooling, which floors odd sides as an unpadded conv does
        padding = 0 if cfg.downsample_type == "resnet" else cfg.downsample_padding
        return upsample_sizes((x.shape[-2], x.shape[-1]), levels=len(cfg.channels), downsample_padding=padding)


def _labels_fit(labels: Any, batch: int, cfg: UNet2DConfig) -> bool:
    if not isinstance(labels, torch.Tensor):
        return False
    if cfg.class_embed_type == "identity":
        return labels.shape == (batch, cfg.time_dim) and labels.is_floating_point()
    if cfg.class_embed_type == "timestep":
        return labels.shape == (batch,) and not labels.is_complex()
    return labels.shape == (batch,) and not labels.is_floating_point() and not labels.is_complex()
