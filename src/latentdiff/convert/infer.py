"""Architecture from tensor shapes alone, for original checkpoints that come without their YAML.

Everything that shapes a tensor is read from the tensors: channels per level (ResBlock widths),
layers per level (the output blocks' upsamplers delimit the levels), attention levels and kinds,
transformer depth, cross-attention width (attn2.to_k), linear vs 1x1-conv projections, class
embeddings, scale-shift norms, latent and codebook sizes, text widths and depths.

What no tensor records follows the conventions of the released models (as diffusers' and
AUTOMATIC1111's loaders do); pass `original_config=` (a YAML, several ship with latentdiff) or
`prediction_type=` to override:

- attention heads (spatial transformers): SD 2.x (OpenCLIP text, 1024-wide context or linear
  projections) uses 64-wide heads; the class-conditional LDM (ClassEmbedder) 1 head (cin256-v2);
  SD 1.x and the other LDMs 8 heads. LDM's older AttentionBlock interleaves q/k/v per head inside
  one tensor, so converting it *needs* the head count: without a YAML that is a CheckpointError.
- text heads: 64 wide (CLIP ViT-L/14, OpenCLIP ViT-H/14, LDMBert).
- SD 2.x text conditioning: the penultimate layer. A file with the whole OpenCLIP tower (it has
  `text_projection`) gives the text model all blocks but the last; a file without it (converted from a
  diffusers folder, which keeps only the blocks used) gives it all its blocks.
- eps vs v: only SD 2.x (not inpainting / upscaling) is ambiguous. Its 768px models predict v, its
  512px base predicts eps; the file holds no flag, so, following diffusers, `global_step == 875000`
  (the SD 2.0-base release) means eps and anything else v (SD 2.1-base files then need
  `prediction_type="epsilon"`). v models get 96x96 latents (768px), as diffusers' SD 2.1 folder.
- the schedule: from the `betas` buffer when the file has it, else SD's (0.00085, 0.012, 1000 steps).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from .. import limits
from ..errors import CheckpointError, describe
from .keymap import prefixed
from .layout import COND_STAGE_PREFIX, CONDITIONER_PREFIX, FIRST_STAGE_PREFIX, FileLayout, _family, with_conventions
from .sdxl_ldm import (
    SDXL_LATENT_SIZE,
    SDXL_VAE_SCALE,
    check_context,
    infer_embedders,
    is_sdxl_file,
    pooled_width,
    sdxl_conditioning,
    sdxl_scheduler_config,
    unet_only_conditioning,
    with_text_time,
)
from .text_ldm import TextArch, class_embedder_config, clip_config, ldmbert_config
from .unet_ldm import UNET_PREFIX, UNetArch
from .vae_ldm import VAEArch

SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
SD2_BASE_GLOBAL_STEP = 875000  # the SD 2.0-base release (an eps model); diffusers' convention
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _get(sd: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError("unknown layout: an expected tensor is missing", where=source, expected=key,
                              found=sorted(sd)[:20])
    return sd[key]


def _indices(sd: Mapping[str, Any], pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (a regex with one group) over the keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def _blocks(sd: Mapping[str, torch.Tensor], name: str) -> dict[int, dict[int, dict[str, torch.Tensor]]]:
    """`name.N.S.rest` -> {N: {S: {rest: tensor}}}."""
    out: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in sd.items():
        m = re.match(rf"{name}\.(\d+)\.(\d+)\.(.+)", key)
        if m:
            out.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), {})[m.group(3)] = value
    return out


def _kind(module: Mapping[str, torch.Tensor]) -> str:
    """What an original sub-module is, from its parameter names."""
    if "in_layers.0.weight" in module:
        return "res"
    if "proj_in.weight" in module:
        return "transformer"
    if "qkv.weight" in module:
        return "self"
    if "op.weight" in module or "conv.weight" in module:
        return "conv"
    return "unknown"


# ---- UNet -------------------------------------------------------------------------------------------------
def infer_unet(sd: Mapping[str, torch.Tensor], *, cond_kind: str | None = None, source: str = UNET_PREFIX) -> UNetArch:
    """UNetArch of an original UNet state dict (keys without `model.diffusion_model.`)."""
    conv_in = _get(sd, "input_blocks.0.0.weight", source)
    ins, outs = _blocks(sd, "input_blocks"), _blocks(sd, "output_blocks")
    # The levels: an output block whose last sub-module is a conv or a second ResBlock ends an up level.
    up_levels: list[list[int]] = [[]]
    for n in sorted(outs):
        kinds = [_kind(outs[n][s]) for s in sorted(outs[n])]
        if kinds[0] != "res" or "unknown" in kinds:
            raise CheckpointError("unknown layout of an output block", where=f"{source}output_blocks.{n}",
                                  found=sorted(f"{s}.{k}" for s in outs[n] for k in outs[n][s])[:20])
        up_levels[-1].append(n)
        if len(kinds) >= 2 and kinds[-1] in ("conv", "res"):
            up_levels.append([])
    if not up_levels[-1] or not up_levels[0]:
        raise CheckpointError("unknown layout: output blocks do not form resolution levels", where=source,
                              found=sorted(outs))
    levels = len(up_levels)
    layers = tuple(len(up_levels[levels - 1 - level]) - 1 for level in range(levels))
    channels, attention, depth, n = [], [], [], 1
    resample, transformer = "conv", None
    for level in range(levels):
        first = ins.get(n, {})
        level_kinds: set[str] = set()
        for _ in range(layers[level]):
            block = ins.get(n, {})
            if _kind(block.get(0, {})) != "res":
                raise CheckpointError("unknown layout: expected a ResBlock", where=f"{source}input_blocks.{n}.0")
            level_kinds.add(_kind(block[1]) if 1 in block else "none")
            n += 1
        if len(level_kinds) != 1:
            raise CheckpointError("attention on some but not all blocks of a level", where=f"{source}level {level}",
                                  found=sorted(level_kinds))
        attention.append(level_kinds.pop())
        channels.append(int(first[0]["out_layers.3.weight"].shape[0]))
        if attention[-1] == "transformer":
            transformer = transformer or first[1]
        depth.append(len(_indices(first[1], r"transformer_blocks\.(\d+)\.")) if attention[-1] == "transformer" else 0)
        if level != levels - 1:
            down = ins.get(n, {}).get(0, {})
            resample = "resnet" if _kind(down) == "res" else "conv"
            if _kind(down) not in ("res", "conv"):
                raise CheckpointError("unknown layout: expected a downsampler", where=f"{source}input_blocks.{n}.0")
            n += 1
    if sorted(ins) != list(range(n)):
        raise CheckpointError("input blocks do not match the output blocks' levels", where=source,
                              expected=f"input_blocks.0 .. {n - 1}", found=sorted(ins))
    mid = {s: dict(prefixed(f"middle_block.{s}.", sd)) for s in range(3)}
    mid_kind = _kind(mid[1])
    if mid_kind not in ("transformer", "self"):
        raise CheckpointError("unknown layout of the middle block", where=f"{source}middle_block.1")
    if mid_kind == "transformer":
        transformer = transformer or mid[1]
        mid_depth = len(_indices(mid[1], r"transformer_blocks\.(\d+)\."))
        if attention[-1] == "none":
            depth[-1] = mid_depth  # diffusers gives the middle block the last level's depth
        elif depth[-1] != mid_depth:
            raise CheckpointError("middle-block transformer depth differs from the last level's", where=source,
                                  found=(depth, mid_depth))
        depth = [d or mid_depth for d in depth]
    context = int(transformer["transformer_blocks.0.attn2.to_k.weight"].shape[1]) if transformer else None
    linear = bool(transformer is not None and transformer["proj_in.weight"].ndim == 2)
    res0 = ins[1][0] if 1 in ins else mid[0]
    emb = _get(sd, "time_embed.0.weight", source).shape[0]
    heads = _heads(tuple(channels), mid_kind=mid_kind, sd2=linear or context == 1024 or cond_kind == "openclip",
                   cond_kind=cond_kind, source=source)
    return UNetArch(
        in_channels=int(conv_in.shape[1]), out_channels=int(_get(sd, "out.2.weight", source).shape[0]),
        channels=tuple(channels), layers_per_level=layers, attention=tuple(attention), mid_attention=mid_kind,
        heads=heads, transformer_depth=tuple(depth) if mid_kind == "transformer" else (),
        cross_attention_dim=context, use_linear_projection=linear,
        num_class_embeds=int(sd["label_emb.weight"].shape[0]) if "label_emb.weight" in sd else None,
        projection_class_embeddings_input_dim=(int(sd["label_emb.0.0.weight"].shape[1])
                                               if "label_emb.0.0.weight" in sd else None),
        time_embedding_dim=None if emb == 4 * channels[0] else int(emb),
        resnet_time_scale_shift=("scale_shift" if res0["emb_layers.1.weight"].shape[0] ==
                                 2 * res0["out_layers.3.weight"].shape[0] else "default"),
        resample=resample)


def _heads(channels: tuple[int, ...], *, mid_kind: str, sd2: bool, cond_kind: str | None,
           source: str) -> tuple[int, ...]:
    """Attention heads per level by the released models' conventions (the tensors do not record them)."""
    if mid_kind == "self":
        raise CheckpointError(
            "this UNet uses LDM's AttentionBlock, whose fused qkv tensor interleaves heads; the head count is "
            "not stored in the file. Pass original_config= (the model's YAML; latentdiff ships the released "
            "LDM ones, see latentdiff.convert.original_config.SHIPPED_CONFIGS)",
            where=f"{source}middle_block.1.qkv.weight")
    if sd2:
        return tuple(c // 64 for c in channels)
    return tuple(1 if cond_kind == "class" else 8 for _ in channels)


# ---- first stage -----------------------------------------------------------------------------------------
def infer_vae(sd: Mapping[str, torch.Tensor], *, scaling_factor: float | None = None,
              source: str = FIRST_STAGE_PREFIX) -> VAEArch:
    """VAEArch of an original first-stage state dict (keys without `first_stage_model.`)."""
    conv_in = _get(sd, "encoder.conv_in.weight", source)
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    if levels != list(range(len(levels))) or not levels:
        raise CheckpointError("unknown layout of the encoder levels", where=source, found=levels)
    channels = tuple(int(_get(sd, f"encoder.down.{level}.block.0.conv2.weight", source).shape[0]) for level in levels)
    z = int(_get(sd, "decoder.conv_in.weight", source).shape[1])
    vq = "quantize.embedding.weight" in sd
    quant = _get(sd, "quant_conv.weight", source)
    if not vq and quant.shape[0] != 2 * z:
        raise CheckpointError("KL autoencoder with embed_dim != z_channels (diffusers' AutoencoderKL ties them)",
                              where=f"{source}quant_conv.weight", expected=(2 * z,), found=tuple(quant.shape))
    codebook = sd["quantize.embedding.weight"] if vq else None
    return VAEArch(
        kind="vq" if vq else "kl", in_channels=int(conv_in.shape[1]),
        out_channels=int(_get(sd, "decoder.conv_out.weight", source).shape[0]), channels=channels,
        layers_per_block=len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")), latent_channels=z,
        attention_levels=tuple(any(k.startswith(f"encoder.down.{level}.attn.") for k in sd) for level in levels),
        num_vq_embeddings=int(codebook.shape[0]) if codebook is not None else None,
        vq_embed_dim=int(codebook.shape[1]) if codebook is not None else None,
        scaling_factor=scaling_factor if scaling_factor is not None else (1.0 if vq else 0.18215))


# ---- conditioning stage ------------------------------------------------------------------------------------
def cond_kind(sd: Mapping[str, Any]) -> str | None:
    """Which conditioning stage a `cond_stage_model.`-stripped state dict holds (None: none)."""
    if not sd:
        return None
    if "model.token_embedding.weight" in sd:
        return "openclip"
    if "transformer.token_emb.weight" in sd:
        return "ldmbert"
    if "transformer.text_model.embeddings.token_embedding.weight" in sd or \
            "transformer.embeddings.token_embedding.weight" in sd:
        return "clip"
    if "embedding.weight" in sd:
        return "class"
    raise CheckpointError("unknown conditioning stage", where=COND_STAGE_PREFIX, found=sorted(sd)[:20])


def infer_text(sd: Mapping[str, torch.Tensor], *, source: str = COND_STAGE_PREFIX) -> TextArch | None:
    """TextArch of an original conditioning stage (keys without `cond_stage_model.`)."""
    kind = cond_kind(sd)
    if kind is None:
        return None
    if kind == "class":
        n, d = _get(sd, "embedding.weight", source).shape
        return TextArch("class", class_embedder_config(num_classes=int(n), embed_dim=int(d)))
    if kind == "ldmbert":
        vocab, d = sd["transformer.token_emb.weight"].shape
        entries = _indices(sd, r"transformer\.attn_layers\.layers\.(\d+)\.")
        return TextArch("ldmbert", ldmbert_config(
            vocab_size=int(vocab), d_model=int(d), encoder_layers=len(entries) // 2,
            encoder_ffn_dim=int(_get(sd, "transformer.attn_layers.layers.1.1.net.0.0.weight", source).shape[0]),
            max_position_embeddings=int(_get(sd, "transformer.pos_emb.emb.weight", source).shape[0]),
            inner_dim=int(_get(sd, "transformer.attn_layers.layers.0.1.to_q.weight", source).shape[0])))
    if kind == "openclip":
        vocab, d = sd["model.token_embedding.weight"].shape
        blocks = len(_indices(sd, r"model\.transformer\.resblocks\.(\d+)\."))
        proj = sd.get("model.text_projection")
        # SD 2.x conditions on the penultimate layer. A whole OpenCLIP tower (with its text_projection)
        # keeps the unused last block; files converted from diffusers folders hold only the blocks used.
        skip = 1 if proj is not None else 0
        config = clip_config(
            vocab_size=int(vocab), hidden_size=int(d), num_hidden_layers=blocks - skip,
            intermediate_size=int(_get(sd, "model.transformer.resblocks.0.mlp.c_fc.weight", source).shape[0]),
            max_position_embeddings=int(_get(sd, "model.positional_embedding", source).shape[0]), hidden_act="gelu",
            projection_dim=int(proj.shape[1]) if proj is not None else None)
        return TextArch("openclip", config, skipped_layers=skip)
    inner = "transformer.text_model." if "transformer.text_model.embeddings.token_embedding.weight" in sd \
        else "transformer."
    vocab, d = sd[inner + "embeddings.token_embedding.weight"].shape
    return TextArch("clip", clip_config(
        vocab_size=int(vocab), hidden_size=int(d),
        num_hidden_layers=len(_indices(sd, re.escape(inner) + r"encoder\.layers\.(\d+)\.")),
        intermediate_size=int(_get(sd, inner + "encoder.layers.0.mlp.fc1.weight", source).shape[0]),
        max_position_embeddings=int(_get(sd, inner + "embeddings.position_embedding.weight", source).shape[0]),
        hidden_act="quick_gelu"))


# ---- scheduler ---------------------------------------------------------------------------------------------
def ldm_betas(beta_start: float, beta_end: float, steps: int) -> torch.Tensor:
    """LDM's "linear" schedule, which is diffusers' "scaled_linear": linear in sqrt(beta) (float64)."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2


def schedule_from_betas(betas: torch.Tensor) -> dict[str, Any]:
    """diffusers schedule keys reproducing a stored `betas` buffer (float32 in LDM files). Its shape is checked
    before any value is read: one beta per training step, at most limits.MAX_TRAIN_TIMESTEPS of them."""
    if betas.ndim != 1 or not 2 <= betas.numel() <= limits.MAX_TRAIN_TIMESTEPS:
        raise CheckpointError("the betas buffer must hold one beta per training timestep", where="betas",
                              expected=f"a 1-D tensor of 2 to {limits.MAX_TRAIN_TIMESTEPS} values "
                                       "(limits.MAX_TRAIN_TIMESTEPS)", found=f"shape {tuple(betas.shape)}")
    b = betas.double()
    steps = int(b.numel())
    for start, end in ((float(f"{float(b[0]):.6g}"), float(f"{float(b[-1]):.6g}")), (float(b[0]), float(b[-1]))):
        for name, rebuilt in (("scaled_linear", ldm_betas(start, end, steps)),
                              ("linear", torch.linspace(start, end, steps, dtype=torch.float64))):
            if torch.allclose(rebuilt.to(betas.dtype).double(), b, rtol=1e-5, atol=1e-9):
                return {"num_train_timesteps": steps, "beta_start": start, "beta_end": end, "beta_schedule": name,
                        "trained_betas": None}
    return {"num_train_timesteps": steps, "beta_start": float(b[0]), "beta_end": float(b[-1]),
            "beta_schedule": "linear", "trained_betas": b.tolist()}


def scheduler_config(*, prediction_type: str, schedule: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A diffusers DDIMScheduler config (as Stable Diffusion's folders set it up)."""
    if prediction_type not in PREDICTION_TYPES:
        raise CheckpointError("unknown prediction_type", where="prediction_type", expected=PREDICTION_TYPES,
                              found=prediction_type)
    base = {**SD_SCHEDULE, "beta_schedule": "scaled_linear", "trained_betas": None, **(schedule or {})}
    return {"_class_name": "DDIMScheduler", **base, "prediction_type": prediction_type, "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading", "thresholding": False,
            "rescale_betas_zero_snr": False}


# ---- the whole file ----------------------------------------------------------------------------------------
def infer_layout(state: Mapping[str, torch.Tensor], *, prediction_type: str | None = None,
                 global_step: int | None = None, source: str = "checkpoint",
                 conditioning: str | None = None, pooled: int | None = None) -> FileLayout:
    """The FileLayout of an original checkpoint from its keys and shapes (no YAML). `conditioning`: the kind of
    a conditioning stage left out of `state` (see `single_file.only_parts`); `pooled`: SDXL's pooled text width
    when its bigG encoder is left out."""
    if is_sdxl_file(state, conditioning=conditioning):
        return infer_sdxl_layout(state, prediction_type=prediction_type, source=source, conditioning=conditioning,
                                 pooled=pooled)
    unet_sd = prefixed(UNET_PREFIX, state)
    first_sd = prefixed(FIRST_STAGE_PREFIX, state)
    cond_sd = prefixed(COND_STAGE_PREFIX, state)
    standalone = not unet_sd and not first_sd and not cond_sd and "encoder.conv_in.weight" in state
    if standalone:
        first_sd = dict(state)
    if not unet_sd and not first_sd:
        raise CheckpointError("not a latent-diffusion checkpoint: no UNet and no autoencoder", where=source,
                              expected=f"keys under {UNET_PREFIX!r} or {FIRST_STAGE_PREFIX!r}, or a stand-alone "
                                       "autoencoder (encoder.*, decoder.*)", found=sorted(state)[:20])
    scale = scale_factor_of(state, source=source)
    text = infer_text(cond_sd, source=source + ":" + COND_STAGE_PREFIX)
    conditioning = text.kind if text else conditioning
    unet = infer_unet(unet_sd, cond_kind=conditioning,
                      source=source + ":" + UNET_PREFIX) if unet_sd else None
    first = infer_vae(first_sd, scaling_factor=scale,
                      source=source + ":" + ("" if standalone else FIRST_STAGE_PREFIX)) if first_sd else None
    family = _family(unet, first, text, conditioning=conditioning)
    if unet is None:
        return FileLayout(family=family, first_stage=first, cond_stage=text, standalone_first_stage=standalone)
    if prediction_type is None:
        v = family == "sd2" and global_step != SD2_BASE_GLOBAL_STEP
        prediction_type = "v_prediction" if v else "epsilon"
    latent = {"sd2": 96 if prediction_type == "v_prediction" else 64}.get(family, 64)
    if family == "ldm" and first is not None:
        latent = 256 // 2 ** (len(first.channels) - 1)  # the LDM releases are 256px models
    unet = with_conventions(dataclasses.replace(unet, sample_size=latent), text, conditioning=conditioning)
    if first is not None:
        factor = 2 ** (len(first.channels) - 1)
        first = dataclasses.replace(first, sample_size=latent * factor)
    schedule = schedule_from_betas(state["betas"]) if "betas" in state else None
    return FileLayout(family=family, unet=unet, first_stage=first, cond_stage=text,
                      scheduler=scheduler_config(prediction_type=prediction_type, schedule=schedule))


def infer_sdxl_layout(state: Mapping[str, torch.Tensor], *, prediction_type: str | None = None,
                      source: str = "checkpoint", conditioning: str | None = None,
                      pooled: int | None = None) -> FileLayout:
    """The FileLayout of an SDXL (generative-models) file from its keys and shapes: see `sdxl_ldm`."""
    unet_sd, first_sd = prefixed(UNET_PREFIX, state), prefixed(FIRST_STAGE_PREFIX, state)
    if any(k.startswith(COND_STAGE_PREFIX) for k in state):
        raise CheckpointError("an SDXL file with an SD conditioning stage (cond_stage_model.*) beside its "
                              "conditioner: parts of different models", where=source,
                              expected=f"text encoders under {CONDITIONER_PREFIX!r} only",
                              found=sorted(k for k in state if k.startswith(COND_STAGE_PREFIX))[:5])
    conditioning = sdxl_conditioning(state, source=source) or conditioning
    embedders = infer_embedders(state, conditioning=conditioning, source=source) if conditioning else ()
    unet = None
    if unet_sd:
        where = f"{source}:{UNET_PREFIX}"
        unet = infer_unet(unet_sd, cond_kind="sdxl", source=where)
        conditioning = conditioning or unet_only_conditioning(unet)
        check_context(unet, embedders, conditioning=conditioning, source=where)
        unet = with_text_time(unet, conditioning=conditioning, pooled=pooled_width(embedders) or pooled, source=where)
        unet = dataclasses.replace(unet, sample_size=SDXL_LATENT_SIZE)
    elif not embedders and not first_sd:
        raise CheckpointError("not a latent-diffusion checkpoint: no UNet, autoencoder or text encoder", where=source)
    scale = scale_factor_of(state, source=source)
    first = infer_vae(first_sd, scaling_factor=SDXL_VAE_SCALE if scale is None else scale,
                      source=f"{source}:{FIRST_STAGE_PREFIX}") if first_sd else None
    if first is not None:
        first = dataclasses.replace(first, sample_size=SDXL_LATENT_SIZE * 2 ** (len(first.channels) - 1))
    family = _family(unet, first, None, conditioning=conditioning) if unet is not None else \
        conditioning or "sdxl"
    # v-prediction fine-tunes mark themselves with empty `v_pred` (and `ztsnr`: zero terminal SNR) tensors
    prediction_type = prediction_type or ("v_prediction" if "v_pred" in state else "epsilon")
    schedule = {"rescale_betas_zero_snr": True} if "ztsnr" in state else None
    return FileLayout(family=family, unet=unet, first_stage=first, embedders=embedders,
                      scheduler=sdxl_scheduler_config(prediction_type=prediction_type, schedule=schedule)
                      if unet is not None else None)


def scale_factor_of(state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> float | None:
    """The file's `scale_factor` buffer (LatentDiffusion's latent scale) as a finite float; None when absent."""
    scale = state.get("scale_factor")
    if scale is None:
        return None
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or scale.is_complex() or \
            not math.isfinite(float(scale)):
        raise CheckpointError("scale_factor is not one finite number", where=f"{source}: scale_factor",
                              expected="a one-element real tensor", found=describe(scale))
    return float(scale)


def infer_configs(state: Mapping[str, torch.Tensor], *, prediction_type: str | None = None,
                  global_step: int | None = None) -> dict[str, Any]:
    """{"family": ..., part: diffusers-format config, ..., "scheduler": ...} of an original checkpoint."""
    layout = infer_layout(state, prediction_type=prediction_type, global_step=global_step)
    return {"family": layout.family, **layout.configs()}
