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
from typing import Any, Mapping

from ..errors import CheckpointError
from .keymap import Keep, Nest, Rename, Reshape, Split

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


def self_attention_table(heads: int) -> tuple:
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
    """What the key layout and the diffusers config of an original UNet depend on."""

    in_channels: int
    out_channels: int
    channels: tuple[int, ...]           # block_out_channels: width per resolution level
    layers_per_level: tuple[int, ...]   # ResBlocks per down level (up levels have one more)
    attention: tuple[str, ...]          # per level: "none" | "transformer" (SpatialTransformer) | "self" (AttentionBlock)
    mid_attention: str                  # "transformer" | "self"
    heads: tuple[int, ...]              # attention heads per level; the middle block uses heads[-1]
    transformer_depth: tuple[int, ...] = ()  # BasicTransformerBlocks per level; the middle block uses [-1]
    cross_attention_dim: int | None = None
    use_linear_projection: bool = False
    num_class_embeds: int | None = None              # label_emb = nn.Embedding (class / noise-level id)
    projection_class_embeddings_input_dim: int | None = None  # label_emb = Sequential(Linear, SiLU, Linear)
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

    # ---- the key table ----------------------------------------------------------------------------------
    def attention_table(self, level: int | None) -> tuple:
        if self.conditional:
            return SPATIAL_TRANSFORMER
        heads = self.heads[-1 if level is None else level]
        return self_attention_table(heads if self.legacy_qkv_order else 1)

    def resampler(self, src: str, dst: str) -> tuple:
        """A down/upsampler: a strided conv (`op` / `conv`), or with resblock_updown a ResBlock."""
        if self.resample == "resnet":
            return (Nest(src, dst, RESNET),)
        return (Rename(src + "{p}", dst + "conv.{p}"),)

    def keymap(self) -> tuple:
        """Original (without `model.diffusion_model.`) -> diffusers keys; `invert()` it for the way back."""
        rules: list = [
            Rename("time_embed.0.{p}", "time_embedding.linear_1.{p}"),
            Rename("time_embed.2.{p}", "time_embedding.linear_2.{p}"),
            Rename("input_blocks.0.0.{p}", "conv_in.{p}"),
            Rename("out.0.{p}", "conv_norm_out.{p}"),
            Rename("out.2.{p}", "conv_out.{p}"),
        ]
        if self.num_class_embeds is not None:
            rules.append(Rename("label_emb.weight", "class_embedding.weight"))
        if self.projection_class_embeddings_input_dim is not None:
            rules += [Rename("label_emb.0.0.{p}", "class_embedding.linear_1.{p}"),
                      Rename("label_emb.0.2.{p}", "class_embedding.linear_2.{p}")]
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

    # ---- diffusers config.json ------------------------------------------------------------------------
    def to_diffusers_config(self) -> dict[str, Any]:
        layers = _compact(self.layers_per_level)
        common = {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "block_out_channels": list(self.channels), "layers_per_block": layers,
            "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
            "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
            "resnet_time_scale_shift": self.resnet_time_scale_shift, "time_embedding_type": "positional",
            "time_embedding_dim": self.time_embedding_dim, "num_class_embeds": self.num_class_embeds,
            "sample_size": self.sample_size, "dropout": 0.0,
        }
        if self.conditional:
            down = ["CrossAttnDownBlock2D" if a != "none" else "DownBlock2D" for a in self.attention]
            return {
                "_class_name": "UNet2DConditionModel", **common,
                "down_block_types": down,
                "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
                "mid_block_type": "UNetMidBlock2DCrossAttn",
                "attention_head_dim": _compact(self.heads),  # diffusers' name; for this class it is a head count
                "transformer_layers_per_block": _compact(self.transformer_depth),
                "cross_attention_dim": self.cross_attention_dim,
                "use_linear_projection": self.use_linear_projection,
                "upcast_attention": self.upcast_attention,
                "only_cross_attention": self.only_cross_attention,
                "class_embed_type": "projection" if self.projection_class_embeddings_input_dim else None,
                "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
            }
        resnet = self.resample == "resnet"
        down = ["AttnDownBlock2D" if a != "none" else ("ResnetDownsampleBlock2D" if resnet else "DownBlock2D")
                for a in self.attention]
        up = ["AttnUpBlock2D" if a != "none" else ("ResnetUpsampleBlock2D" if resnet else "UpBlock2D")
              for a in reversed(self.attention)]
        widths = [c // h for c, h in zip(self.channels, self.heads)]  # UNet2DModel: width per head
        if any(c % h for c, h in zip(self.channels, self.heads)):
            raise CheckpointError("attention heads do not divide the channels", where="heads",
                                  found=(self.channels, self.heads))
        return {
            "_class_name": "UNet2DModel", **common,
            "down_block_types": down, "up_block_types": up, "mid_block_type": "UNetMidBlock2D",
            # a list (one width per level, e.g. LSUN churches' 8 heads everywhere) loads in latentdiff's UNet2D;
            # diffusers' UNet2DModel takes only one width, so it cannot build such a model
            "attention_head_dim": _compact(widths), "add_attention": True,
            # the middle AttentionBlock has its GroupNorm; diffusers drops it with scale-shift norms unless set
            "attn_norm_num_groups": 32 if self.resnet_time_scale_shift == "scale_shift" else None,
            "downsample_type": "resnet" if resnet else "conv", "upsample_type": "resnet" if resnet else "conv",
            "class_embed_type": None,
        }

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], *, source: str = "unet config") -> "UNetArch":
        """The inverse of `to_diffusers_config` (diffusers defaults for absent keys)."""
        get = config.get
        down = list(_need(config, "down_block_types", source))
        channels = tuple(get("block_out_channels", (320, 640, 1280, 1280) if "CrossAttnDownBlock2D" in down
                             else (224, 448, 672, 896)))
        levels = len(channels)
        conditional = any("CrossAttn" in t for t in down) or get("_class_name") == "UNet2DConditionModel"
        attention = tuple(("transformer" if conditional else "self") if "Attn" in t else "none" for t in down)
        layers = _per_level(get("layers_per_block", 2), levels, "layers_per_block", source)
        head_dim = _per_level(get("attention_head_dim", 8), levels, "attention_head_dim", source)
        if conditional:
            if get("num_attention_heads") is not None:
                raise CheckpointError("num_attention_heads is not used by SD/LDM UNets", where=source,
                                      found=get("num_attention_heads"))
            heads = head_dim
        else:
            heads = tuple(c // w for c, w in zip(channels, head_dim))
        kind = get("class_embed_type")
        if kind not in (None, "projection"):
            raise CheckpointError("unsupported class_embed_type for an original checkpoint", where=source,
                                  expected="None or 'projection'", found=kind)
        resample = "resnet" if get("downsample_type") == "resnet" else "conv"
        return cls(
            in_channels=get("in_channels", 4), out_channels=get("out_channels", 4), channels=channels,
            layers_per_level=layers, attention=attention,
            mid_attention="transformer" if conditional else "self", heads=heads,
            transformer_depth=_per_level(get("transformer_layers_per_block", 1), levels,
                                         "transformer_layers_per_block", source),
            cross_attention_dim=get("cross_attention_dim", 1280) if conditional else None,
            use_linear_projection=bool(get("use_linear_projection", False)),
            num_class_embeds=get("num_class_embeds"),
            projection_class_embeddings_input_dim=get("projection_class_embeddings_input_dim") if kind else None,
            time_embedding_dim=get("time_embedding_dim"),
            resnet_time_scale_shift=get("resnet_time_scale_shift", "default"), resample=resample,
            upcast_attention=bool(get("upcast_attention", False)),
            only_cross_attention=bool(get("only_cross_attention", False)), sample_size=get("sample_size"))


def _compact(values: tuple[int, ...]) -> int | list[int]:
    """One value for all levels as an int (diffusers' usual form), else a list."""
    return values[0] if len(set(values)) == 1 else list(values)


def _per_level(value: Any, levels: int, name: str, source: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * levels
    if isinstance(value, (list, tuple)) and len(value) == levels:
        return tuple(value)
    raise CheckpointError(f"{name} needs an int or one value per level", where=source, expected=levels, found=value)


def _need(config: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in config:
        raise CheckpointError(f"config lacks {key!r}", where=source)
    return config[key]


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
