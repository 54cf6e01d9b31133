"""What an SDXL single file (Stability AI's generative-models `DiffusionEngine`) adds to the LDM layout.

    model.diffusion_model.*          the UNet, as SD's, plus `label_emb.0` = diffusers' `add_embedding`
    conditioner.embedders.0.*        base: CLIP ViT-L (`transformer.text_model.*`); refiner: OpenCLIP bigG
    conditioner.embedders.1.*        base: OpenCLIP ViT-bigG (`model.*`, fused in_proj, `text_projection`)
    first_stage_model.*              the SDXL VAE (an SD VAE by shape; scale 0.13025, not a tensor in the file)

What no tensor records, by the released models' conventions (generative-models' configs/inference/*.yaml and
diffusers' SDXL folders):

- the micro-conditioning numbers: 6 (original size, crop top-left, target size) with CLIP-L in the file, 5
  (original size, crop, aesthetic score) with bigG alone (the refiner). `label_emb.0.0` reads their Fourier
  features (`addition_time_embed_dim` each) concatenated with bigG's pooled projection, so its input width is
  pooled + numbers * addition_time_embed_dim, and the time width follows from bigG's `text_projection`.
  A UNet-only file lacks the projection: the released 256-wide features are assumed (ConcatTimestepEmbedderND
  outdim 256 in every SDXL YAML), and 5 numbers where the pooled width this leaves equals the context width
  (the refiner: bigG's pooled and hidden widths are both 1280), else 6.
- the schedule: SD's (scaled_linear 0.00085 .. 0.012, 1000 steps, LegacyDDPMDiscretization), sampled with
  Euler, "leading" spacing and steps_offset 1 (diffusers' SDXL scheduler config); eps prediction, unless the file
  holds the empty `v_pred` marker of v-prediction fine-tunes (and `ztsnr`: zero terminal SNR), as ComfyUI reads it.
- 1024-pixel images (128 x 128 latents); the VAE's scaling factor 0.13025 and `force_upcast` (its fp16
  activations overflow).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointError
from .layout import CONDITIONER_PREFIX, SDXL_EMBEDDERS, Embedder
from .text_ldm import PROJECTION_ARCHITECTURES, TextArch, clip_config
from .unet_ldm import UNetArch

SDXL_TIME_EMBED_DIM = 256   # ConcatTimestepEmbedderND(outdim=256) per micro-conditioning number
SDXL_VAE_SCALE = 0.13025
SDXL_LATENT_SIZE = 128      # 1024 px / 8
SDXL_CONDITIONING = ("sdxl", "sdxl-refiner")  # base (CLIP-L + bigG) or refiner (bigG): `conditioning` hints
MICRO_CONDITIONING = {"sdxl": 6, "sdxl-refiner": 5}
CLIP_L_KEY = "transformer.text_model.embeddings.token_embedding.weight"
OPENCLIP_KEY = "model.token_embedding.weight"


def is_sdxl_file(state: Mapping[str, Any], *, conditioning: str | None = None) -> bool:
    """An SDXL file: its text encoders under `conditioner.embedders.`, or (a UNet without them) a UNet with the
    text_time embedding (`label_emb.0.0`) and no SD conditioning stage."""
    if conditioning in SDXL_CONDITIONING or any(k.startswith(CONDITIONER_PREFIX) for k in state):
        return True
    return "model.diffusion_model.label_emb.0.0.weight" in state and conditioning is None and \
        not any(k.startswith("cond_stage_model.") for k in state)


def embedder_states(state: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """`conditioner.embedders.N.rest` -> {N: {rest: tensor}}."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    rx = re.compile(re.escape(CONDITIONER_PREFIX) + r"(\d+)\.(.+)")
    for key, value in state.items():
        m = rx.match(key)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return out


