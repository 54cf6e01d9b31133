"""The LDM denoiser: a UNet conditioned on time, and on a context sequence through cross-attention.

Rombach et al. 2022 (LDM), sec. 3.3: eps_theta(z_t, t, tau_theta(y)), a time-conditional UNet whose
intermediate layers attend to the conditioning tokens. Parameter names are exactly those of diffusers'
UNet2DConditionModel, so its checkpoints load with no key map, and config.json is mapped both ways.

Layout, per resolution level l (L levels): `layers[l]` ResnetBlocks, each followed by a
SpatialTransformer where `attention_levels[l]`, then a stride-2 Downsample (not on the last level).
The middle is ResnetBlock, SpatialTransformer, ResnetBlock. Going up, each level has `layers[l] + 1`
ResnetBlocks, each fed the concatenation of the running features and one skip from the way down.
"""
from __future__ import annotations

import dataclasses
import numbers
from functools import partial
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ComponentConfig
from ..errors import ConfigError, InputError
from ..layers.attention import SpatialTransformer
from ..layers.embeddings import TimestepEmbedding, cast, timestep_embedding
from ..layers.resnet import Downsample, ResnetBlock, Upsample
from ..registry import COMPONENTS
from .base import ModelMixin, check_supported

MidBlock = Literal["transformer", "resnet", "none"]


@dataclasses.dataclass(frozen=True)
class UNetConfig(ComponentConfig):
    """Architecture of the denoiser. Per-level settings take one value for all levels, or one per level."""

    in_channels: int = 4                     # latent channels (+ concatenated conditioning, e.g. 9 for inpainting)
    out_channels: int = 4
    sample_size: int | None = 64             # latent side the model was trained at (default image size)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)         # width per resolution level
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_level: int | tuple[int, ...] = 2                # ResnetBlocks per level on the way down
    attention_heads: int | tuple[int, ...] = 8                 # SD1.x 8; SD2.x (5, 10, 20, 20)
    transformer_depth: int | tuple[int, ...] = 1               # transformer blocks per SpatialTransformer
    cross_attention_dim: int | None = 768    # context width; None: transformer blocks only self-attend
    use_linear_projection: bool = False      # SD2.x: linear proj_in/proj_out instead of 1x1 convs
    num_class_embeds: int | None = None      # class-conditional: a label embedding added to the time embedding
    upcast_attention: bool = False           # SD2.1: attention in fp32 under fp16/bf16
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True             # sinusoid order [cos, sin] (LDM) rather than [sin, cos]
    freq_shift: float = 0
    dropout: float = 0.0                     # in the ResnetBlocks (diffusers does not pass it to the transformers)
    mid_block: MidBlock = "transformer"      # "transformer": resnet-attention-resnet; "resnet": one resnet; "none"
    mid_block_scale_factor: float = 1.0      # mid-block resnets divide their output by this
    downsample_padding: int = 1              # 0: pad right/bottom only, as the original LDM autoencoder
    time_embedding_dim: int | None = None    # None: 4 * channels[0]

    def validate(self) -> None:
        n = len(self.channels)
        if n == 0 or any(c <= 0 for c in self.channels):
            raise ConfigError("channels must list positive widths, one per level", where="channels",
                              expected="non-empty tuple of positive ints", found=self.channels)
        for name in ("attention_levels", "layers_per_level", "attention_heads", "transformer_depth"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ConfigError(f"{name} needs one entry per level of channels", where=name,
                                  expected=f"{n} entries (len(channels))", found=value)
        for name in ("layers_per_level", "attention_heads", "transformer_depth"):
            if any(v < 1 for v in self.per_level(getattr(self, name))):
                raise ConfigError(f"{name} must be >= 1", where=name, expected=">= 1", found=getattr(self, name))
        for name in ("in_channels", "out_channels", "norm_num_groups", "sample_size", "cross_attention_dim",
                     "num_class_embeds", "time_embedding_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be positive", where=name, expected=">= 1", found=value)
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError("every level width must be divisible by norm_num_groups", where="norm_num_groups",
                              expected=f"a divisor of {self.channels}", found=self.norm_num_groups)
        for level, (c, h) in enumerate(zip(self.channels, self.per_level(self.attention_heads))):
            if self.has_attention(level) and c % h:
                raise ConfigError(f"level {level} width {c} is not divisible by its {h} attention heads",
                                  where="attention_heads", expected=f"a divisor of {c}", found=h)
        if self.downsample_padding not in (0, 1):
            raise ConfigError("downsample_padding must be 0 or 1", where="downsample_padding",
                              expected="0 or 1", found=self.downsample_padding)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout must be in [0, 1)", where="dropout", expected="[0, 1)", found=self.dropout)
        if self.norm_eps <= 0 or self.mid_block_scale_factor <= 0:
            raise ConfigError("norm_eps and mid_block_scale_factor must be positive",
                              where="norm_eps/mid_block_scale_factor", expected="> 0",
                              found=(self.norm_eps, self.mid_block_scale_factor))

    def per_level(self, value: int | tuple[int, ...]) -> tuple[int, ...]:
        """A per-level setting as one value per level."""
        return value if isinstance(value, tuple) else (value,) * len(self.channels)

    def has_attention(self, level: int) -> bool:
        """Level `level` holds SpatialTransformers (the last level counts when the mid block has one)."""
        return self.attention_levels[level] or (level == len(self.channels) - 1 and self.mid_block == "transformer")

    @property
    def uses_context(self) -> bool:
        """Whether forward needs a context: some transformer cross-attends."""
        return self.cross_attention_dim is not None and (any(self.attention_levels) or self.mid_block == "transformer")


Attend = Callable[[int], nn.Module]  # channels -> SpatialTransformer


class DownLevel(nn.Module):
    """diffusers CrossAttnDownBlock2D (with `attend`) / DownBlock2D: resnets (+ transformers) (+ downsample)."""

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, resnet: Callable[..., ResnetBlock],
                 attend: Attend | None, downsample: bool, padding: int):
        super().__init__()
        self.resnets = nn.ModuleList(resnet(in_channels if i == 0 else out_channels, out_channels)
                                     for i in range(layers))
        self.attentions = nn.ModuleList(attend(out_channels) for _ in range(layers)) if attend else None
        self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=padding)]) if downsample else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                skips: list[torch.Tensor]) -> torch.Tensor:
        """h: (B, C_in, H, W) -> (B, C_out, H', W'); appends every intermediate to `skips`.
        emb: SiLU(time embedding), (B, temb), as every level takes it (see UNet2DConditional.forward)."""
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, emb, temb_activated=True)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h


