"""CLIP's text transformer (Radford et al. 2021), the text encoder of Stable Diffusion 1.x and 2.x.

Token + learned position embeddings, N pre-LN blocks [x + Attn(LN(x)), x + MLP(LN(x))] with a causal mask
(each token attends to itself and the tokens before it), a final LayerNorm. The MLP's activation is
`quick_gelu` (x * sigmoid(1.702 x), OpenAI's CLIP: SD 1.x) or exact `gelu` (OpenCLIP: SD 2.x).

transformers' CLIPTextModel computes the same thing; this one exists so that loading Stable Diffusion
does not import transformers (seconds of a cold start). The folder stays transformers': `config.json`
(CLIPTextConfig keys, read here, strictly) + `model.safetensors`, with or without the `text_model.` key
prefix that transformers 4 wrote; parameter names are transformers 5's, so `TextEncoder`, the single-file
converter and diffusers' `clip_skip` find the parts where they look (`final_layer_norm`, `encoder.layers`).

`CLIPTextModelWithProjection` is the same tower plus CLIP's text projection (a bias-free Linear hidden_size ->
projection_dim applied to the pooled state): SDXL's second encoder (OpenCLIP ViT-bigG/14) and the refiner's only
one, whose projected pooled output conditions the UNet's `text_time` embedding. Its folder is transformers' too
(architectures ["CLIPTextModelWithProjection"], keys `text_model.*` + `text_projection.weight`).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import limits
from ..config import ComponentConfig
from ..errors import ConfigError, InputError, describe
from . import structure
from .base import ModelMixin
from .diffusers_config import check_supported

MODEL_TYPE = "clip_text_model"
ARCHITECTURE = "CLIPTextModel"
PROJECTION_ARCHITECTURE = "CLIPTextModelWithProjection"
PROJECTION_KEY = "text_projection."  # the projection's weight sits beside the tower, never under `text_model.`
WEIGHTS_PREFIX = "text_model."  # transformers 4 (and the released SD folders) nest the weights once more
# transformers < 4.31 saved the position-id buffer (arange) with the weights; it is not a weight.
POSITION_IDS_KEY = "embeddings.position_ids"
ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}

# config.json keys that are fields of CLIPTextConfig (the same names as transformers').
FILE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim", "bos_token_id",
             "eos_token_id", "pad_token_id", "initializer_range", "initializer_factor")
# Keys that change the model, accepted only at the value implemented here (an attention dropout would need
# an SDPA dropout_p in training; the rest are not CLIP text models).
FIXED_KEYS: dict[str, Any] = {"model_type": MODEL_TYPE, "architectures": ([ARCHITECTURE], None),
                              "attention_dropout": (0.0, 0), "is_encoder_decoder": False, "is_decoder": False,
                              "add_cross_attention": False, "tie_encoder_decoder": False, "pruned_heads": ({},)}
# transformers 4's CLIPTextConfig had a `dropout` that no CLIP layer ever read; older files still carry it.
UNREAD_KEYS = frozenset({"dropout"})


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ComponentConfig):
    """Defaults: transformers' CLIPTextConfig (SD 1.x: 49408 tokens, 768 wide, 12 layers, 12 heads, 77 positions)."""

    vocab_size: int = 49408
    hidden_size: int = 512                   # width of the residual stream = the UNet's cross_attention_dim
    intermediate_size: int = 2048            # MLP width
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77        # learned positions = tokens per prompt
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512                # CLIP's joint space: CLIPTextModelWithProjection's output width
    bos_token_id: int = 49406
    eos_token_id: int = 49407                # the pooled output's position (2: the highest token id, see pooled)
    pad_token_id: int = 1
    initializer_range: float = 0.02          # init settings: kept for the file only
    initializer_factor: float = 1.0

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive", where=name, expected=">= 1", found=getattr(self, name))
        structure.check_counts([("vocab_size", self.vocab_size, limits.MAX_VOCAB),
                                ("hidden_size", self.hidden_size, limits.MAX_CHANNELS),
                                ("intermediate_size", self.intermediate_size, 4 * limits.MAX_CHANNELS),
                                ("num_hidden_layers", self.num_hidden_layers, limits.MAX_TEXT_LAYERS),
                                ("num_attention_heads", self.num_attention_heads, limits.MAX_HEADS),
                                ("max_position_embeddings", self.max_position_embeddings, limits.MAX_TEXT_LENGTH),
                                ("projection_dim", self.projection_dim, limits.MAX_CHANNELS)])
        structure.check_parameters(structure.estimate_text_parameters(
            self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers),
            what="this text encoder", key="hidden_size")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must split evenly into the attention heads", where="num_attention_heads",
                              expected=f"a divisor of hidden_size {self.hidden_size}", found=self.num_attention_heads)


