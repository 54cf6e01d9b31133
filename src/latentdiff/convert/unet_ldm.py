"""The denoising UNet of CompVis' `openaimodel.UNetModel` (`model.diffusion_model.*`) <-> diffusers' UNets.

An original UNet numbers its blocks flatly: `input_blocks.N` (conv_in, then per level `layers` ResBlocks,
each optionally followed by an attention block at sub-index 1, then a downsampler), `middle_block.{0,1,2}`,
`output_blocks.N` (per level, lowest resolution first, `layers + 1` ResBlocks, optional attention, the
level's upsampler last). diffusers nests the same modules as down_blocks.L.resnets.J etc. The index maps
follow from a small architecture description (`UNetArch`), never from SD 1.5's numbers.

Attention comes in two kinds: SD / text-to-image LDMs use `SpatialTransformer` (diffusers
UNet2DConditionModel; same sub-module names on both sides); unconditional LDMs use the older
`AttentionBlock` with one fused 1-D conv `qkv` whose rows are interleaved per head (diffusers UNet2DModel
with separate to_q/to_k/to_v linears), so converting it needs the head count.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..models.diffusers_tables import UNET_2D, UNET_CONDITIONAL
from ..models.unet import UNetConfig
from ..models.unet2d import ResampleType, UNet2DConfig
from .keymap import Keep, Nest, Rename, Reshape, Rule, Split

# ---- sub-tables: original name -> diffusers name -----------------------------------------------------------
RESNET = (  # ResBlock (in_layers = GroupNorm, SiLU, conv; out_layers = GroupNorm, SiLU, Dropout, conv)
    Rename("in_layers.0.{p}", "norm1.{p}"),
    Rename("in_layers.2.{p}", "conv1.{p}"),
    Rename("emb_layers.1.{p}", "time_emb_proj.{p}"),
    Rename("out_layers.0.{p}", "norm2.{p}"),
    Rename("out_layers.3.{p}", "conv2.{p}"),
    Rename("skip_connection.{p}", "conv_shortcut.{p}"),
)
BASIC_TRANSFORMER = (  # identical names on both sides; listed so that foreign additions are caught
    Keep("attn{n:1|2}.to_{x:q|k|v}.weight"),
    Keep("attn{n:1|2}.to_out.0.{p}"),
    Keep("norm{n:1|2|3}.{p}"),
    Keep("ff.net.0.proj.{p}"),
    Keep("ff.net.2.{p}"),
)
SPATIAL_TRANSFORMER = (
    Keep("norm.{p}"),
    Keep("proj_in.{p}"),
    Keep("proj_out.{p}"),
    Nest("transformer_blocks.{i}.", "transformer_blocks.{i}.", BASIC_TRANSFORMER),
)


def self_attention_table(heads: int) -> tuple[Rule, ...]:
    """LDM AttentionBlock: GroupNorm, fused 1-D conv qkv (3C, C, 1), 1-D conv proj_out (C, C, 1)."""
    return (
        Rename("norm.{p}", "group_norm.{p}"),
        Split("qkv.weight", into=("to_q.weight", "to_k.weight", "to_v.weight"), heads=heads, ndim=(3, 2)),
        Split("qkv.bias", into=("to_q.bias", "to_k.bias", "to_v.bias"), heads=heads),
        Reshape("proj_out.weight", "to_out.0.weight", ndim=(3, 2)),
        Rename("proj_out.bias", "to_out.0.bias"),
    )


ATTENTION_KINDS = ("none", "transformer", "self")


@dataclasses.dataclass(frozen=True)
class UNetArch:
    """What the key layout of an original UNet depends on; `to_config()` is latentdiff's config of its model."""

    in_channels: int
    out_channels: int
    channels: tuple[int, ...]           # block_out_channels: width per resolution level
    layers_per_level: tuple[int, ...]   # ResBlocks per down level (up levels have one more)
    attention: tuple[str, ...]          # per level: "none", "transformer" (SpatialTransformer), "self" (AttentionBlock)
    mid_attention: str                  # "transformer" | "self"
    heads: tuple[int, ...]              # attention heads per level; the middle block uses heads[-1]
    transformer_depth: tuple[int, ...] = ()  # BasicTransformerBlocks per level; the middle block uses [-1]
    cross_attention_dim: int | None = None
    use_linear_projection: bool = False
    num_class_embeds: int | None = None              # label_emb = nn.Embedding (class / noise-level id)
    projection_class_embeddings_input_dim: int | None = None  # label_emb = Sequential(Linear, SiLU, Linear)
    # SDXL's micro-conditioning: with "text_time", label_emb.0 (projection_class_embeddings_input_dim wide) is
    # diffusers' add_embedding, not a class embedding; addition_time_embed_dim has no weights (sinusoids)
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    time_embedding_dim: int | None = None            # None: 4 * channels[0]
    resnet_time_scale_shift: str = "default"         # "scale_shift": use_scale_shift_norm
    resample: str = "conv"                           # "resnet": resblock_updown (ResBlocks resample)
    legacy_qkv_order: bool = True                    # AttentionBlock's QKVAttentionLegacy (rows per head)
    upcast_attention: bool = False
    only_cross_attention: bool = False
    sample_size: int | None = None

    def __post_init__(self):
        n = len(self.channels)
        for name in ("layers_per_level", "attention", "heads"):
            if len(getattr(self, name)) != n:
                raise CheckpointError(f"UNet description: {name} needs one entry per level", where=name,
                                      expected=n, found=getattr(self, name))
        if not self.transformer_depth:
            object.__setattr__(self, "transformer_depth", (1,) * n)
        kinds = set(self.attention) | {self.mid_attention}
        if not kinds <= set(ATTENTION_KINDS) or self.mid_attention == "none":
            raise CheckpointError("UNet description: unknown attention kind", where="attention",
                                  expected="none/transformer/self per level; transformer/self in the middle",
                                  found=(self.attention, self.mid_attention))
        if {"transformer", "self"} <= kinds:
            raise CheckpointError("a UNet mixing SpatialTransformer and AttentionBlock is not supported",
                                  where="attention", found=(self.attention, self.mid_attention))

    @property
    def conditional(self) -> bool:
        """True: SpatialTransformer blocks (diffusers UNet2DConditionModel); False: UNet2DModel."""
        return self.mid_attention == "transformer"

    @property
    def text_time(self) -> bool:
        """True: SDXL's text_time additional embedding (label_emb.0 is diffusers' add_embedding)."""
        return self.addition_embed_type == "text_time"

    # ---- the key table ----------------------------------------------------------------------------------
    def attention_table(self, level: int | None) -> tuple[Rule, ...]:
        if self.conditional:
            return SPATIAL_TRANSFORMER
        heads = self.heads[-1 if level is None else level]
        return self_attention_table(heads if self.legacy_qkv_order else 1)

    def resampler(self, src: str, dst: str) -> tuple[Rule, ...]:
        """A down/upsampler: a strided conv (`op` / `conv`), or with resblock_updown a ResBlock."""
        if self.resample == "resnet":
            return (Nest(src, dst, RESNET),)
        return (Rename(src + "{p}", dst + "conv.{p}"),)

    def keymap(self) -> tuple[Rule, ...]:
        """Original (without `model.diffusion_model.`) -> diffusers keys; `invert()` it for the way back."""
        rules: list[Rule] = [
            Rename("time_embed.0.{p}", "time_embedding.linear_1.{p}"),
            Rename("time_embed.2.{p}", "time_embedding.linear_2.{p}"),
            Rename("input_blocks.0.0.{p}", "conv_in.{p}"),
            Rename("out.0.{p}", "conv_norm_out.{p}"),
            Rename("out.2.{p}", "conv_out.{p}"),
        ]
        if self.num_class_embeds is not None:
            rules.append(Rename("label_emb.weight", "class_embedding.weight"))
        if self.projection_class_embeddings_input_dim is not None:
            # the same original Sequential holds either the text_time embedding (SDXL) or a projection class
            # embedding; the two are told apart by addition_embed_type, not by the file's keys
            target = "add_embedding" if self.text_time else "class_embedding"
            rules += [Rename("label_emb.0.0.{p}", target + ".linear_1.{p}"),
                      Rename("label_emb.0.2.{p}", target + ".linear_2.{p}")]
        levels = len(self.channels)
        n = 1
        for level in range(levels):
            attend = self.attention[level] != "none"
            for j in range(self.layers_per_level[level]):
                rules.append(Nest(f"input_blocks.{n}.0.", f"down_blocks.{level}.resnets.{j}.", RESNET))
                if attend:
                    rules.append(Nest(f"input_blocks.{n}.1.", f"down_blocks.{level}.attentions.{j}.",
                                      self.attention_table(level)))
                n += 1
            if level != levels - 1:
                src = f"input_blocks.{n}.0." + ("op." if self.resample == "conv" else "")
                rules += self.resampler(src, f"down_blocks.{level}.downsamplers.0.")
                n += 1
        rules += [Nest("middle_block.0.", "mid_block.resnets.0.", RESNET),
                  Nest("middle_block.1.", "mid_block.attentions.0.", self.attention_table(None)),
                  Nest("middle_block.2.", "mid_block.resnets.1.", RESNET)]
        n = 0
        for up in range(levels):
            level = levels - 1 - up
            attend = self.attention[level] != "none"
            blocks = self.layers_per_level[level] + 1
            for j in range(blocks):
                rules.append(Nest(f"output_blocks.{n}.0.", f"up_blocks.{up}.resnets.{j}.", RESNET))
                if attend:
                    rules.append(Nest(f"output_blocks.{n}.1.", f"up_blocks.{up}.attentions.{j}.",
                                      self.attention_table(level)))
                if j == blocks - 1 and up != levels - 1:
                    sub = 2 if attend else 1
                    src = f"output_blocks.{n}.{sub}." + ("conv." if self.resample == "conv" else "")
                    rules += self.resampler(src, f"up_blocks.{up}.upsamplers.0.")
                n += 1
        return tuple(rules)

    # ---- latentdiff's config (the diffusers config.json is the model's table's: models.diffusers_tables) ------
    def to_config(self) -> UNetConfig | UNet2DConfig:
        """The config of latentdiff's UNet for this layout: UNetConfig (SpatialTransformers) or UNet2DConfig."""
        common: dict[str, Any] = dict(
            in_channels=self.in_channels, out_channels=self.out_channels, sample_size=self.sample_size,
            channels=self.channels, attention_levels=tuple(a != "none" for a in self.attention),
            time_embedding_dim=self.time_embedding_dim, num_class_embeds=self.num_class_embeds)
        if self.conditional:
            return UNetConfig(**common, layers_per_level=_compact(self.layers_per_level),
                              attention_heads=_compact(self.heads), transformer_depth=_compact(self.transformer_depth),
                              cross_attention_dim=self.cross_attention_dim,
                              use_linear_projection=self.use_linear_projection, upcast_attention=self.upcast_attention,
                              **self._addition_embed())
        if any(c % h for c, h in zip(self.channels, self.heads, strict=True)):
            raise CheckpointError("attention heads do not divide the channels", where="heads",
                                  found=(self.channels, self.heads))
        if len(set(self.layers_per_level)) != 1:
            raise CheckpointError("a UNet without SpatialTransformers takes one layer count for every level",
                                  where="layers_per_level", found=self.layers_per_level)
        resample: ResampleType = "resnet" if self.resample == "resnet" else "conv"
        # one head width per level where they differ (e.g. LSUN churches' 8 heads everywhere): latentdiff's UNet2D
        # builds it; diffusers' UNet2DModel takes only one width
        return UNet2DConfig(**common, layers_per_level=self.layers_per_level[0],
                            attention_head_dim=_compact(tuple(c // h for c, h in
                                                              zip(self.channels, self.heads, strict=True))),
                            time_scale_shift=self.resnet_time_scale_shift == "scale_shift",
                            downsample_type=resample, upsample_type=resample)

    def _addition_embed(self) -> dict[str, Any]:
        """UNetConfig's text_time fields (empty without it: its projection width is then a class embedding's)."""
        if self.addition_embed_type is None:
            return {}
        return {"addition_embed_type": self.addition_embed_type,
                "addition_time_embed_dim": self.addition_time_embed_dim,
                "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim}

    def foreign_keys(self) -> dict[str, Any]:
        """What an original UNet may have that latentdiff's UNetConfig does not build, as diffusers spells it:
        kept in the part config so such a file still splits (building its model then names the key)."""
        if not self.conditional:
            return {}
        extra: dict[str, Any] = {}
        if self.only_cross_attention:
            extra["only_cross_attention"] = True
        if self.projection_class_embeddings_input_dim and not self.text_time:
            extra.update(class_embed_type="projection",
                         projection_class_embeddings_input_dim=self.projection_class_embeddings_input_dim)
        if self.resnet_time_scale_shift != "default":
            extra["resnet_time_scale_shift"] = self.resnet_time_scale_shift
        return extra

    def to_diffusers_config(self) -> dict[str, Any]:
        """The part config: the diffusers config.json of `to_config()`'s model, with `foreign_keys()`."""
        try:
            config = self.to_config()
        except ConfigError as e:  # a layout latentdiff's UNets cannot build with the original conventions
            raise CheckpointError(f"unet: {e.message}", where=e.where, expected=e.expected, found=e.found) from None
        table = UNET_CONDITIONAL if self.conditional else UNET_2D
        return {"_class_name": table.class_name, **table.to_file(config), **self.foreign_keys()}

    @classmethod
    def from_config(cls, config: UNetConfig | UNet2DConfig, **foreign: Any) -> UNetArch:
        """The layout of latentdiff's UNet for `config` (`foreign`: what `foreign_keys` names, as fields)."""
        if isinstance(config, UNetConfig) and config.addition_embed_type is not None:
            if foreign.get("projection_class_embeddings_input_dim") is not None:
                # both would be label_emb.0 in the original layout
                raise CheckpointError("a UNet with both a text_time embedding and a projection class embedding "
                                      "has no original single-file layout", where="class_embed_type",
                                      expected=None, found="projection")
            foreign = {**foreign, "addition_embed_type": config.addition_embed_type,
                       "addition_time_embed_dim": config.addition_time_embed_dim,
                       "projection_class_embeddings_input_dim": config.projection_class_embeddings_input_dim}
        n = len(config.channels)
        common: dict[str, Any] = dict(
            in_channels=config.in_channels, out_channels=config.out_channels, channels=config.channels,
            time_embedding_dim=config.time_embedding_dim, num_class_embeds=config.num_class_embeds,
            sample_size=config.sample_size)
        if isinstance(config, UNetConfig):
            return cls(**common, layers_per_level=config.per_level(config.layers_per_level),
                       attention=tuple("transformer" if a else "none" for a in config.attention_levels),
                       mid_attention="transformer", heads=config.per_level(config.attention_heads),
                       transformer_depth=config.per_level(config.transformer_depth),
                       cross_attention_dim=config.cross_attention_dim,
                       use_linear_projection=config.use_linear_projection,
                       upcast_attention=config.upcast_attention, **foreign)
        widths = [config.head_dim(level) or c for level, c in enumerate(config.channels)]  # None: one head
        return cls(**common, layers_per_level=(config.layers_per_level,) * n,
                   attention=tuple("self" if a else "none" for a in config.attention_levels), mid_attention="self",
                   heads=tuple(c // w for c, w in zip(config.channels, widths, strict=True)),
                   resnet_time_scale_shift="scale_shift" if config.time_scale_shift else "default",
                   resample="resnet" if config.downsample_type == "resnet" else "conv", **foreign)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], *, source: str = "unet config") -> UNetArch:
        """The inverse of `to_diffusers_config`: through the model's table (diffusers defaults for absent keys)."""
        conditional = config.get("_class_name") == UNET_CONDITIONAL.class_name or (
            "_class_name" not in config and any("CrossAttn" in str(t) for t in config.get("down_block_types", ())))
        data, foreign = dict(config), {}
        if conditional:
            if data.get("only_cross_attention") is True:
                foreign["only_cross_attention"] = data.pop("only_cross_attention")
            if data.get("class_embed_type") == "projection":
                data.pop("class_embed_type")
                foreign["projection_class_embeddings_input_dim"] = data.pop("projection_class_embeddings_input_dim",
                                                                            None)
            if data.get("resnet_time_scale_shift", "default") != "default":
                foreign["resnet_time_scale_shift"] = data.pop("resnet_time_scale_shift")
        config_class: type[UNetConfig | UNet2DConfig]
        table, config_class = (UNET_CONDITIONAL, UNetConfig) if conditional else (UNET_2D, UNet2DConfig)
        try:
            typed = table.to_config({**data, "_class_name": table.class_name}, config_class, source=source)
        except ConfigError as e:
            raise CheckpointError(f"unet config: {e.message}", where=e.where, expected=e.expected,
                                  found=e.found) from None
        return cls.from_config(typed, **foreign)


