"""The diffusers config.json tables of latentdiff's models, read by the engine in `diffusers_config`.

    UNET_CONDITIONAL   diffusers UNet2DConditionModel <-> unet.UNetConfig
    UNET_2D            diffusers UNet2DModel          <-> unet2d.UNet2DConfig
    AUTOENCODER_KL     diffusers AutoencoderKL        <-> autoencoder_kl.AutoencoderKLConfig
    VQ_MODEL           diffusers VQModel              <-> vq.VQModelConfig
    CONTROLNET         diffusers ControlNetModel      <-> controlnet.ControlNetConfig
    T2I_ADAPTER        diffusers T2IAdapter           <-> t2i_adapter.T2IAdapterConfig

Defaults are diffusers 0.42's __init__ signatures; the tests check them against the installed diffusers.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import is_int
from ..errors import ConfigError
from .diffusers_config import DiffusersConfigMap, as_list, key_at, per_level, square_sample_size


def _all_false(value: Any) -> bool:
    """False, or a list of False (one per level)"""
    return value is False or (isinstance(value, (list, tuple)) and not any(value))


def _block_name(name: Any) -> Any:
    # diffusers accepts "UNetRes"-prefixed aliases of the same blocks
    return name[len("UNetRes"):] if isinstance(name, str) and name.startswith("UNetRes") else name


def attention_levels_of(d: Mapping[str, Any], *, down: Mapping[bool, str], up: Mapping[bool, str],
                        source: str | None) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    """down_block_types -> (attention per level, block_out_channels). `down` / `up` name the block types without
    (False) and with (True) attention; the up blocks must mirror the down blocks."""
    names = [_block_name(b) for b in as_list(d, "down_block_types", source)]
    for i, name in enumerate(names):
        if name not in down.values():
            raise ConfigError(f"down block type {name!r} is not supported",
                              where=key_at(source, f"down_block_types[{i}]"), expected=sorted(down.values()),
                              found=name)
    levels = tuple(name == down[True] for name in names)
    mirror = [up[a] for a in reversed(levels)]
    if [_block_name(b) for b in as_list(d, "up_block_types", source)] != mirror:
        raise ConfigError("up_block_types must mirror down_block_types", where=key_at(source, "up_block_types"),
                          expected=mirror, found=d["up_block_types"])
    channels = as_list(d, "block_out_channels", source)
    if len(channels) != len(levels):
        raise ConfigError("block_out_channels needs one entry per down block",
                          where=key_at(source, "block_out_channels"),
                          expected=f"{len(levels)} entries (len(down_block_types))", found=channels)
    return levels, tuple(channels)


# ---- UNet2DConditionModel <-> UNetConfig -----------------------------------------------------------------
UNET_CONDITIONAL_DEFAULTS: dict[str, Any] = {
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
CROSS_DOWN = {True: "CrossAttnDownBlock2D", False: "DownBlock2D"}
CROSS_UP = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}
CROSS_MID: dict[str, str | None] = {"transformer": "UNetMidBlock2DCrossAttn", "resnet": "UNetMidBlock2D", "none": None}


def _cross_attention_dim(value: Any, n: int, source: str | None) -> int | None:
    """int, or per level: the same int everywhere, or None everywhere (no cross-attention)."""
    if value is None or is_int(value):
        return value
    if isinstance(value, (list, tuple)) and len(value) == n and len(set(value)) == 1 \
            and (value[0] is None or is_int(value[0])):
        return value[0]
    raise ConfigError("cross_attention_dim must be one int (or None) shared by every level",
                      where=key_at(source, "cross_attention_dim"), expected=f"int, or a list of {n} equal ints or None",
                      found=repr(value))


def _read_unet_conditional(d: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    levels, channels = attention_levels_of(d, down=CROSS_DOWN, up=CROSS_UP, source=source)
    n = len(levels)
    mid = {v: k for k, v in CROSS_MID.items()}
    if d["mid_block_type"] not in mid:
        raise ConfigError("mid block type is not supported", where=key_at(source, "mid_block_type"),
                          expected=list(CROSS_MID.values()), found=d["mid_block_type"])
    return {
        "sample_size": square_sample_size(d["sample_size"], source), "channels": channels,
        "attention_levels": levels, "layers_per_level": per_level(d, "layers_per_block", n, source),
        # diffusers' naming quirk: with num_attention_heads None, attention_head_dim holds the head *count*
        "attention_heads": per_level(d, "attention_head_dim", n, source),
        "transformer_depth": per_level(d, "transformer_layers_per_block", n, source),
        "cross_attention_dim": _cross_attention_dim(d["cross_attention_dim"], n, source),
        "mid_block": mid[d["mid_block_type"]],
        **_read_addition_embed(d, source),
    }


def _read_addition_embed(d: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    """SDXL's text_time embedding: its two widths are read only with it, as diffusers does. The other addition
    embeddings (Kandinsky's "text", "text_image", "image", "image_hint") are not built."""
    kind = d["addition_embed_type"]
    if kind is None:
        return {}
    if kind != "text_time":
        raise ConfigError("config key 'addition_embed_type' has a value latentdiff does not support",
                          where=key_at(source, "addition_embed_type"), expected=[None, "text_time"], found=repr(kind))
    return {"addition_embed_type": "text_time", "addition_time_embed_dim": d["addition_time_embed_dim"],
            "projection_class_embeddings_input_dim": d["projection_class_embeddings_input_dim"]}


def _write_unet_conditional(cfg: Any) -> dict[str, Any]:
    plain = cfg.to_dict()
    return {
        "sample_size": cfg.sample_size, "block_out_channels": plain["channels"],
        "down_block_types": [CROSS_DOWN[a] for a in cfg.attention_levels], "mid_block_type": CROSS_MID[cfg.mid_block],
        "up_block_types": [CROSS_UP[a] for a in reversed(cfg.attention_levels)],
        "layers_per_block": plain["layers_per_level"], "attention_head_dim": plain["attention_heads"],
        "transformer_layers_per_block": plain["transformer_depth"],
        # no cross-attention: one None per level (a bare None breaks diffusers' per-level indexing)
        "cross_attention_dim": cfg.cross_attention_dim if cfg.cross_attention_dim is not None
        else [None] * len(cfg.channels),
        "addition_embed_type": cfg.addition_embed_type, "addition_time_embed_dim": cfg.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": cfg.projection_class_embeddings_input_dim,
    }


UNET_CONDITIONAL = DiffusersConfigMap(
    class_name="UNet2DConditionModel", defaults=UNET_CONDITIONAL_DEFAULTS,
    same=("in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "downsample_padding",
          "mid_block_scale_factor", "dropout", "norm_num_groups", "norm_eps", "use_linear_projection",
          "num_class_embeds", "upcast_attention", "time_embedding_dim"),
    # keys diffusers implements at other values too; latentdiff implements only these (SD1.x/2.x, LDM)
    supported={
        "center_input_sample": False, "act_fn": ("silu", "swish"), "only_cross_attention": _all_false,
        "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
        "num_attention_heads": None,  # diffusers itself refuses it: heads come from attention_head_dim
        "dual_cross_attention": False, "class_embed_type": None,
        "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "time_embedding_act_fn": None,
        "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "attention_type": "default", "class_embeddings_concat": False,
    },
    # read only by block types (Simple*, ResnetDownsample*) or embeddings (text, projection ...) that the
    # checks above reject, so any value builds the same network
    inert=("resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
           "mid_block_only_cross_attention", "addition_embed_type_num_heads"),
    structural=("sample_size", "down_block_types", "mid_block_type", "up_block_types", "block_out_channels",
                "layers_per_block", "attention_head_dim", "transformer_layers_per_block", "cross_attention_dim",
                # text_time's widths mean something only with it (read and written together)
                "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"),
    read=_read_unet_conditional, write=_write_unet_conditional)


# ---- UNet2DModel <-> UNet2DConfig ------------------------------------------------------------------------
UNET_2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}
ATTN_DOWN = {True: "AttnDownBlock2D", False: "DownBlock2D"}
ATTN_UP = {True: "AttnUpBlock2D", False: "UpBlock2D"}
MID_BLOCK_2D = "UNetMidBlock2D"
# Blocks without attention that always resample with a ResnetBlock; the attention blocks follow down/upsample_type
RESNET_DOWN, RESNET_UP = "ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"
TIME_SCALE_SHIFT = {"default": False, "scale_shift": True}  # "spatial" (ResnetBlockCondNorm2D) is not implemented