@dataclasses.dataclass
class CLIPTextOutput:
    """What transformers' BaseModelOutputWithPooling holds, for the code that reads it (TextEncoder, diffusers).

    last_hidden_state: (B, L, D), after the final layer norm; pooler_output: (B, D), the end token's state;
    hidden_states: None, or the embeddings then every layer's output (num_hidden_layers + 1 tensors, the last
    one before the final layer norm), as transformers returns them with output_hidden_states=True.
    """

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, index: int | str) -> Any:
        """out[0] / out["last_hidden_state"], as on a transformers ModelOutput (diffusers indexes it)."""
        if isinstance(index, str):
            return getattr(self, index)
        values = (self.last_hidden_state, self.pooler_output, self.hidden_states)
        return tuple(v for v in values if v is not None)[index]


class TowerShape(Protocol):
    """What a CLIP transformer layer reads from its config: the text and the vision towers (clip_vision) share
    the layers, each with its own config class."""

    @property
    def hidden_size(self) -> int: ...
    @property
    def intermediate_size(self) -> int: ...
    @property
    def num_attention_heads(self) -> int: ...
    @property
    def num_hidden_layers(self) -> int: ...
    @property
    def hidden_act(self) -> Literal["quick_gelu", "gelu"]: ...
    @property
    def layer_norm_eps(self) -> float: ...


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biases. x: (B, L, D), mask: None or bool (B, 1, L, L) -> (B, L, D).

    causal: with mask None, each token attends to itself and the ones before it (the text tower); False: to every
    token (the vision tower's patches)."""

    def __init__(self, dim: int, heads: int, *, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # SDPA directly: layers.attention's helper takes no mask, and CLIP needs a causal one (plus padding).
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal) if mask is None else \
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, dim))


class CLIPMLP(nn.Module):
    def __init__(self, config: TowerShape):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)). x: (B, L, D) -> (B, L, D). causal: as CLIPAttention's."""

    def __init__(self, config: TowerShape, *, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads, causal=causal)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Positions 0..L-1 are the first L rows: a slice, no index buffer (and none in the state dict).
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPTextEncoder(nn.Module):
    """The stack of layers (`encoder.layers.N`, transformers' names); causal for text, not for image patches."""

    def __init__(self, config: TowerShape, *, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, causal=causal) for _ in range(config.num_hidden_layers))


class TransformersTextFolder:
    """config.json and folder I/O shared by the CLIP text classes: transformers' CLIPTextConfig keys, strictly read,
    the class's transformers name as `architectures`, and transformers' file layout on save (no latentdiff keys)."""

    architecture: ClassVar[str]  # the transformers class that loads the folder (config.json `architectures`)

    @classmethod
    def from_file_config(cls, data: Mapping[str, Any], *, source: str | None = None) -> CLIPTextConfig:
        known = set(FILE_KEYS) | set(FIXED_KEYS) | MACHINERY_KEYS | UNREAD_KEYS
        unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in a CLIP text model config", where=source,
                              expected=f"keys among {sorted(known)}", found=unknown)
        check_supported(data, fixed_keys(cls.architecture), source=source)
        if cls.architecture != ARCHITECTURE and data.get("architectures") != [cls.architecture]:
            raise ConfigError(f"a {cls.architecture} config must name its class", where=source,
                              expected=f"architectures: [{cls.architecture!r}] (else the file holds the tower alone)",
                              found=repr(data.get("architectures")))
        fields = {key: data[key] for key in FILE_KEYS if key in data}
        try:
            return CLIPTextConfig(**fields)
        except ConfigError as e:
            raise ConfigError(e.message, where=f"{source}: {e.where}" if source else e.where, expected=e.expected,
                              found=e.found) from None

    def to_file_config(self) -> dict[str, Any]:
        """A config.json that transformers' CLIPTextConfig reads to the same model."""
        config: Any = self.config  # type: ignore[attr-defined]  # the ModelMixin's CLIPTextConfig
        return {"architectures": [self.architecture], "model_type": MODEL_TYPE, "attention_dropout": 0.0,
                **config.to_dict()}

    def save_pretrained(self, save_directory: str | os.PathLike, *,
                        state_dict: Mapping[str, torch.Tensor] | None = None, variant: str | None = None) -> Path:
        """Write config.json + model.safetensors into `save_directory` (each file atomically), as transformers
        does: the folder may hold other files (a tokenizer). `state_dict` replaces the model's own (e.g. with
        `text_model.`-prefixed keys); transformers' class of the same name loads the folder."""
        folder = Path(save_directory)
        self.write_files(folder, variant=variant, state_dict=state_dict)  # type: ignore[attr-defined]
        return folder

    def file_config(self) -> dict[str, Any]:
        """transformers' config.json as it is: no latentdiff entries (transformers loads the folder)."""
        return dict(self.to_file_config())