def sdxl_conditioning(state: Mapping[str, torch.Tensor], *, source: str) -> str | None:
    """"sdxl" (CLIP-L at 0, bigG at 1) or "sdxl-refiner" (bigG at 0) from the embedders present; None when the
    file has none. Any other set (one encoder of the base's two, an unknown embedder) is a CheckpointError."""
    embedders = embedder_states(state)
    if not embedders:
        return None
    kinds = {i: _embedder_kind(sd) for i, sd in sorted(embedders.items())}
    for name, want in (("sdxl", {0: "clip", 1: "openclip"}), ("sdxl-refiner", {0: "openclip"})):
        if kinds == want:
            return name
    raise CheckpointError("unknown or incomplete SDXL conditioner: the base holds CLIP-L at 0 and OpenCLIP bigG at "
                          "1, the refiner bigG alone at 0", where=f"{source}: {CONDITIONER_PREFIX}*",
                          expected="{0: clip, 1: openclip} or {0: openclip}", found=kinds)


def _embedder_kind(sd: Mapping[str, torch.Tensor]) -> str:
    if CLIP_L_KEY in sd:
        return "clip"
    if OPENCLIP_KEY in sd:
        return "openclip"
    return "unknown (" + ", ".join(sorted(sd)[:3]) + ")"


def embedder_indices(conditioning: str | None) -> dict[str, int]:
    """part -> embedder index of an SDXL file with this conditioning ({} for none)."""
    if conditioning is None:
        return {}
    return dict(SDXL_EMBEDDERS["refiner" if conditioning == "sdxl-refiner" else "base"])


def infer_embedders(state: Mapping[str, torch.Tensor], *, conditioning: str,
                    source: str) -> tuple[Embedder, ...]:
    """The text encoders of an SDXL file with the given conditioning (`sdxl_conditioning`), those present."""
    embedders = embedder_states(state)
    out = []
    for part, index in embedder_indices(conditioning).items():
        if index in embedders:
            where = f"{source}: {CONDITIONER_PREFIX}{index}."
            sd = embedders[index]
            arch = clip_l_arch(sd, source=where) if part == "text_encoder" else bigg_arch(sd, source=where)
            out.append(Embedder(index, part, arch))
    return tuple(out)


