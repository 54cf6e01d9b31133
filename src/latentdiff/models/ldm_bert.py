"""LDMBert: the text encoder of LDM's text-to-image model (CompVis/ldm-text2im-large-256, `bert/` folder).

Rombach et al. 2022 (sec. 4.3.1, app. E.2) condition their 1.45B text-to-image LDM on a 32-layer pre-norm
transformer trained from scratch on LAION-400M with BERT's tokenizer: token + learned position
embeddings, 32 x [x + Attn(LN(x)), x + FFN(LN(x))], a final LayerNorm; its last hidden states are the
cross-attention context tau_theta(y) of the UNet. In the released model the attention is narrower than
the stream (8 heads x 64 = 512 < d_model = 1280).

transformers has no such class; diffusers carries one (`LDMBertModel`). This is ours, with the same
parameter names so the Hub folder loads strictly, and attention through SDPA. The folder is
transformers-style: `config.json` (LDMBertConfig keys) + `model.safetensors` (or an older
`pytorch_model.bin`). `LDMBertTextEncoder` adds BERT's tokenizer, so the pipeline uses it like `TextEncoder`.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import hub, limits
from ..config import ComponentConfig
from ..errors import CheckpointError, ConfigError, InputError, describe
from ..layers.attention import attention
from ..registry import COMPONENTS
from ..utils.dtypes import resolve_torch_dtype
from ..version import __version__
from . import structure
from .base import CONFIG_NAME, ModelMixin
from .diffusers_config import check_supported
from .text_encoder import (
    CONFIG_FILE,
    MACHINERY_KEYS,
    TOKENIZER_FILES,
    TextEncoder,
    TextEncoderConfig,
    check_input_ids,
    library_entry,
    native_backend,
)

MODEL_TYPE = "ldmbert"
ARCHITECTURE = "LDMBertModel"
# diffusers' LDMTextToImagePipeline pads and truncates every prompt to 77 tokens (as CompVis' BERTEmbedder).
LDM_MAX_LENGTH = 77
# transformers' pickle name: folders saved before safetensors hold `pytorch_model.bin` instead of `model.safetensors`.
LEGACY_WEIGHTS_NAME = "pytorch_model"
# The checkpoint keeps the language-model head of pre-training (to_logits: d_model -> vocab, 39M parameters in
# the released model). Conditioning uses hidden states only, so the head is checked and dropped on load.
LM_HEAD_KEYS = ("to_logits.weight", "to_logits.bias")
FP16_LIMIT = torch.finfo(torch.float16).max - 1000  # as diffusers: keep fp16 activations finite

# config.json keys of the model itself: file key -> LDMBertConfig field.
FILE_KEYS = {"vocab_size": "vocab_size", "max_position_embeddings": "max_position_embeddings",
             "d_model": "d_model", "encoder_layers": "encoder_layers", "encoder_ffn_dim": "encoder_ffn_dim",
             "encoder_attention_heads": "encoder_attention_heads", "head_dim": "head_dim",
             "activation_function": "activation", "dropout": "dropout", "activation_dropout": "activation_dropout",
             "pad_token_id": "pad_token_id"}
# Keys that change the model, accepted only at the value we implement (neither diffusers nor we implement
# layerdrop or embedding scaling; attention dropout would need an SDPA dropout_p we don't pass).
FIXED_KEYS: dict[str, Any] = {"model_type": MODEL_TYPE, "scale_embedding": False, "encoder_layerdrop": (0.0, 0),
                              "attention_dropout": (0.0, 0), "is_encoder_decoder": False, "is_decoder": False,
                              "add_cross_attention": False, "pruned_heads": ({},)}


@dataclasses.dataclass(frozen=True)
class LDMBertConfig(ComponentConfig):
    """Defaults: the released model of CompVis/ldm-text2im-large-256."""

    vocab_size: int = 30522                  # BERT's uncased WordPiece vocabulary
    max_position_embeddings: int = 77        # learned positions = tokens per prompt
    d_model: int = 1280                      # width of the residual stream = UNet context_dim
    encoder_layers: int = 32
    encoder_ffn_dim: int = 5120
    encoder_attention_heads: int = 8
    head_dim: int = 64                       # heads * head_dim need not equal d_model (512 vs 1280 here)
    activation: Literal["gelu"] = "gelu"     # exact (erf) GELU
    dropout: float = 0.1                     # residual-stream dropout; training only
    activation_dropout: float = 0.0          # dropout after the FFN activation; training only
    pad_token_id: int = 0                    # [PAD]; kept for the file, padding is attended like any token

    def validate(self) -> None:
        for name in ("vocab_size", "max_position_embeddings", "d_model", "encoder_layers", "encoder_ffn_dim",
                     "encoder_attention_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive", where=name, expected=">= 1", found=getattr(self, name))
        structure.check_counts([("vocab_size", self.vocab_size, limits.MAX_VOCAB),
                                ("d_model", self.d_model, limits.MAX_CHANNELS),
                                ("encoder_ffn_dim", self.encoder_ffn_dim, 4 * limits.MAX_CHANNELS),
                                ("encoder_layers", self.encoder_layers, limits.MAX_TEXT_LAYERS),
                                ("encoder_attention_heads", self.encoder_attention_heads, limits.MAX_HEADS),
                                ("head_dim", self.head_dim, limits.MAX_CHANNELS),
                                ("max_position_embeddings", self.max_position_embeddings, limits.MAX_TEXT_LENGTH)])
        structure.check_parameters(structure.estimate_text_parameters(
            self.vocab_size, self.d_model, self.encoder_ffn_dim, self.encoder_layers),
            what="this text encoder", key="d_model")
        for name in ("dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be a probability", where=name, expected="0 <= p < 1",
                                  found=getattr(self, name))


class LDMBertSelfAttention(nn.Module):
    """Multi-head self-attention; q/k/v without bias, as in the checkpoint. x: (B, L, d_model) -> (B, L, d_model)."""

    def __init__(self, dim: int, *, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class LDMBertLayer(nn.Module):
    """Pre-norm transformer layer: x + Attn(LN(x)), then x + FFN(LN(x)). x: (B, L, d_model) -> same."""

    def __init__(self, config: LDMBertConfig):
        super().__init__()
        dim = config.d_model
        self.self_attn = LDMBertSelfAttention(dim, heads=config.encoder_attention_heads, head_dim=config.head_dim)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _dropout(self.self_attn(self.self_attn_layer_norm(x)), self.dropout, self.training)
        h = _dropout(F.gelu(self.fc1(self.final_layer_norm(x))), self.activation_dropout, self.training)
        x = x + _dropout(self.fc2(h), self.dropout, self.training)
        if x.dtype == torch.float16:  # 32 residual additions can overflow fp16; clamping needs no host sync
            x = x.clamp(-FP16_LIMIT, FP16_LIMIT)
        return x


class LDMBertEncoder(nn.Module):
    """Token + position embeddings, the layers, a final LayerNorm. input_ids: (B, L) -> (B, L, d_model)."""

    def __init__(self, config: LDMBertConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList(LDMBertLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.dropout = config.dropout

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Positions 0..L-1 are the first L rows: a slice, no index tensor per call.
        x = self.embed_tokens(input_ids) + self.embed_positions.weight[: input_ids.shape[1]]
        x = _dropout(x, self.dropout, self.training)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training=True) if training and p > 0 else x


@COMPONENTS.register("ldm_bert")
class LDMBert(ModelMixin[LDMBertConfig]):
    """LDM's text transformer. input_ids: (B, L) token ids, L <= max_position_embeddings -> (B, L, d_model)."""

    config_class = LDMBertConfig
    weights_name = "model"  # transformers' file name: model.safetensors

    def __init__(self, config: LDMBertConfig):
        super().__init__(config)
        self.model = LDMBertEncoder(config)  # `model.` prefix of the checkpoint keys

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """-> last_hidden_state (B, L, d_model), after the final LayerNorm; every position attended (no mask)."""
        check_input_ids(input_ids, self.config.max_position_embeddings)
        return self.model(input_ids)

    # ---- config.json (transformers' LDMBertConfig keys) ----------------------------------------
    @classmethod
    def from_file_config(cls, data: Mapping[str, Any], *, source: str | None = None) -> LDMBertConfig:
        known = set(FILE_KEYS) | set(FIXED_KEYS) | MACHINERY_KEYS | {"num_hidden_layers"}
        unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in an LDMBert config", where=source,
                              expected=f"keys among {sorted(known)}", found=unknown)
        check_supported(data, FIXED_KEYS, source=source)
        # transformers writes num_hidden_layers as an alias of encoder_layers; the two must agree.
        layers = data.get("encoder_layers", LDMBertConfig.encoder_layers)
        if data.get("num_hidden_layers", layers) != layers:
            raise ConfigError("num_hidden_layers and encoder_layers disagree", where=source,
                              expected=f"num_hidden_layers == encoder_layers == {layers}",
                              found=data["num_hidden_layers"])
        fields = {field: data[key] for key, field in FILE_KEYS.items() if key in data}
        try:
            return LDMBertConfig(**fields)
        except ConfigError as e:  # name the file's key (activation_function), not only our field (activation)
            key = {field: key for key, field in FILE_KEYS.items()}.get(e.where, e.where)
            raise ConfigError(e.message.replace(repr(e.where), repr(key)), where=f"{source}: {key}" if source else key,
                              expected=e.expected, found=e.found) from None

    def to_file_config(self) -> dict[str, Any]:
        """A config.json that transformers/diffusers' LDMBertConfig reads to the same model."""
        c = self.config
        data = {key: getattr(c, field) for key, field in FILE_KEYS.items()}
        return data | {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "num_hidden_layers": c.encoder_layers,
                       "attention_dropout": 0.0, "encoder_layerdrop": 0.0, "scale_embedding": False}

    # ---- weights ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, subfolder: str | None = None,
                        revision: str | None = None, variant: str | None = None,
                        torch_dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                        local_files_only: bool | None = None, mmap_weights: bool | None = None,
                        check_finite_weights: bool = False) -> LDMBert:
        """Load a `bert/` folder (local or Hub) strictly: model.safetensors, else an older pytorch_model.bin.
        check_finite_weights: scan every tensor once, a NumericalError naming the first holding NaN or Inf.

        The pickle is read with `weights_only=True`, and downloaded only when the folder has no safetensors.
        `mmap_weights`: as for every model (`ModelMixin.from_pretrained`).
        """
        prefix = f"{subfolder}/" if subfolder else ""
        torch_dtype = resolve_torch_dtype(torch_dtype, device=device, model=str(path_or_id))[0]
        where: dict[str, Any] = dict(revision=revision, cache_dir=cache_dir, token=token,
                                     local_files_only=local_files_only)
        root = hub.resolve(path_or_id, allow_patterns=[f"{prefix}{CONFIG_NAME}", f"{prefix}{cls.weights_name}*"],
                           **where)
        folder = root / subfolder if subfolder else root
        if not (folder / CONFIG_NAME).is_file():
            raise CheckpointError(f"no {CONFIG_NAME} in the LDMBert folder", where=str(folder),
                                  expected=f"{CONFIG_NAME} and {cls.weights_name}.safetensors (or pytorch_model.bin)")
        name = cls.weights_name
        if not any(folder.glob(f"{cls.weights_name}*.safetensors*")):
            name = LEGACY_WEIGHTS_NAME
            hub.resolve(path_or_id, allow_patterns=[f"{prefix}{name}*.bin"], **where)
        return cls.from_folder_weights(folder, name, variant=variant, torch_dtype=torch_dtype, device=device,
                                       mmap_weights=mmap_weights, check_finite_weights=check_finite_weights,
                                       part=subfolder or cls.__name__)

    @classmethod
    def from_state_dict(cls, config: LDMBertConfig, state: Mapping[str, torch.Tensor], *,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        source: str | None = None, key_names: Mapping[str, str] | None = None) -> LDMBert:
        """Strict load; the pre-training LM head (to_logits), if present, must have its shape and is dropped."""
        if isinstance(config, LDMBertConfig):
            shapes = dict(zip(LM_HEAD_KEYS, ((config.vocab_size, config.d_model), (config.vocab_size,)), strict=True))
            wrong = [f"{k}: expected {s}, found {tuple(state[k].shape)}" for k, s in shapes.items()
                     if k in state and tuple(state[k].shape) != s]
            if wrong:
                raise CheckpointError("checkpoint does not match LDMBert: wrong shapes " + ", ".join(wrong),
                                      where=source)
            state = {k: v for k, v in state.items() if k not in LM_HEAD_KEYS}
        return super().from_state_dict(config, state, torch_dtype=torch_dtype, device=device, source=source,
                                       key_names=key_names)