def fixed_keys(architecture: str) -> dict[str, Any]:
    """FIXED_KEYS for one class: a CLIPTextModel folder may leave `architectures` out (transformers' default), a
    CLIPTextModelWithProjection folder must name it (checked in from_file_config: an absent key passes here)."""
    if architecture == ARCHITECTURE:
        return FIXED_KEYS
    return {**FIXED_KEYS, "architectures": ([architecture],)}


class CLIPTextModel(TransformersTextFolder, ModelMixin[CLIPTextConfig]):
    """CLIP's text tower. input_ids: (B, L) token ids, L <= max_position_embeddings -> CLIPTextOutput.

        model = CLIPTextModel.from_pretrained(sd_folder, subfolder="text_encoder")
        context = model(input_ids).last_hidden_state            # (B, L, hidden_size)
    """

    config_class = CLIPTextConfig
    weights_name = "model"  # transformers' file name: model.safetensors
    # model_index.json entry of a folder it is saved in: transformers (and diffusers) load it as their own class
    library_entry = ("transformers", ARCHITECTURE)
    architecture = ARCHITECTURE

    def __init__(self, config: CLIPTextConfig):
        super().__init__(config)
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPTextEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                output_hidden_states: bool = False) -> CLIPTextOutput:
        """attention_mask: None, or (B, L) with 0 at padding, which no token then attends to (besides the causal
        mask); Stable Diffusion passes none."""
        check_input_ids(input_ids, self.config.max_position_embeddings)
        x = self.embeddings(input_ids)
        mask = None
        if attention_mask is not None:
            n = input_ids.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            mask = causal & attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
        hidden = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            x = layer(x, mask)
            if hidden is not None:
                hidden.append(x)
        x = self.final_layer_norm(x)
        return CLIPTextOutput(last_hidden_state=x, pooler_output=self.pooled(x, input_ids),
                              hidden_states=tuple(hidden) if hidden is not None else None)

    def pooled(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The end token's state (B, D), by transformers' rule: configs from before its fix (eos_token_id 2)
        take the highest token id (OpenAI's end token is the last of the vocabulary), others the first end token."""
        ids = input_ids.to(device=last_hidden_state.device, dtype=torch.int)
        end = ids.argmax(dim=-1) if self.config.eos_token_id == 2 else \
            (ids == self.config.eos_token_id).int().argmax(dim=-1)
        return last_hidden_state[torch.arange(ids.shape[0], device=ids.device), end]

    # ---- weights ----------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, config: CLIPTextConfig, state: Mapping[str, torch.Tensor], *,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        source: str | None = None, key_names: Mapping[str, str] | None = None) -> CLIPTextModel:
        """Strict load of either key layout (with or without `text_model.`); an old position-id buffer is dropped."""
        if state and all(k.startswith(WEIGHTS_PREFIX) for k in state):
            state = {k[len(WEIGHTS_PREFIX):]: v for k, v in state.items()}
            key_names = {k.removeprefix(WEIGHTS_PREFIX): v for k, v in (key_names or {}).items()}
        state = {k: v for k, v in state.items() if k != POSITION_IDS_KEY}
        return super().from_state_dict(config, state, torch_dtype=torch_dtype, device=device, source=source,
                                       key_names=key_names)


@dataclasses.dataclass
class CLIPTextProjectionOutput:
    """What transformers' CLIPTextModelOutput holds: text_embeds (B, projection_dim), the projected pooled state;
    last_hidden_state (B, L, D) and hidden_states as in CLIPTextOutput. out[0] is text_embeds, as there (diffusers'
    SDXL encode_prompt takes the pooled embedding as `out[0]` when it is 2-D)."""

    text_embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, index: int | str) -> Any:
        if isinstance(index, str):
            return getattr(self, index)
        values = (self.text_embeds, self.last_hidden_state, self.hidden_states)
        return tuple(v for v in values if v is not None)[index]


class CLIPTextModelWithProjection(TransformersTextFolder, ModelMixin[CLIPTextConfig]):
    """CLIP's text tower and its projection into the joint image-text space: SDXL's OpenCLIP ViT-bigG/14 encoder.

        model = CLIPTextModelWithProjection.from_pretrained(sdxl_folder, subfolder="text_encoder_2")
        out = model(input_ids, output_hidden_states=True)
        context, pooled = out.hidden_states[-2], out.text_embeds     # SDXL: (B, L, 1280), (B, 1280)

    The tower sits under `text_model` (transformers' parameter names: `text_model.encoder.layers.0...`,
    `text_projection.weight`), so its state dict is transformers' file as it is.
    """

    config_class = CLIPTextConfig
    weights_name = "model"
    library_entry = ("transformers", PROJECTION_ARCHITECTURE)
    architecture = PROJECTION_ARCHITECTURE

    def __init__(self, config: CLIPTextConfig):
        super().__init__(config)
        self.text_model = CLIPTextModel(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token table (check_token_ids reads its rows, as on transformers' model)."""
        return self.text_model.embeddings.token_embedding

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                output_hidden_states: bool = False) -> CLIPTextProjectionOutput:
        """input_ids: (B, L); attention_mask as CLIPTextModel's. text_embeds: the pooled state (the end token's,
        after the final layer norm) times the projection, (B, projection_dim)."""
        out = self.text_model(input_ids, attention_mask, output_hidden_states=output_hidden_states)
        return CLIPTextProjectionOutput(text_embeds=self.text_projection(out.pooler_output),
                                        last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states)

    @classmethod
    def from_state_dict(cls, config: CLIPTextConfig, state: Mapping[str, torch.Tensor], *,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        source: str | None = None,
                        key_names: Mapping[str, str] | None = None) -> CLIPTextModelWithProjection:
        """Strict load of transformers' layout (`text_model.*` + `text_projection.weight`) or the flat one (the
        tower's keys without `text_model.`); an old position-id buffer is dropped."""
        def ours(key: str) -> str:
            return key if key.startswith((WEIGHTS_PREFIX, PROJECTION_KEY)) else WEIGHTS_PREFIX + key

        flat = not any(k.startswith(WEIGHTS_PREFIX) for k in state)
        if flat:
            state = {ours(k): v for k, v in state.items()}
            key_names = {ours(k): v for k, v in (key_names or {}).items()} if key_names else key_names
        state = {k: v for k, v in state.items() if k != WEIGHTS_PREFIX + POSITION_IDS_KEY}
        return super().from_state_dict(config, state, torch_dtype=torch_dtype, device=device, source=source,
                                       key_names=key_names)


# Keys that only matter to transformers' machinery (class lookup, dtype on load, init, generation, task heads):
# the encoder's output does not depend on them.
MACHINERY_KEYS = frozenset({
    "architectures", "transformers_version", "dtype", "torch_dtype", "init_std", "use_cache", "classifier_dropout",
    "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "use_bfloat16", "tf_legacy_loss", "tie_word_embeddings",
    "chunk_size_feed_forward", "cross_attention_hidden_size", "id2label", "label2id", "num_labels", "problem_type",
    "finetuning_task", "task_specific_params", "tokenizer_class", "prefix",
    # generation settings that transformers 4.x wrote into model configs
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})


def check_input_ids(input_ids: Any, max_positions: int | None) -> None:
    """input_ids must be (B, L) integer token ids with 1 <= L <= max_positions (None: no upper bound known);
    checked without a host sync."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point() \
            or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise InputError("input_ids must be a 2-D tensor of integer token ids", where="input_ids",
                         expected="(B, L) integer tensor", found=describe(input_ids))
    length = input_ids.shape[1]
    if length < 1 or (max_positions is not None and length > max_positions):
        raise InputError("token count out of range of the position embeddings", where="input_ids",
                         expected=f"1 <= L <= {max_positions}" if max_positions is not None else "L >= 1",
                         found=f"L = {length}")