def _get(sd: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError("unknown layout: an expected tensor is missing", where=source, expected=key,
                              found=sorted(sd)[:10])
    return sd[key]


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def clip_l_arch(sd: Mapping[str, torch.Tensor], *, source: str) -> TextArch:
    """SDXL's first text encoder (FrozenCLIPEmbedder): a transformers CLIPTextModel, quick_gelu."""
    inner = "transformer.text_model."
    vocab, width = _get(sd, inner + "embeddings.token_embedding.weight", source).shape
    return TextArch("clip", clip_config(
        vocab_size=int(vocab), hidden_size=int(width),
        num_hidden_layers=_count(sd, re.escape(inner) + r"encoder\.layers\.(\d+)\."),
        intermediate_size=int(_get(sd, inner + "encoder.layers.0.mlp.fc1.weight", source).shape[0]),
        max_position_embeddings=int(_get(sd, inner + "embeddings.position_embedding.weight", source).shape[0]),
        hidden_act="quick_gelu"))


def bigg_arch(sd: Mapping[str, torch.Tensor], *, source: str) -> TextArch:
    """SDXL's OpenCLIP tower (FrozenOpenCLIPEmbedder2): every layer and the projection, gelu; the projection
    width is `text_projection`'s second dimension (OpenCLIP right-multiplies by it)."""
    vocab, width = _get(sd, "model.token_embedding.weight", source).shape
    projection = _get(sd, "model.text_projection", source)
    if projection.ndim != 2 or projection.shape[0] != width:
        raise CheckpointError("OpenCLIP's text_projection must be a (hidden, projection) matrix", where=source,
                              expected=f"({int(width)}, P)", found=tuple(projection.shape))
    config = clip_config(
        vocab_size=int(vocab), hidden_size=int(width),
        num_hidden_layers=_count(sd, r"model\.transformer\.resblocks\.(\d+)\."),
        intermediate_size=int(_get(sd, "model.transformer.resblocks.0.mlp.c_fc.weight", source).shape[0]),
        max_position_embeddings=int(_get(sd, "model.positional_embedding", source).shape[0]), hidden_act="gelu",
        projection_dim=int(projection.shape[1]))
    return TextArch("openclip-projection", {**config, "architectures": list(PROJECTION_ARCHITECTURES)})


def pooled_width(embedders: tuple[Embedder, ...]) -> int | None:
    """The width of bigG's pooled projection (the add embedding's text part), None without bigG."""
    return next((int(e.arch.config["projection_dim"]) for e in embedders if e.part == "text_encoder_2"), None)


def unet_only_conditioning(unet: UNetArch) -> str:
    """A UNet-only file's model: the refiner where the released 256-wide features of 5 numbers leave a pooled
    width equal to the context width, else the base (see the module doc)."""
    width = unet.projection_class_embeddings_input_dim or 0
    return "sdxl-refiner" if width - 5 * SDXL_TIME_EMBED_DIM == unet.cross_attention_dim else "sdxl"


def with_text_time(unet: UNetArch, *, conditioning: str, pooled: int | None, source: str) -> UNetArch:
    """`unet` (read from its shapes, `label_emb.0` a projection class embedding) as SDXL's: the text_time add
    embedding, its Fourier width solved from `label_emb.0.0`'s input width (see the module doc)."""
    width = unet.projection_class_embeddings_input_dim
    where = f"{source}label_emb.0.0.weight"
    if width is None:
        raise CheckpointError("an SDXL UNet has the text_time embedding (label_emb.0.0), and this one has none",
                              where=where, expected="label_emb.0.0.weight", found="absent")
    numbers = MICRO_CONDITIONING[conditioning]
    if pooled is None:   # a UNet-only file: the released models' 256-wide features
        pooled = width - numbers * SDXL_TIME_EMBED_DIM
    if pooled <= 0 or (width - pooled) <= 0 or (width - pooled) % numbers:
        raise CheckpointError(f"label_emb.0.0's input is the pooled text embedding and {numbers} micro-conditioning "
                              "numbers' Fourier features: its width does not fit", where=where,
                              expected=f"{pooled} + {numbers} * addition_time_embed_dim (pooled width from bigG's "
                                       "text_projection)", found=f"input width {width}")
    return dataclasses.replace(unet, addition_embed_type="text_time", addition_time_embed_dim=(width - pooled) //
                               numbers, upcast_attention=False)


def check_context(unet: UNetArch, embedders: tuple[Embedder, ...], *, conditioning: str, source: str) -> None:
    """The UNet's cross-attention width is the text encoders' hidden widths summed (their penultimate states
    are concatenated): a UNet with another model's conditioner is refused here, before anything is built."""
    wanted = SDXL_EMBEDDERS["refiner" if conditioning == "sdxl-refiner" else "base"]
    if len(embedders) != len(wanted):   # a part left out by `only`: nothing to compare with
        return
    widths = [int(e.arch.config["hidden_size"]) for e in embedders]
    if unet.cross_attention_dim != sum(widths):
        raise CheckpointError("the UNet's context width is not its text encoders' hidden widths summed (a UNet and "
                              "text encoders of different models?)", where=f"{source}attn2.to_k.weight",
                              expected=f"{sum(widths)} ({' + '.join(map(str, widths))})",
                              found=unet.cross_attention_dim)


def sdxl_scheduler_config(*, prediction_type: str = "epsilon", schedule: Mapping[str, Any] | None = None,
                          ) -> dict[str, Any]:
    """diffusers' SDXL scheduler config (EulerDiscreteScheduler, as the released folders have it)."""
    return {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None, **(schedule or {}),
            "prediction_type": prediction_type, "interpolation_type": "linear", "use_karras_sigmas": False,
            "timestep_spacing": "leading", "steps_offset": 1, "sample_max_value": 1.0, "set_alpha_to_one": False,
            "skip_prk_steps": True, "clip_sample": False}