@COMPONENTS.register("ldm_bert_text_encoder")
class LDMBertTextEncoder(TextEncoder):
    """BERT tokenizer + LDMBert: prompts -> (B, 77, d_model), tokenized as diffusers' LDMTextToImagePipeline does.

    Every prompt is padded to 77 tokens ([CLS] ... [SEP] [PAD] ...) and truncated past them; no attention
    mask, as in the released model's training. A `TextEncoder`, so the pipeline takes it as its text encoder.
    """

    model: LDMBert

    def __init__(self, model: LDMBert, tokenizer: Any, config: TextEncoderConfig | None = None):
        if not isinstance(model, LDMBert):
            raise ConfigError("LDMBertTextEncoder needs an LDMBert model", where="model", expected="LDMBert",
                              found=describe(model))
        config = TextEncoderConfig(max_length=LDM_MAX_LENGTH) if config is None else config
        if isinstance(config, TextEncoderConfig) and (config.layer != "last" or config.use_attention_mask):
            raise ConfigError("LDMBert conditions on its last layer, without an attention mask", where="config",
                              expected="layer='last', use_attention_mask in (None, False)",
                              found=f"layer={config.layer!r}, use_attention_mask={config.use_attention_mask}")
        super().__init__(model, tokenizer, config)

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    @property
    def clip_skip_layers(self) -> None:
        """None: LDMBert conditions on its last layer only (clip_skip is for CLIP text encoders)."""
        return None

    def encode_ids(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                   clip_skip: int | None = None) -> torch.Tensor:
        """input_ids: (B, L) token ids -> (B, L, d_model). clip_skip: None only (an InputError otherwise)."""
        self.check_clip_skip(clip_skip)
        if attention_mask is not None:
            raise InputError("LDMBert attends to every position and takes no attention mask", where="attention_mask",
                             expected=None, found=describe(attention_mask))
        check_input_ids(input_ids, self.model.config.max_position_embeddings)
        return self.model(input_ids.to(self.device))

    # ---- loading and saving -----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, subfolder: str | None = "bert", *,
                        tokenizer_subfolder: str | None = "tokenizer", revision: str | None = None,
                        variant: str | None = None, torch_dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, cache_dir: str | os.PathLike | None = None,
                        token: str | bool | None = None, local_files_only: bool | None = None,
                        tokenizer: Any = None, config: TextEncoderConfig | None = None) -> LDMBertTextEncoder:
        """Load the `bert/` and `tokenizer/` folders of an LDM text-to-image repo (local or Hub).

        `tokenizer_subfolder=None` reads the tokenizer from the model's folder. `config` overrides the
        folder's latentdiff_text_encoder.json (absent: 77 tokens, as diffusers).
        """
        where: dict[str, Any] = dict(revision=revision, cache_dir=cache_dir, token=token,
                                     local_files_only=local_files_only)
        tok_sub = tokenizer_subfolder if tokenizer_subfolder is not None else subfolder
        model_prefix, tok_prefix = (f"{s}/" if s else "" for s in (subfolder, tok_sub))
        patterns = [f"{model_prefix}{CONFIG_FILE}"] + ([] if tokenizer is not None else
                                                       [f"{tok_prefix}{name}" for name in TOKENIZER_FILES])
        root = hub.resolve(path_or_id, allow_patterns=patterns, **where)
        model = LDMBert.from_pretrained(path_or_id, subfolder=subfolder, variant=variant, torch_dtype=torch_dtype,
                                        device=device, **where)
        if tokenizer is None:
            tokenizer = load_bert_tokenizer(root / tok_sub if tok_sub else root)
        settings = (root / subfolder if subfolder else root) / CONFIG_FILE
        if config is None and settings.is_file():
            config = TextEncoderConfig.from_json_file(settings)
        return cls(model, tokenizer, config)

    def write_files(self, model_dir: Path, tokenizer_dir: Path, *, variant: str | None = None) -> None:
        """Write the `bert/` folder (config.json + model[.variant].safetensors) and the tokenizer folder, in place."""
        model_dir, tokenizer_dir = Path(model_dir), Path(tokenizer_dir)
        self.model.write_files(model_dir, variant=variant)
        hub.write_json({**self.config.to_dict(), "_latentdiff_version": __version__}, model_dir / CONFIG_FILE)
        tokenizer_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(tokenizer_dir)

    def runs_in_diffusers(self) -> bool:
        """Whether diffusers' LDMTextToImagePipeline runs this encoder as latentdiff does: it pads every prompt to
        77 tokens, so the model needs >= 77 positions (the built-in model's has 16: diffusers would fail at its
        first call) and latentdiff must tokenize to 77 too."""
        return self.model.config.max_position_embeddings >= LDM_MAX_LENGTH and self._max_length == LDM_MAX_LENGTH

    def diffusers_entries(self) -> dict[str, list[str]]:
        """model_index.json entries of diffusers' LDMTextToImagePipeline for these two parts."""
        return {"bert": ["latent_diffusion", ARCHITECTURE],
                "tokenizer": _tokenizer_entry(self.tokenizer)}


