"""The conditioning stage (`cond_stage_model.*`) <-> transformers / diffusers text models.

- SD 1.x `FrozenCLIPEmbedder`: a transformers CLIPTextModel under `transformer.` (with `text_model.`,
  or without it in files saved by very old transformers). Its keys are ours after the prefix; the
  `position_ids` buffer is not a weight (kept aside for a bit-exact rebuild).
- SD 2.x `FrozenOpenCLIPEmbedder`: OpenCLIP's text tower under `model.`, one fused `in_proj` per layer.
  SD 2.x conditions on the penultimate layer, so (like diffusers' SD 2 folders) the text model gets
  one layer fewer than the file holds; the last layer, `text_projection` and `logit_scale` are not
  used for conditioning and are kept aside.
- LDM text-to-image `BERTEmbedder`: x-transformers' pre-norm encoder (LDMBert), where layer i is stored
  as two entries, attention at 2i and feed-forward at 2i + 1.
- LDM class-conditional `ClassEmbedder`: one embedding table.
- SDXL (Stability's generative-models) `conditioner.embedders.N.`: the base model's CLIP ViT-L
  (`FrozenCLIPEmbedder`, transformers layout, as SD 1.x) at 0 and OpenCLIP ViT-bigG (`FrozenOpenCLIPEmbedder2`)
  at 1; the refiner holds only bigG, at 0. SDXL reads bigG's penultimate hidden states *and* its projected pooled
  state, so unlike SD 2.x every layer and `text_projection` are converted (to our CLIPTextModelWithProjection).

Our side is transformers' CLIPTextModel state dict as transformers 5 names it (no `text_model.`);
diffusers' LDMBertModel names for LDMBert.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointError
from .keymap import Drop, Keep, Nest, Rename, Split, apply_keymap, invert

CLIP_LAYERS = (  # transformers CLIPTextModel, relative to the model (identical on both sides)
    Keep("embeddings.{x:token|position}_embedding.weight"),
    Drop("embeddings.position_ids"),  # a buffer (0..76) that old transformers saved
    Keep("encoder.layers.{i}.self_attn.{x:q|k|v|out}_proj.{p}"),
    Keep("encoder.layers.{i}.layer_norm{n:1|2}.{p}"),
    Keep("encoder.layers.{i}.mlp.fc{n:1|2}.{p}"),
    Keep("final_layer_norm.{p}"),
)
CLIP = (
    Nest("transformer.text_model.", "", CLIP_LAYERS),
    Nest("transformer.", "", CLIP_LAYERS),  # files saved before transformers had `text_model.`
)
OPENCLIP_LAYER = (
    Split("attn.in_proj_weight",
          into=("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    Split("attn.in_proj_bias", into=("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
    Rename("attn.out_proj.{p}", "self_attn.out_proj.{p}"),
    Rename("ln_{n:1|2}.{p}", "layer_norm{n}.{p}"),
    Rename("mlp.c_fc.{p}", "mlp.fc1.{p}"),
    Rename("mlp.c_proj.{p}", "mlp.fc2.{p}"),
)
LDMBERT_ATTENTION = (  # attn_layers.layers.2i = [LayerNorm, Attention, Residual]
    Rename("0.{p}", "self_attn_layer_norm.{p}"),
    Rename("1.to_{x:q|k|v}.weight", "self_attn.{x}_proj.weight"),
    Rename("1.to_out.{p}", "self_attn.out_proj.{p}"),
)
LDMBERT_FEEDFORWARD = (  # attn_layers.layers.2i+1 = [LayerNorm, FeedForward(Sequential(Linear, GELU), Dropout, Linear)]
    Rename("0.{p}", "final_layer_norm.{p}"),
    Rename("1.net.0.0.{p}", "fc1.{p}"),
    Rename("1.net.2.{p}", "fc2.{p}"),
)
CLASS_EMBEDDER = (Keep("embedding.weight"),)


@dataclasses.dataclass(frozen=True)
class Transpose(Rename):
    """New name, and the 2-D tensor transposed: OpenCLIP stores `text_projection` as the (hidden, proj) matrix it
    right-multiplies (`x @ P`); an nn.Linear holds its weight as (out, in) = P.T. Transposing twice is the identity,
    so a round trip is bit for bit (the result is made contiguous: safetensors writes only contiguous tensors)."""

    def transform(self, key: str, value: torch.Tensor) -> list[torch.Tensor]:
        if value.ndim != 2:
            raise CheckpointError("cannot transpose: not a matrix", where=key, expected="a 2-D tensor",
                                  found=tuple(value.shape))
        return [value.t().contiguous()]

    def inverse(self) -> Transpose:
        return Transpose(self.dst, self.src)


# SDXL's text encoders, relative to their `conditioner.embedders.N.` prefix; our side is the state dict of
# latentdiff's CLIPTextModel (flat, as CLIP above) and CLIPTextModelWithProjection (`text_model.*` +
# `text_projection.weight`, transformers' names). `position_ids` / `logit_scale` are kept aside (`dropped`).
SDXL_CLIP_L = (Nest("transformer.text_model.", "", CLIP_LAYERS),)
SDXL_OPENCLIP_BIGG = (
    Rename("model.token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    Rename("model.positional_embedding", "text_model.embeddings.position_embedding.weight"),
    Rename("model.ln_final.{p}", "text_model.final_layer_norm.{p}"),
    Transpose("model.text_projection", "text_projection.weight"),
    Drop("model.logit_scale"),  # CLIP's contrastive temperature: no part of the text tower
    Nest("model.transformer.resblocks.{i}.", "text_model.encoder.layers.{i}.", OPENCLIP_LAYER),  # all layers
)
# diffusers' folder names -> (prefix in the single file, table): the base model and the refiner.
SDXL_TEXT_PARTS = {"text_encoder": ("conditioner.embedders.0.", SDXL_CLIP_L),
                   "text_encoder_2": ("conditioner.embedders.1.", SDXL_OPENCLIP_BIGG)}
SDXL_REFINER_TEXT_PARTS = {"text_encoder_2": ("conditioner.embedders.0.", SDXL_OPENCLIP_BIGG)}


def sdxl_text_from_original(state: Mapping[str, torch.Tensor], part: str, *, refiner: bool = False,
                            source: str = "SDXL checkpoint",
                            dropped: dict[str, torch.Tensor] | None = None,
                            origins: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """One SDXL text encoder's tensors out of a whole single file (keys under its `conditioner.embedders.N.`
    prefix; the rest of the file is left alone), renamed to our model's state dict. Every key under the prefix
    must fit a rule (CheckpointError naming the ones that do not); `dropped` gets the tensors kept aside, under
    their names in the file, so that `sdxl_text_to_original` can rebuild the file's part bit for bit.
    `origins` gets each new key's name in the file (pass it as the model's `key_names`, so that a strict-load
    error names the file's key). Tensors are not copied, except the transposed projection."""
    prefix, table = _sdxl_part(part, refiner=refiner, source=source)
    sub = {k: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise CheckpointError("the file holds no tensors of this SDXL text encoder", where=source,
                              expected=f"keys under {prefix!r} ({part})", found="none")
    return apply_keymap(sub, (Nest(prefix, "", table),), source=f"{source}: {prefix}", dropped=dropped,
                        origins=origins)


def sdxl_text_to_original(state: Mapping[str, torch.Tensor], part: str, *, refiner: bool = False,
                          source: str = "text encoder",
                          dropped: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The way back: our model's state dict -> the file's keys (with the `conditioner.embedders.N.` prefix):
    q, k and v fused into `in_proj` in that order, the projection transposed back, and the tensors that
    `sdxl_text_from_original` kept aside (`dropped`) returned verbatim."""
    prefix, table = _sdxl_part(part, refiner=refiner, source=source)
    out = apply_keymap(state, invert((Nest(prefix, "", table),)), source=source)
    for key, value in (dropped or {}).items():
        if not key.startswith(prefix) or key in out:
            raise CheckpointError("a kept-aside tensor does not belong to this text encoder", where=key,
                                  expected=f"a key under {prefix!r} that conversion does not produce", found=key)
        out[key] = value
    return out


def _sdxl_part(part: str, *, refiner: bool, source: str) -> tuple[str, tuple]:
    parts = SDXL_REFINER_TEXT_PARTS if refiner else SDXL_TEXT_PARTS
    if part not in parts:
        raise CheckpointError("no such text encoder in an SDXL file", where=source, expected=tuple(parts), found=part)
    return parts[part]

# "openclip-projection": a whole OpenCLIP tower with its projection (SDXL's bigG) as CLIPTextModelWithProjection
TEXT_KINDS = ("clip", "openclip", "ldmbert", "class", "openclip-projection")
PROJECTION_ARCHITECTURES = ["CLIPTextModelWithProjection"]
CLIP_ACTIVATIONS = ("quick_gelu", "gelu")  # OpenAI CLIP, OpenCLIP: the only ones the original layouts use


@dataclasses.dataclass(frozen=True)
class TextArch:
    """What the key layout and the config of an original conditioning stage depend on."""

    kind: str                 # one of TEXT_KINDS
    config: dict              # transformers config dict (clip / openclip / ldmbert), or ClassEmbedder's
    skipped_layers: int = 0   # OpenCLIP layers in the file beyond the text model (1 for "penultimate")

    def __post_init__(self):
        if self.kind not in TEXT_KINDS:
            raise CheckpointError("unknown conditioning stage", where="cond_stage_model", expected=TEXT_KINDS,
                                  found=self.kind)

    @property
    def part(self) -> str:
        return {"class": "class_embedder", "openclip-projection": "text_encoder_2"}.get(self.kind, "text_encoder")

    def keymap(self) -> tuple:
        """Original (without `cond_stage_model.`) -> our keys; `invert()` it for the way back."""
        if self.kind == "clip":
            return CLIP
        if self.kind == "class":
            return CLASS_EMBEDDER
        if self.kind == "openclip-projection":
            return SDXL_OPENCLIP_BIGG
        if self.kind == "ldmbert":
            layers = self.config["encoder_layers"]
            rules: list = [Rename("transformer.token_emb.weight", "model.embed_tokens.weight"),
                           Rename("transformer.pos_emb.emb.weight", "model.embed_positions.weight"),
                           Rename("transformer.norm.{p}", "model.layer_norm.{p}"),
                           Rename("transformer.to_logits.{p}", "to_logits.{p}")]
            for i in range(layers):
                rules += [Nest(f"transformer.attn_layers.layers.{2 * i}.", f"model.layers.{i}.", LDMBERT_ATTENTION),
                          Nest(f"transformer.attn_layers.layers.{2 * i + 1}.", f"model.layers.{i}.",
                               LDMBERT_FEEDFORWARD)]
            return tuple(rules)
        layers = self.config["num_hidden_layers"]
        rules = [Rename("model.token_embedding.weight", "embeddings.token_embedding.weight"),
                 Rename("model.positional_embedding", "embeddings.position_embedding.weight"),
                 Rename("model.ln_final.{p}", "final_layer_norm.{p}"),
                 Drop("model.text_projection"), Drop("model.logit_scale")]
        rules += [Drop(f"model.transformer.resblocks.{layers + i}.{{rest*}}") for i in range(self.skipped_layers)]
        rules.append(Nest("model.transformer.resblocks.{i}.", "encoder.layers.{i}.", OPENCLIP_LAYER))
        return tuple(rules)

    def to_config(self) -> dict[str, Any]:
        return dict(self.config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, source: str = "text encoder config") -> TextArch:
        """From a transformers config dict (CLIPTextModel / LDMBertModel) or a ClassEmbedder config."""
        if not isinstance(config, Mapping):
            raise CheckpointError("the text encoder config is not an object", where=source,
                                  expected="a config dict", found=type(config).__name__)
        kind = config.get("model_type") or config.get("_class_name")  # transformers configs / ours
        if kind in ("clip_text_model", "clip"):
            act = config.get("hidden_act", "quick_gelu")
            if act not in CLIP_ACTIVATIONS:
                raise CheckpointError("unsupported text encoder activation", where=f"{source}: hidden_act",
                                      expected=f"one of {', '.join(CLIP_ACTIVATIONS)} (the original CLIP layouts)",
                                      found=repr(act))
            if config.get("architectures") == PROJECTION_ARCHITECTURES:  # every layer and the projection (SDXL)
                return cls("openclip-projection", dict(config))
            # OpenAI's CLIP uses quick_gelu; OpenCLIP (SD 2.x) uses exact gelu: the two original layouts.
            # An OpenCLIP file may hold one layer more than the text model (SD 2.x: penultimate layer).
            if config.get("hidden_act") == "gelu":
                return cls("openclip", dict(config), skipped_layers=1)
            return cls("clip", dict(config))
        if kind == "ldmbert":
            return cls("ldmbert", dict(config))
        if kind == "ClassEmbedder":
            return cls("class", dict(config))
        raise CheckpointError("no original layout for this text encoder", where=source,
                              expected="a CLIPTextModel(WithProjection), LDMBertModel or ClassEmbedder config",
                              found=kind)


def clip_config(*, vocab_size: int, hidden_size: int, num_hidden_layers: int, intermediate_size: int,
                max_position_embeddings: int, hidden_act: str, projection_dim: int | None = None) -> dict[str, Any]:
    """A transformers CLIPTextConfig dict. Heads are not stored in the tensors: CLIP's width per head is 64
    (ViT-L/14: 768 = 12 x 64; OpenCLIP ViT-H/14: 1024 = 16 x 64). Token ids as in the released SD folders."""
    if hidden_size % 64:
        raise CheckpointError("text encoder width is not a multiple of CLIP's 64-wide heads",
                              where="cond_stage_model", expected="hidden size divisible by 64", found=hidden_size)
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers, "num_attention_heads": hidden_size // 64,
        "max_position_embeddings": max_position_embeddings, "hidden_act": hidden_act, "layer_norm_eps": 1e-5,
        "projection_dim": projection_dim or hidden_size, "attention_dropout": 0.0, "dropout": 0.0,
        "initializer_range": 0.02, "initializer_factor": 1.0, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }


def ldmbert_config(*, vocab_size: int, d_model: int, encoder_layers: int, encoder_ffn_dim: int,
                   max_position_embeddings: int, inner_dim: int) -> dict[str, Any]:
    """diffusers' LDMBertConfig dict; heads are 64 wide (x-transformers' default dim_head, as released)."""
    if inner_dim % 64:
        raise CheckpointError("LDMBert attention width is not a multiple of 64-wide heads", where="cond_stage_model",
                              found=inner_dim)
    return {
        "architectures": ["LDMBertModel"], "model_type": "ldmbert",
        "vocab_size": vocab_size, "max_position_embeddings": max_position_embeddings, "d_model": d_model,
        "encoder_layers": encoder_layers, "encoder_ffn_dim": encoder_ffn_dim,
        "encoder_attention_heads": inner_dim // 64, "head_dim": 64, "activation_function": "gelu",
        "dropout": 0.1, "attention_dropout": 0.0, "activation_dropout": 0.0, "encoder_layerdrop": 0.0,
        "init_std": 0.02, "classifier_dropout": 0.0, "scale_embedding": False, "use_cache": True, "pad_token_id": 0,
    }


def class_embedder_config(*, num_classes: int, embed_dim: int) -> dict[str, Any]:
    return {"_class_name": "ClassEmbedder", "num_classes": num_classes, "embed_dim": embed_dim}