def _resampling(d: dict[str, Any], key: str, type_key: str, resnet_block: str, plain: Mapping[bool, str],
                source: str | None) -> tuple[dict[str, Any], str]:
    """How the levels resample, as diffusers builds them: a `resnet_block` by ResnetBlock, an attention block by
    `d[type_key]` (None: conv), a plain block by conv; the level without a resampler (the last down / first up
    one) does not count. Returns `d` with `resnet_block` renamed to the plain block (attention_levels_of reads
    those) and the one resampling type; levels that differ are a ConfigError."""
    names = d[key]
    if not isinstance(names, (list, tuple)):
        return d, "conv"  # attention_levels_of reports it
    names = [_block_name(n) for n in names]
    skip = len(names) - 1 if key.startswith("down") else 0  # the level with no resampler
    kinds = {"resnet" if name == resnet_block else (d[type_key] or "conv") if name == plain[True] else "conv"
             for i, name in enumerate(names) if i != skip}
    if len(kinds) > 1:
        raise ConfigError(f"levels resample in different ways ({key} with {type_key}={d[type_key]!r}); "
                          "latentdiff builds one kind per direction", where=key_at(source, type_key),
                          expected=f"every level by conv, or every level by resnet ({resnet_block} / "
                                   f"{plain[True]} with {type_key}='resnet')", found=names)
    kind = kinds.pop() if kinds else (d[type_key] or "conv")
    return {**d, key: [plain[False] if n == resnet_block else n for n in names]}, kind