class MidLevel(nn.Module):
    """diffusers UNetMidBlock2DCrossAttn (resnet, transformer, resnet) or UNetMidBlock2D (one resnet)."""

    def __init__(self, channels: int, *, resnet: Callable[..., ResnetBlock], attend: Attend | None):
        super().__init__()
        self.resnets = nn.ModuleList([resnet(channels, channels)] + ([resnet(channels, channels)] if attend else []))
        self.attentions = nn.ModuleList([attend(channels)]) if attend else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        h = self.resnets[0](h, emb, temb_activated=True)
        if self.attentions is not None:
            h = self.resnets[1](self.attentions[0](h, context), emb, temb_activated=True)
        return h


class UpLevel(nn.Module):
    """diffusers CrossAttnUpBlock2D / UpBlock2D: (resnet on [h, skip]) (+ transformer), x layers, (+ upsample).

    `in_channels` is the width coming up from the previous (coarser) level; `skip_channels` the width of the
    next finer level, whose downsampler output (conv_in's output, for level 0) is this level's last skip.
    """

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int, *, layers: int,
                 resnet: Callable[..., ResnetBlock], attend: Attend | None, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            resnet((in_channels if i == 0 else out_channels) + (skip_channels if i == layers - 1 else out_channels),
                   out_channels) for i in range(layers))
        self.attentions = nn.ModuleList(attend(out_channels) for _ in range(layers)) if attend else None
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None, skips: list[torch.Tensor],
                upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Pops one skip per resnet from the end of `skips`."""
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb, temb_activated=True)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h


@COMPONENTS.register("unet")
class UNet2DConditional(ModelMixin):
    """eps_theta(x_t, t, context): the LDM / Stable Diffusion denoiser (diffusers UNet2DConditionModel layout)."""

    config_class = UNetConfig
    diffusers_class_name = "UNet2DConditionModel"
    config: UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        cfg, ch, n = config, config.channels, len(config.channels)
        layers, heads, depth = (cfg.per_level(v) for v in
                                (cfg.layers_per_level, cfg.attention_heads, cfg.transformer_depth))
        temb = cfg.time_embedding_dim or 4 * ch[0]
        resnet = partial(_resnet, temb=temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout)

        def attend(level: int) -> Attend:
            return partial(_transformer, cfg, heads=heads[level], depth=depth[level])

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.class_embedding = nn.Embedding(cfg.num_class_embeds, temb) if cfg.num_class_embeds else None
        self.down_blocks = nn.ModuleList(
            DownLevel(ch[max(lvl - 1, 0)], ch[lvl], layers=layers[lvl], resnet=resnet,
                      attend=attend(lvl) if cfg.attention_levels[lvl] else None,
                      downsample=lvl < n - 1, padding=cfg.downsample_padding) for lvl in range(n))
        mid_resnet = partial(resnet, output_scale_factor=cfg.mid_block_scale_factor)
        self.mid_block = None if cfg.mid_block == "none" else MidLevel(
            ch[-1], resnet=mid_resnet, attend=attend(n - 1) if cfg.mid_block == "transformer" else None)
        self.up_blocks = nn.ModuleList(
            UpLevel(ch[min(lvl + 1, n - 1)], ch[lvl], ch[max(lvl - 1, 0)], layers=layers[lvl] + 1, resnet=resnet,
                    attend=attend(lvl) if cfg.attention_levels[lvl] else None, upsample=lvl > 0)
            for lvl in reversed(range(n)))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, in_channels, H, W); t: number, 0-d, (1,) or (B,); context: (B, M, cross_attention_dim);
        class_labels: (B,) integers -> (B, out_channels, H, W), the prediction (eps, v or x0, as trained)."""
        upsample_sizes = self._check_inputs(x, t, context, class_labels)
        t_features = timestep_embedding(timestep_batch(t, x), self.config.channels[0],
                                        flip_sin_to_cos=self.config.flip_sin_to_cos, freq_shift=self.config.freq_shift)
        emb = self.time_embedding(cast(t_features, x.dtype))
        if self.class_embedding is not None:
            emb = emb + cast(self.class_embedding(class_labels), emb.dtype)
        # every ResnetBlock projects SiLU(emb): activated once here rather than once per block
        emb = F.silu(emb)

        h = self.conv_in(x)
        skips = [h]
        for down in self.down_blocks:
            h = down(h, emb, context, skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, context)
        for up, size in zip(self.up_blocks, upsample_sizes):
            h = up(h, emb, context, skips, size)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def _check_inputs(self, x: torch.Tensor, t: Any, context: torch.Tensor | None,
                      class_labels: torch.Tensor | None) -> list[tuple[int, int] | None]:
        """Raise InputError before any work; return each up level's upsample target size (None: plain x2)."""
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise InputError("x must be a (B, C, H, W) latent with the model's input channels", where="x",
                             expected=f"(B, {cfg.in_channels}, H, W)", found=shape_of(x))
        b = x.shape[0]
        check_timestep(t, b)
        if cfg.uses_context:
            if not (isinstance(context, torch.Tensor) and context.ndim == 3 and context.shape[0] == b
                    and context.shape[2] == cfg.cross_attention_dim):
                raise InputError("this UNet cross-attends: context must be (B, M, cross_attention_dim)",
                                 where="context", expected=f"({b}, M, {cfg.cross_attention_dim})",
                                 found=shape_of(context))
        elif context is not None:
            raise InputError("this UNet has no cross-attention (cross_attention_dim is None): pass no context",
                             where="context", expected=None, found=shape_of(context))
        if cfg.num_class_embeds is not None:
            if not isinstance(class_labels, torch.Tensor) or class_labels.shape != (b,) \
                    or class_labels.is_floating_point():
                raise InputError("this UNet is class-conditional: class_labels must be (B,) integers",
                                 where="class_labels", expected=f"({b},) integer tensor",
                                 found=shape_of(class_labels))
        elif class_labels is not None:
            raise InputError("this UNet is not class-conditional (num_class_embeds is None): pass no class_labels",
                             where="class_labels", expected=None, found=shape_of(class_labels))
        return upsample_sizes(tuple(x.shape[-2:]), levels=len(cfg.channels), downsample_padding=cfg.downsample_padding)

    # ---- config.json (diffusers UNet2DConditionModel) ------------------------------------------
    @classmethod
    def from_file_config(cls, data: Mapping[str, Any], *, source: str | None = None) -> UNetConfig:
        """diffusers config.json -> UNetConfig; keys we don't implement at the given value are a ConfigError."""
        return UNetConfig.from_dict(from_diffusers_config(data, source=source), source=source)

    def to_file_config(self) -> dict[str, Any]:
        """A complete diffusers UNet2DConditionModel config.json for this architecture."""
        return to_diffusers_config(self.config)


