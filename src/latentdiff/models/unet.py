"""The LDM denoiser: a UNet conditioned on time, and on a context sequence through cross-attention.

Rombach et al. 2022 (LDM), sec. 3.3: eps_theta(z_t, t, tau_theta(y)), a time-conditional UNet whose
intermediate layers attend to the conditioning tokens. Parameter names are exactly those of diffusers'
UNet2DConditionModel, so its checkpoints load with no key map; config.json is mapped both ways by
`diffusers_tables.UNET_CONDITIONAL`.

Layout, per resolution level l (L levels): `layers[l]` ResnetBlocks, each followed by a
SpatialTransformer where `attention_levels[l]`, then a stride-2 Downsample (not on the last level).
The middle is ResnetBlock, SpatialTransformer, ResnetBlock. Going up, each level has `layers[l] + 1`
ResnetBlocks, each fed the concatenation of the running features and one skip from the way down.

SDXL (Podell et al. 2023) is this layout configured: no attention on the first level, transformer depths
(1, 2, 10), and its size/crop micro-conditioning as an additional embedding of the time embedding (`text_time`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal, TypeAlias, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import limits
from ..config import ComponentConfig, is_real
from ..errors import ConfigError, InputError, describe
from ..layers.attention import SpatialTransformer
from ..layers.embeddings import TimestepEmbedding, timestep_embedding, to_dtype
from ..layers.resnet import ResnetBlock
from ..registry import COMPONENTS
from . import structure
from .base import ModelMixin
from .deep_cache import DeepCacheState, run_levels
from .diffusers_tables import UNET_CONDITIONAL
from .freeu import FreeU
from .residuals import Residuals
from .unet_levels import Attend, DownLevel, MidLevel, UpLevel  # noqa: F401 (DownLevel, UpLevel: unet2d's import)

MidBlock: TypeAlias = Literal["transformer", "resnet", "none"]
AdditionEmbed: TypeAlias = Literal["text_time"]
# the keys of forward's `added_cond` for addition_embed_type "text_time" (diffusers' added_cond_kwargs)
TEXT_TIME_KEYS = ("text_embeds", "time_ids")


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
    # SDXL's micro-conditioning (diffusers addition_embed_type "text_time"): forward's added_cond carries the
    # pooled text embedding (B, P) and K numbers per sample (B, K); each number becomes a sinusoidal embedding of
    # addition_time_embed_dim features (the time embedding's flip_sin_to_cos / freq_shift), and
    # [text_embeds, features of the K numbers] (P + K * addition_time_embed_dim =
    # projection_class_embeddings_input_dim wide) goes through Linear-SiLU-Linear into the time embedding.
    # SDXL base: 256 and 1280 + 6 * 256 = 2816; refiner: 256 and 1280 + 5 * 256 = 2560 (aesthetic score).
    addition_embed_type: AdditionEmbed | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

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
        self._check_size()
        for name in ("layers_per_level", "attention_heads", "transformer_depth"):
            if any(v < 1 for v in self.per_level(getattr(self, name))):
                raise ConfigError(f"{name} must be >= 1", where=name, expected=">= 1", found=getattr(self, name))
        for name in ("in_channels", "out_channels", "norm_num_groups", "sample_size", "cross_attention_dim",
                     "num_class_embeds", "time_embedding_dim", "addition_time_embed_dim",
                     "projection_class_embeddings_input_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be positive", where=name, expected=">= 1", found=value)
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError("every level width must be divisible by norm_num_groups", where="norm_num_groups",
                              expected=f"a divisor of {self.channels}", found=self.norm_num_groups)
        for level, (c, h) in enumerate(zip(self.channels, self.per_level(self.attention_heads), strict=True)):
            if self.has_attention(level) and c % h:
                raise ConfigError(f"level {level} width {c} is not divisible by its {h} attention heads",
                                  where="attention_heads", expected=f"a divisor of {c}", found=h)
        self._check_addition_embed()
        if self.downsample_padding not in (0, 1):
            raise ConfigError("downsample_padding must be 0 or 1", where="downsample_padding",
                              expected="0 or 1", found=self.downsample_padding)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout must be in [0, 1)", where="dropout", expected="[0, 1)", found=self.dropout)
        if self.norm_eps <= 0 or self.mid_block_scale_factor <= 0:
            raise ConfigError("norm_eps and mid_block_scale_factor must be positive",
                              where="norm_eps/mid_block_scale_factor", expected="> 0",
                              found=(self.norm_eps, self.mid_block_scale_factor))

    def _check_addition_embed(self) -> None:
        """text_time needs both of its widths, and the input width room for the time features of one number
        and a pooled text embedding; without it neither width means anything and must be None."""
        dims = {"addition_time_embed_dim": self.addition_time_embed_dim,
                "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim}
        if self.addition_embed_type is None:
            for name, value in dims.items():
                if value is not None:
                    raise ConfigError(f"{name} is read only with addition_embed_type 'text_time'", where=name,
                                      expected="None (or addition_embed_type='text_time')", found=value)
            return
        if self.addition_embed_type != "text_time":
            raise ConfigError("addition_embed_type is not supported", where="addition_embed_type",
                              expected=["text_time", None], found=self.addition_embed_type)
        for name, value in dims.items():
            if value is None:
                raise ConfigError(f"addition_embed_type 'text_time' needs {name}", where=name,
                                  expected="a positive int (SDXL: 256 and 2816)", found=None)
        time_dim, input_dim = self.addition_time_embed_dim, self.projection_class_embeddings_input_dim
        assert time_dim is not None and input_dim is not None  # checked just above
        if input_dim <= time_dim:
            raise ConfigError("projection_class_embeddings_input_dim must exceed addition_time_embed_dim: it is "
                              "the pooled text width plus addition_time_embed_dim per micro-conditioning number",
                              where="projection_class_embeddings_input_dim",
                              expected=f"> {time_dim}", found=input_dim)

    def _check_size(self) -> None:
        """Counts and widths within latentdiff.limits, and a buildable parameter count (before any module)."""
        structure.check_levels(self.channels)
        structure.check_counts([
            ("layers_per_level", self.layers_per_level, limits.MAX_LAYERS_PER_LEVEL),
            ("transformer_depth", self.transformer_depth, limits.MAX_TRANSFORMER_DEPTH),
            ("attention_heads", self.attention_heads, limits.MAX_HEADS),
            ("cross_attention_dim", self.cross_attention_dim, limits.MAX_CHANNELS),
            ("time_embedding_dim", self.time_embedding_dim, limits.MAX_CHANNELS),
            ("in_channels", self.in_channels, limits.MAX_CHANNELS),
            ("out_channels", self.out_channels, limits.MAX_CHANNELS),
            ("num_class_embeds", self.num_class_embeds, limits.MAX_VOCAB),
            ("addition_time_embed_dim", self.addition_time_embed_dim, limits.MAX_CHANNELS),
            ("projection_class_embeddings_input_dim", self.projection_class_embeddings_input_dim,
             limits.MAX_CHANNELS)])
        estimate = structure.estimate_unet_parameters(
            self.channels, self.per_level(self.layers_per_level),
            attention=[self.has_attention(i) for i in range(len(self.channels))],
            transformer_depth=self.per_level(self.transformer_depth), context_dim=self.cross_attention_dim)
        if self.projection_class_embeddings_input_dim:  # the add embedding's Linear-SiLU-Linear
            temb = self.time_embedding_dim or 4 * self.channels[0]
            estimate += (self.projection_class_embeddings_input_dim + temb) * temb
        structure.check_parameters(estimate, what="this UNet", key="channels")

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


# The config of a network built on the UNet's trunk: UNetConfig, or a config that extends it (ControlNetConfig)
TrunkConfigT = TypeVar("TrunkConfigT", bound=UNetConfig)


class UNetTrunk(ModelMixin[TrunkConfigT]):
    """What the UNet shares with its ControlNet (Zhang et al. 2023, which copies this half of the UNet): conv_in, the
    time / class / text_time embeddings, the down levels and the mid level, under diffusers' names."""

    def __init__(self, config: TrunkConfigT):
        super().__init__(config)
        cfg, ch, n = config, config.channels, len(config.channels)
        layers, resnet, attend = cfg.per_level(cfg.layers_per_level), self.level_resnet(), self.level_attend
        temb = cfg.time_embedding_dim or 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.class_embedding = nn.Embedding(cfg.num_class_embeds, temb) if cfg.num_class_embeds else None
        # diffusers' name for the text_time MLP (add_embedding.linear_1 / linear_2); its sinusoids have no weights
        # (validate(): text_time has its input width, and only text_time has one)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb) \
            if cfg.projection_class_embeddings_input_dim else None
        self.down_blocks = nn.ModuleList(
            DownLevel(ch[max(lvl - 1, 0)], ch[lvl], layers=layers[lvl], resnet=resnet,
                      attend=attend(lvl) if cfg.attention_levels[lvl] else None,
                      downsample=lvl < n - 1, padding=cfg.downsample_padding) for lvl in range(n))
        mid_resnet = partial(resnet, output_scale_factor=cfg.mid_block_scale_factor)
        self.mid_block = None if cfg.mid_block == "none" else MidLevel(
            ch[-1], resnet=mid_resnet, attend=attend(n - 1) if cfg.mid_block == "transformer" else None)

    def level_resnet(self) -> Callable[..., ResnetBlock]:
        """(in_channels, out_channels) -> the ResnetBlock every level of this network is built of."""
        cfg = self.config
        return partial(_resnet, temb=cfg.time_embedding_dim or 4 * cfg.channels[0], groups=cfg.norm_num_groups,
                       eps=cfg.norm_eps, dropout=cfg.dropout)

    def level_attend(self, level: int) -> Attend:
        """channels -> the SpatialTransformer of level `level` (its heads and depth)."""
        cfg = self.config
        heads, depth = cfg.per_level(cfg.attention_heads)[level], cfg.per_level(cfg.transformer_depth)[level]
        return partial(_transformer, cfg, heads=heads, depth=depth)

    def embed(self, x: torch.Tensor, t: torch.Tensor | float | int, class_labels: torch.Tensor | None,
              added_cond: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """SiLU(time embedding (+ class embedding) (+ text_time embedding)), (B, temb), in x's dtype: every
        ResnetBlock projects the activated embedding, so it is activated once here rather than once per block.
        Inputs already checked."""
        t_features = timestep_embedding(timestep_batch(t, x), self.config.channels[0],
                                        flip_sin_to_cos=self.config.flip_sin_to_cos, freq_shift=self.config.freq_shift)
        emb = self.time_embedding(to_dtype(t_features, x.dtype))
        if self.class_embedding is not None:
            emb = emb + to_dtype(self.class_embedding(class_labels), emb.dtype)
        if self.add_embedding is not None and added_cond is not None:
            emb = emb + self.add_embedding(self._text_time_features(added_cond, emb.dtype))
        return F.silu(emb)

    def _text_time_features(self, added_cond: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """(B, P + K * addition_time_embed_dim): the pooled text embedding, then the sinusoids of each of the K
        numbers in order (computed in fp32, as the timestep's: pixel sizes up to thousands need the precision)."""
        cfg = self.config
        text, ids = added_cond["text_embeds"], added_cond["time_ids"]
        assert cfg.addition_time_embed_dim is not None  # validate(): text_time has its widths
        ids = ids if ids.device == text.device else ids.to(device=text.device)
        features = timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim,
                                      flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        features = features.reshape(text.shape[0], -1)
        return torch.cat([to_dtype(text, dtype), to_dtype(features, dtype)], dim=-1)

    def _check_added_cond(self, added_cond: Any, batch: int) -> None:
        """text_time: added_cond holds "text_embeds" (B, P) and "time_ids" (B, K) with P + K * time width equal to
        the add embedding's input; no text_time: no added_cond. InputError naming what is missing or off."""
        cfg = self.config
        if cfg.addition_embed_type is None:
            if added_cond is not None:
                raise InputError("this UNet has no additional embedding (addition_embed_type is None): pass no "
                                 "added_cond", where="added_cond", expected=None, found=describe_cond(added_cond))
            return
        time_dim, input_dim = cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim
        assert time_dim is not None and input_dim is not None  # validate()
        expected = (f'{{"text_embeds": ({batch}, P), "time_ids": ({batch}, K)}} with P + K * {time_dim} == '
                    f"{input_dim} (SDXL base: P 1280, K 6 = original size, crop top-left, target size)")
        if not isinstance(added_cond, Mapping):
            raise InputError("this UNet takes SDXL micro-conditioning (addition_embed_type 'text_time'): pass "
                             "added_cond with the pooled text embedding and the time ids", where="added_cond",
                             expected=expected, found=describe_cond(added_cond))
        missing = [key for key in TEXT_TIME_KEYS if key not in added_cond]
        if missing:
            raise InputError(f"added_cond lacks {', '.join(missing)}", where=f"added_cond[{missing[0]!r}]",
                             expected=expected, found=describe_cond(added_cond))
        unknown = sorted(str(key) for key in added_cond if key not in TEXT_TIME_KEYS)
        if unknown:  # e.g. IP-Adapter's image_embeds, or a misspelt key: not silently ignored
            raise InputError(f"added_cond has entries this UNet does not read: {', '.join(unknown)}",
                             where=f"added_cond[{unknown[0]!r}]", expected=expected,
                             found=describe_cond(added_cond))
        text, ids = added_cond["text_embeds"], added_cond["time_ids"]
        for key, value in (("text_embeds", text), ("time_ids", ids)):
            if not (isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape[0] == batch):
                raise InputError(f"added_cond[{key!r}] must be one row per sample", where=f"added_cond[{key!r}]",
                                 expected=expected, found=shape_of(value))
        if not text.is_floating_point():
            raise InputError("added_cond['text_embeds'] must be floating point", where="added_cond['text_embeds']",
                             expected=f"a float tensor: {expected}", found=text.dtype)
        if ids.is_complex() or ids.dtype == torch.bool:
            raise InputError("added_cond['time_ids'] must hold real numbers", where="added_cond['time_ids']",
                             expected=f"a real (float or integer) tensor: {expected}", found=ids.dtype)
        width = text.shape[1] + ids.shape[1] * time_dim
        if width != input_dim:
            raise InputError(f"added_cond widths give {text.shape[1]} + {ids.shape[1]} * {time_dim} = {width} "
                             f"features, not the add embedding's {input_dim}",
                             where="added_cond", expected=expected,
                             found={"text_embeds": shape_of(text), "time_ids": shape_of(ids)})

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
        return upsample_sizes((x.shape[-2], x.shape[-1]), levels=len(cfg.channels),
                              downsample_padding=cfg.downsample_padding)


@COMPONENTS.register("unet")
class UNet2DConditional(UNetTrunk[UNetConfig]):
    """eps_theta(x_t, t, context): the LDM / Stable Diffusion denoiser (diffusers UNet2DConditionModel layout)."""

    config_class = UNetConfig
    diffusers_class_name = "UNet2DConditionModel"
    diffusers_config = UNET_CONDITIONAL

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        cfg, ch, n = config, config.channels, len(config.channels)
        layers = cfg.per_level(cfg.layers_per_level)
        self.up_blocks = nn.ModuleList(
            UpLevel(ch[min(lvl + 1, n - 1)], ch[lvl], ch[max(lvl - 1, 0)], layers=layers[lvl] + 1,
                    resnet=self.level_resnet(), attend=self.level_attend(lvl) if cfg.attention_levels[lvl] else None,
                    upsample=lvl > 0)
            for lvl in reversed(range(n)))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, *,
                added_cond: Mapping[str, torch.Tensor] | None = None,
                residuals: Residuals | None = None, cache: DeepCacheState | None = None,
                freeu: FreeU | None = None) -> torch.Tensor:
        """x: (B, in_channels, H, W); t: number, 0-d, (1,) or (B,); context: (B, M, cross_attention_dim);
        class_labels: (B,) integers; added_cond (addition_embed_type "text_time" only, diffusers'
        added_cond_kwargs): {"text_embeds": (B, P) pooled text embedding, "time_ids": (B, K) micro-conditioning
        numbers}; residuals: what ControlNets / T2I-Adapters add (`residuals.Residuals`); cache: a DeepCache run
        (`deep_cache.DeepCacheState`: a full pass stores, a shallow pass reuses the deep features); freeu: FreeU's
        factors (`freeu.FreeU`) -> (B, out_channels, H, W), the prediction (eps, v or x0, as trained)."""
        upsample_sizes = self._check_inputs(x, t, context, class_labels)
        self._check_added_cond(added_cond, x.shape[0])
        emb = self.embed(x, t, class_labels, added_cond)
        h = run_levels(self, self.conv_in(x), emb, context, upsample_sizes, mid_args=(emb, context),
                       residuals=residuals, cache=cache, freeu=freeu)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


def _resnet(in_channels: int, out_channels: int, *, temb: int, groups: int, eps: float, dropout: float,
            output_scale_factor: float = 1.0) -> ResnetBlock:
    return ResnetBlock(in_channels, out_channels, temb_channels=temb, groups=groups, eps=eps, dropout=dropout,
                       output_scale_factor=output_scale_factor)


def _transformer(cfg: UNetConfig, channels: int, *, heads: int, depth: int) -> SpatialTransformer:
    # heads * (channels // heads) == channels: validate() checked the division
    return SpatialTransformer(channels, heads, channels // heads, depth=depth, context_dim=cfg.cross_attention_dim,
                              use_linear=cfg.use_linear_projection, groups=cfg.norm_num_groups,
                              upcast=cfg.upcast_attention)


def describe_cond(value: Any) -> Any:
    """What an InputError reports for added_cond: each entry's shape, None, or the value's type."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): shape_of(v) for k, v in value.items()}
    return describe(value)


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
    elif not is_real(t):
        raise InputError("t must be a number or a tensor", where="t", expected="int | float | Tensor",
                         found=describe(t))


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
        height, width = sizes[-1]
        sizes.append(((height + 1) // 2, (width + 1) // 2) if pad else (height // 2, width // 2))
    if min(sizes[-1]) < 1:
        raise InputError(f"latent too small for {n} levels", where="x", expected=f"H, W >= {2 ** (n - 1)}",
                         found=size)
    # diffusers passes explicit sizes to every up level as soon as one side is not a multiple of 2^(L-1)
    odd = any(s % 2 ** (n - 1) for s in size)
    return [sizes[n - 2 - i] if odd and i < n - 1 else None for i in range(n)]