def _compact(values: tuple[int, ...]) -> int | tuple[int, ...]:
    """One value for all levels as an int (diffusers' usual form), else one per level."""
    return values[0] if len(set(values)) == 1 else tuple(values)


# ---- EMA: LitEma stores a copy of every parameter under its name with the dots removed ---------------------
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
UNET_PREFIX = "model.diffusion_model."


def ema_name(key: str) -> str:
    """`model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def select_ema(state: Mapping[str, Any], *, use_ema: bool, source: str) -> dict[str, Any]:
    """Resolve LDM's EMA copy: with `use_ema` the EMA tensors replace the live UNet weights under the
    live (dotted) names; without, the EMA copy is left out. The bookkeeping scalars stay (kept as extras)."""
    ema_keys = [k for k in state if k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING]
    if not ema_keys:
        return dict(state)
    live = [k for k in state if k.startswith(UNET_PREFIX)]
    by_flat = {ema_name(k): k for k in live}
    strays = [k for k in ema_keys if k not in by_flat]
    if strays or not live:
        raise CheckpointError("EMA weights that match no UNet weight (the dot-less EMA names are mapped back "
                              "through the live UNet's names)", where=source, found=strays[:50] or ema_keys[:50])
    out = {k: v for k, v in state.items() if k not in by_flat.values() and not k.startswith(EMA_PREFIX)}
    out.update({k: state[k] for k in EMA_BOOKKEEPING if k in state})
    missing = [k for k in live if ema_name(k) not in state]
    if use_ema and missing:
        raise CheckpointError("the EMA copy lacks some UNet weights", where=source, found=missing[:50])
    for flat, key in by_flat.items():
        out[key] = state[flat] if use_ema else state[key]
    return out