def _resnet(in_channels: int, out_channels: int, *, temb: int, groups: int, eps: float, dropout: float,
            output_scale_factor: float = 1.0) -> ResnetBlock:
    return ResnetBlock(in_channels, out_channels, temb_channels=temb, groups=groups, eps=eps, dropout=dropout,
                       output_scale_factor=output_scale_factor)


def _transformer(cfg: UNetConfig, channels: int, *, heads: int, depth: int) -> SpatialTransformer:
    # heads * (channels // heads) == channels: validate() checked the division
    return SpatialTransformer(channels, heads, channels // heads, depth=depth, context_dim=cfg.cross_attention_dim,
                              use_linear=cfg.use_linear_projection, groups=cfg.norm_num_groups,
                              upcast=cfg.upcast_attention)


def shape_of(value: Any) -> Any:
    """What an InputError reports as `found`: a tensor's shape, anything else as is."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else value


# ---- helpers shared with the UNet without cross-attention (unet2d.py) ---------------------------------

def check_timestep(t: Any, batch: int) -> None:
    """t must be a number, a 0-d tensor, or a (1,) / (batch,) tensor."""
    if isinstance(t, torch.Tensor):
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise InputError("t must be a number, a 0-d tensor or one timestep per sample", where="t",
                             expected=f"(), (1,) or ({batch},)", found=shape_of(t))
    elif not isinstance(t, numbers.Real) or isinstance(t, bool):
        raise InputError("t must be a number or a tensor", where="t", expected="int | float | Tensor",
                         found=type(t).__name__)


def timestep_batch(t: torch.Tensor | float | int, x: torch.Tensor) -> torch.Tensor:
    """A checked t as one timestep per sample of x: (B,), on x's device."""
    if isinstance(t, torch.Tensor):  # no-op moves and views skipped: each is an op per UNet call
        t = t if t.device == x.device else t.to(device=x.device)
        return t if t.shape == (x.shape[0],) else t.expand(x.shape[0])  # from (), (1,) (check_timestep)
    # a full() on the device, not a host tensor copied over: no sync
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