def _tokenizer_entry(tokenizer: Any) -> list[str]:
    """The [library, class] model_index.json records: transformers 5 calls its generic fast tokenizer
    TokenizersBackend, which older transformers (and diffusers loading through them) know as PreTrainedTokenizerFast."""
    library, name = library_entry(tokenizer)
    return [library, "PreTrainedTokenizerFast" if name == "TokenizersBackend" else name]


def load_bert_tokenizer(folder: Path, *, backend: str | None = None) -> Any:
    """BertTokenizer (vocab.txt) or a fast tokenizer (tokenizer.json) from a local folder, never the network.

    A tokenizer.json alone loads as latentdiff's `tokenizers.FastTokenizer` (no transformers import) unless it
    holds a setting that class does not reproduce, or backend="transformers" (see text_encoder.BACKEND_ENV)."""
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not {"vocab.txt", "tokenizer.json"} & set(present):
        raise CheckpointError("no BERT tokenizer files in the tokenizer folder; pass tokenizer= to from_pretrained",
                              where=str(folder), expected="vocab.txt or tokenizer.json", found=present or "no folder")
    # A folder with only tokenizer.json holds any `tokenizers` pipeline (e.g. the built-in model's word-level
    # one): the fast tokenizer runs it as it is; a vocab.txt is BERT's word-piece vocabulary.
    if "vocab.txt" not in present and native_backend(backend):
        from .tokenizers import load_fast_tokenizer

        try:
            return load_fast_tokenizer(folder)
        except ConfigError:  # a setting not reproduced natively: transformers' PreTrainedTokenizerFast runs it
            pass
    from transformers import BertTokenizer, PreTrainedTokenizerFast

    cls = BertTokenizer if "vocab.txt" in present else PreTrainedTokenizerFast
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"could not load the tokenizer ({type(e).__name__}: {e})", where=str(folder)) from None