def _read_unet_2d(d: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    if d["resnet_time_scale_shift"] not in TIME_SCALE_SHIFT:
        raise ConfigError("resnet_time_scale_shift is not supported", where=key_at(source, "resnet_time_scale_shift"),
                          expected=list(TIME_SCALE_SHIFT), found=d["resnet_time_scale_shift"])
    scale_shift = TIME_SCALE_SHIFT[d["resnet_time_scale_shift"]]
    d, downsample_type = _resampling(dict(d), "down_block_types", "downsample_type", RESNET_DOWN, ATTN_DOWN, source)
    d, upsample_type = _resampling(d, "up_block_types", "upsample_type", RESNET_UP, ATTN_UP, source)
    levels, channels = attention_levels_of(d, down=ATTN_DOWN, up=ATTN_UP, source=source)
    if d["mid_block_type"] not in (MID_BLOCK_2D, None):
        # diffusers builds a UNetMidBlock2D for any other string: a file naming another block is not this model
        raise ConfigError("mid block type is not supported", where=key_at(source, "mid_block_type"),
                          expected=[MID_BLOCK_2D, None], found=d["mid_block_type"])
    if not is_int(d["layers_per_block"]):
        raise ConfigError("UNet2DModel takes one layers_per_block for every level", where=key_at(source,
                          "layers_per_block"), expected="int", found=repr(d["layers_per_block"]))
    return {
        "sample_size": square_sample_size(d["sample_size"], source), "channels": channels,
        "attention_levels": levels,
        # diffusers' UNetMidBlock2D gives its attention no GroupNorm with scale-shift norms unless
        # attn_norm_num_groups is set (a rule meant for "spatial" norms that catches "scale_shift" too)
        "mid_attention_norm": not scale_shift or d["attn_norm_num_groups"] is not None,
        "attn_norm_num_groups": d["attn_norm_num_groups"],
        "time_scale_shift": scale_shift, "downsample_type": downsample_type, "upsample_type": upsample_type,
        # diffusers reads num_class_embeds only without a class_embed_type
        "num_class_embeds": d["num_class_embeds"] if d["class_embed_type"] is None else None,
        "mid_block": d["mid_block_type"] is not None,
    }


def _write_unet_2d(cfg: Any) -> dict[str, Any]:
    """Per-level head widths are written as a list, which diffusers' UNet2DModel cannot build (it takes one
    int): such a folder loads in latentdiff only."""
    down = {**ATTN_DOWN, False: RESNET_DOWN} if cfg.downsample_type == "resnet" else ATTN_DOWN
    up = {**ATTN_UP, False: RESNET_UP} if cfg.upsample_type == "resnet" else ATTN_UP
    attn_groups = cfg.attn_norm_num_groups
    if cfg.time_scale_shift and cfg.mid_attention_norm:  # diffusers drops the norm with scale-shift and None
        attn_groups = attn_groups or cfg.norm_num_groups
    return {
        "sample_size": cfg.sample_size, "block_out_channels": list(cfg.channels),
        "down_block_types": [down[a] for a in cfg.attention_levels],
        "mid_block_type": MID_BLOCK_2D if cfg.mid_block else None,
        "up_block_types": [up[a] for a in reversed(cfg.attention_levels)],
        "downsample_type": cfg.downsample_type, "upsample_type": cfg.upsample_type,
        "resnet_time_scale_shift": "scale_shift" if cfg.time_scale_shift else "default",
        "attn_norm_num_groups": attn_groups, "num_class_embeds": cfg.num_class_embeds,
    }


UNET_2D = DiffusersConfigMap(
    class_name="UNet2DModel", defaults=UNET_2D_DEFAULTS,
    same=("in_channels", "out_channels", "center_input_sample", "time_embedding_dim", "freq_shift",
          "flip_sin_to_cos", "mid_block_scale_factor", "downsample_padding", "dropout", "norm_num_groups",
          "norm_eps", "class_embed_type",
          # a list (one width per level) is latentdiff's own: diffusers' UNet2DModel cannot build it
          "attention_head_dim"),
    renamed={"layers_per_block": "layers_per_level", "add_attention": "mid_block_attention"},
    # keys diffusers implements at other values too; latentdiff implements only these (None resamples by conv)
    supported={
        "time_embedding_type": "positional",  # "fourier" (score SDE, with skip blocks), "learned": not implemented
        "act_fn": ("silu", "swish"),
    },
    inert=("num_train_timesteps",),  # read only for time_embedding_type "learned", which is rejected
    structural=("sample_size", "down_block_types", "mid_block_type", "up_block_types", "block_out_channels",
                "downsample_type", "upsample_type", "attn_norm_num_groups", "resnet_time_scale_shift",
                "num_class_embeds"),
    read=_read_unet_2d, write=_write_unet_2d)


# ---- AutoencoderKL / VQModel <-> AutoencoderKLConfig / VQModelConfig ----------------------------------------
ENCODER_DOWN = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")  # (plain, with attention)
DECODER_UP = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")


def first_stage_block_types(attention_levels: tuple[bool, ...] | None, levels: int) -> dict[str, list[str]]:
    """diffusers' down_block_types / up_block_types for `attention_levels` (up blocks run widest first)."""
    flags = attention_levels or (False,) * levels
    return {"down_block_types": [ENCODER_DOWN[a] for a in flags],
            "up_block_types": [DECODER_UP[a] for a in reversed(flags)]}


def _read_first_stage(d: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    """The inverse of first_stage_block_types; a list of another length or kind, or attention at a level of the
    encoder but not of the decoder (never the case in LDM), is a ConfigError naming the key."""
    channels = d["block_out_channels"]
    if not isinstance(channels, (list, tuple)) or not channels:
        return {}  # the config's own check names block_out_channels
    levels = len(channels)
    down, up = d["down_block_types"], d["up_block_types"]
    for key, value, names in (("down_block_types", down, ENCODER_DOWN), ("up_block_types", up, DECODER_UP)):
        if not isinstance(value, (list, tuple)) or len(value) != levels or any(v not in names for v in value):
            raise ConfigError(f"config key {key!r} has a value latentdiff does not support", where=source,
                              expected=f"{levels} entries (one per entry of block_out_channels), each of {names}",
                              found=repr(value))
    flags = tuple(t == ENCODER_DOWN[1] for t in down)
    if tuple(t == DECODER_UP[1] for t in reversed(up)) != flags:
        raise ConfigError("config keys 'down_block_types' and 'up_block_types' must put attention at the same "
                          "resolutions", where=source,
                          expected=repr(first_stage_block_types(flags, levels)["up_block_types"]), found=repr(list(up)))
    return {"attention_levels": flags if any(flags) else None}


def _write_first_stage(config: Any) -> dict[str, Any]:
    return first_stage_block_types(config.attention_levels, len(config.channels))


def _first_stage(class_name: str, defaults: dict[str, Any], same: tuple[str, ...]) -> DiffusersConfigMap:
    return DiffusersConfigMap(
        class_name=class_name, defaults=defaults, same=same,
        renamed={"block_out_channels": "channels", "layers_per_block": "layers_per_level",
                 "mid_block_add_attention": "mid_block_attention"},
        supported={"act_fn": "silu"}, structural=("down_block_types", "up_block_types"),
        read=_read_first_stage, write=_write_first_stage)


AUTOENCODER_KL = _first_stage("AutoencoderKL", {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
    "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": True,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}, same=("in_channels", "out_channels", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
         "shift_factor", "latents_mean", "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv"))

VQ_MODEL = _first_stage("VQModel", {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 3, "sample_size": 32, "num_vq_embeddings": 256, "norm_num_groups": 32, "vq_embed_dim": None,
    "scaling_factor": 0.18215, "norm_type": "group", "mid_block_add_attention": True,
    "lookup_from_codebook": False, "force_upcast": False,
}, same=("in_channels", "out_channels", "latent_channels", "sample_size", "num_vq_embeddings", "norm_num_groups",
         "vq_embed_dim", "scaling_factor", "norm_type", "lookup_from_codebook", "force_upcast"))


# ---- ControlNetModel <-> controlnet.ControlNetConfig ------------------------------------------------------
CONTROLNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4, "conditioning_channels": 3, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 1280, "transformer_layers_per_block": 1, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "attention_head_dim": 8, "num_attention_heads": None,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "projection_class_embeddings_input_dim": None,
    "controlnet_conditioning_channel_order": "rgb", "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "global_pool_conditions": False, "addition_embed_type_num_heads": 64,
}


def _read_controlnet(d: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    """The UNet's down half read as the UNet's keys are (a ControlNet has no up blocks: they are taken as the
    mirror the UNet reader checks for), plus the hint embedding's widths."""
    names = d["down_block_types"]
    up = [CROSS_UP[_block_name(b) == CROSS_DOWN[True]] for b in reversed(names)] \
        if isinstance(names, (list, tuple)) else names
    fields = _read_unet_conditional({**d, "up_block_types": up, "sample_size": None}, source)
    del fields["sample_size"]
    widths = as_list(d, "conditioning_embedding_out_channels", source)
    return {**fields, "conditioning_embedding_out_channels": tuple(widths)}


def _write_controlnet(cfg: Any) -> dict[str, Any]:
    keys = _write_unet_conditional(cfg)
    for key in ("sample_size", "up_block_types"):
        del keys[key]
    return {**keys, "conditioning_embedding_out_channels": list(cfg.conditioning_embedding_out_channels)}


CONTROLNET = DiffusersConfigMap(
    class_name="ControlNetModel", defaults=CONTROLNET_DEFAULTS,
    same=("in_channels", "conditioning_channels", "flip_sin_to_cos", "freq_shift", "downsample_padding",
          "mid_block_scale_factor", "norm_num_groups", "norm_eps", "use_linear_projection", "num_class_embeds",
          "upcast_attention"),
    supported={
        "only_cross_attention": _all_false, "act_fn": ("silu", "swish"), "encoder_hid_dim": None,
        "encoder_hid_dim_type": None, "num_attention_heads": None, "class_embed_type": None,
        "resnet_time_scale_shift": "default", "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
    },
    inert=("addition_embed_type_num_heads",),   # read only by addition_embed_type "text", which is rejected
    structural=("down_block_types", "mid_block_type", "block_out_channels", "layers_per_block", "attention_head_dim",
                "transformer_layers_per_block", "cross_attention_dim", "addition_embed_type",
                "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                "conditioning_embedding_out_channels"),
    read=_read_controlnet, write=_write_controlnet)


# ---- T2IAdapter <-> t2i_adapter.T2IAdapterConfig: the config's fields are diffusers' arguments -------------------
T2I_ADAPTER = DiffusersConfigMap(
    class_name="T2IAdapter",
    defaults={"in_channels": 3, "channels": [320, 640, 1280, 1280], "num_res_blocks": 2, "downscale_factor": 8,
              "adapter_type": "full_adapter"},
    same=("in_channels", "channels", "num_res_blocks", "downscale_factor", "adapter_type"))