def upsample_sizes(size: tuple[int, int], *, levels: int, downsample_padding: int) -> list[tuple[int, int] | None]:
    """Each up level's upsample target (None: plain x2): the sizes of the skips on the way down, so the way up
    matches them for sides not divisible by 2^(levels-1). Raises InputError for a latent too small."""
    n, pad = levels, downsample_padding
    sizes = [size]
    for _ in range(n - 1):  # the conv arithmetic of Downsample (stride 2, kernel 3)
        sizes.append(tuple((s + 1) // 2 if pad else s // 2 for s in sizes[-1]))
    if min(sizes[-1]) < 1:
        raise InputError(f"latent too small for {n} levels", where="x", expected=f"H, W >= {2 ** (n - 1)}",
                         found=size)
    # diffusers passes explicit sizes to every up level as soon as one side is not a multiple of 2^(L-1)
    odd = any(s % 2 ** (n - 1) for s in size)
    return [sizes[n - 2 - i] if odd and i < n - 1 else None for i in range(n)]


# ---- diffusers config.json <-> UNetConfig ------------------------------------------------------------
# Every argument of diffusers' UNet2DConditionModel.__init__, at its default (diffusers 0.42). A key a file
# omits takes this value; tests check the table against the signature, so a new diffusers key is caught.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}


def _all_false(value: Any) -> bool:
    """False, or a list of False (one per level)"""
    return value is False or (isinstance(value, (list, tuple)) and not any(value))


# Keys diffusers implements at other values too; latentdiff implements only these (SD1.x/2.x, LDM).
_SUPPORTED: dict[str, Any] = {
    "center_input_sample": False, "act_fn": ("silu", "swish"), "only_cross_attention": _all_false,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "num_attention_heads": None,  # diffusers itself refuses it: heads come from attention_head_dim
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False,
}
# Keys read only by block types (Simple*, ResnetDownsample*) or embeddings (projection, text_time ...) that
# the checks above reject, so any value builds the same network: accepted and not kept.
_INERT = ("resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm", "mid_block_only_cross_attention",
          "addition_embed_type_num_heads", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
# Keys mapped to UNetConfig fields by from_diffusers_config (together with the two tables above: every key).
_MAPPED = ("sample_size", "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
           "mid_block_type", "up_block_types", "block_out_channels", "layers_per_block", "downsample_padding",
           "mid_block_scale_factor", "dropout", "norm_num_groups", "norm_eps", "cross_attention_dim",
           "transformer_layers_per_block", "attention_head_dim", "use_linear_projection", "num_class_embeds",
           "upcast_attention", "time_embedding_dim")
_DOWN = {True: "CrossAttnDownBlock2D", False: "DownBlock2D"}
_UP = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}
_MID: dict[str, str | None] = {"transformer": "UNetMidBlock2DCrossAttn", "resnet": "UNetMidBlock2D", "none": None}


def from_diffusers_config(data: Mapping[str, Any], *, source: str | None = None) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config dict -> UNetConfig fields. Metadata keys ("_...") are skipped."""
    d = read_diffusers_config(data, "UNet2DConditionModel", DIFFUSERS_DEFAULTS, _SUPPORTED, source=source)
    levels, channels = attention_levels_of(d, down=_DOWN, up=_UP, source=source)
    n = len(levels)
    mid = {v: k for k, v in _MID.items()}
    if d["mid_block_type"] not in mid:
        raise ConfigError("mid block type is not supported", where=key_at(source, "mid_block_type"),
                          expected=list(_MID.values()), found=d["mid_block_type"])
    return {
        "in_channels": d["in_channels"], "out_channels": d["out_channels"],
        "sample_size": square_sample_size(d["sample_size"], source), "channels": channels,
        "attention_levels": levels,
        "layers_per_level": _per_level(d, "layers_per_block", n, source),
        # diffusers' naming quirk: with num_attention_heads None, attention_head_dim holds the head *count*
        "attention_heads": _per_level(d, "attention_head_dim", n, source),
        "transformer_depth": _per_level(d, "transformer_layers_per_block", n, source),
        "cross_attention_dim": _cross_attention_dim(d["cross_attention_dim"], n, source),
        "use_linear_projection": d["use_linear_projection"], "num_class_embeds": d["num_class_embeds"],
        "upcast_attention": d["upcast_attention"], "norm_num_groups": d["norm_num_groups"],
        "norm_eps": d["norm_eps"], "flip_sin_to_cos": d["flip_sin_to_cos"], "freq_shift": d["freq_shift"],
        "dropout": d["dropout"], "mid_block": mid[d["mid_block_type"]],
        "mid_block_scale_factor": d["mid_block_scale_factor"], "downsample_padding": d["downsample_padding"],
        "time_embedding_dim": d["time_embedding_dim"],
    }


def to_diffusers_config(cfg: UNetConfig) -> dict[str, Any]:
    """UNetConfig -> a complete diffusers UNet2DConditionModel config dict (every __init__ argument)."""
    n = len(cfg.channels)

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    out = {k: list(v) if isinstance(v, list) else v for k, v in DIFFUSERS_DEFAULTS.items()}
    out.update({
        "sample_size": cfg.sample_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": cfg.freq_shift,
        "down_block_types": [_DOWN[a] for a in cfg.attention_levels], "mid_block_type": _MID[cfg.mid_block],
        "up_block_types": [_UP[a] for a in reversed(cfg.attention_levels)],
        "block_out_channels": list(cfg.channels), "layers_per_block": plain(cfg.layers_per_level),
        "downsample_padding": cfg.downsample_padding, "mid_block_scale_factor": cfg.mid_block_scale_factor,
        "dropout": cfg.dropout, "norm_num_groups": cfg.norm_num_groups, "norm_eps": cfg.norm_eps,
        # no cross-attention: one None per level (a bare None breaks diffusers' per-level indexing)
        "cross_attention_dim": cfg.cross_attention_dim if cfg.cross_attention_dim is not None else [None] * n,
        "transformer_layers_per_block": plain(cfg.transformer_depth), "attention_head_dim": plain(cfg.attention_heads),
        "use_linear_projection": cfg.use_linear_projection, "num_class_embeds": cfg.num_class_embeds,
        "upcast_attention": cfg.upcast_attention, "time_embedding_dim": cfg.time_embedding_dim,
    })
    return out


def read_diffusers_config(data: Mapping[str, Any], class_name: str, defaults: Mapping[str, Any],
                          supported: Mapping[str, Any], *, source: str | None) -> dict[str, Any]:
    """A diffusers config.json dict over the class's defaults, after checking its class name, that every key is
    an argument of the class (`defaults` holds them all), and that `supported` keys hold implemented values."""
    if data.get("_class_name", class_name) != class_name:
        raise ConfigError("config.json describes another model class", where=key_at(source, "_class_name"),
                          expected=class_name, found=data["_class_name"])
    unknown = sorted(k for k in data if not k.startswith("_") and k not in defaults)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in a {class_name} config", where=source,
                          expected=f"keys of diffusers {class_name}", found=unknown)
    check_supported(data, supported, source=source)
    return {**defaults, **data}


def attention_levels_of(d: Mapping[str, Any], *, down: Mapping[bool, str], up: Mapping[bool, str],
                        source: str | None) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    """down_block_types -> (attention per level, block_out_channels). `down` / `up` name the block types without
    (False) and with (True) attention; the up blocks must mirror the down blocks."""
    names = [_block_name(b) for b in _list(d, "down_block_types", source)]
    for i, name in enumerate(names):
        if name not in down.values():
            raise ConfigError(f"down block type {name!r} is not supported",
                              where=key_at(source, f"down_block_types[{i}]"), expected=sorted(down.values()),
                              found=name)
    levels = tuple(name == down[True] for name in names)
    mirror = [up[a] for a in reversed(levels)]
    if [_block_name(b) for b in _list(d, "up_block_types", source)] != mirror:
        raise ConfigError("up_block_types must mirror down_block_types", where=key_at(source, "up_block_types"),
                          expected=mirror, found=d["up_block_types"])
    channels = _list(d, "block_out_channels", source)
    if len(channels) != len(levels):
        raise ConfigError("block_out_channels needs one entry per down block",
                          where=key_at(source, "block_out_channels"),
                          expected=f"{len(levels)} entries (len(down_block_types))", found=channels)
    return levels, tuple(channels)


def key_at(source: str | None, key: str) -> str:
    """Where a config error is: `key in path/to/config.json`."""
    return f"{key} in {source}" if source else key


def _block_name(name: Any) -> Any:
    # diffusers accepts "UNetRes"-prefixed aliases of the same blocks
    return name[len("UNetRes"):] if isinstance(name, str) and name.startswith("UNetRes") else name


def _list(d: Mapping[str, Any], key: str, source: str | None) -> list[Any]:
    if not isinstance(d[key], (list, tuple)) or not d[key]:
        raise ConfigError(f"{key} must be a non-empty list", where=key_at(source, key), expected="list",
                          found=repr(d[key]))
    return list(d[key])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_level(d: Mapping[str, Any], key: str, n: int, source: str | None) -> int | tuple[int, ...]:
    """One int for every level, or a list of one int per level (kept as given, so files round-trip)."""
    value = d[key]
    if _is_int(value):
        return value
    if isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
        if len(value) != n:
            raise ConfigError(f"{key} needs one entry per down block", where=key_at(source, key),
                              expected=f"{n} entries (len(down_block_types))", found=value)
        return tuple(value)
    raise ConfigError(f"{key} must be an int or one int per level", where=key_at(source, key),
                      expected=f"int or list of {n} ints", found=repr(value))


def _cross_attention_dim(value: Any, n: int, source: str | None) -> int | None:
    """int, or per level: the same int everywhere, or None everywhere (no cross-attention)."""
    if value is None or _is_int(value):
        return value
    if isinstance(value, (list, tuple)) and len(value) == n and len(set(value)) == 1 \
            and (value[0] is None or _is_int(value[0])):
        return value[0]
    raise ConfigError("cross_attention_dim must be one int (or None) shared by every level",
                      where=key_at(source, "cross_attention_dim"), expected=f"int, or a list of {n} equal ints or None",
                      found=repr(value))


def square_sample_size(value: Any, source: str | None) -> int | None:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError("only square sample sizes are supported", where=key_at(source, "sample_size"),
                              expected="int or [s, s]", found=value)
        return value[0]
    return value
