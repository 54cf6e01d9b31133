"""The prompt encoder: a tokenizer and a text model, returning what the UNet attends to.

Latent diffusion conditions the denoiser on a sequence of token embeddings tau_theta(y) (Rombach et al.
2022, sec. 3.3): Stable Diffusion 1.x uses CLIP ViT-L/14's last hidden states (after the final layer
norm), SD 2.x OpenCLIP's penultimate ones. The file formats are transformers': `TextEncoder` wraps a
text model and its tokenizer and adds only what diffusion needs: fixed-length padding, the choice of
layer, strict loading, and the diffusers folder layout (`text_encoder/` + `tokenizer/`).

Loading a CLIP text model (with or without projection), a CLIP tokenizer or a plain tokenizer.json builds
latentdiff's own classes (`clip_text.CLIPTextModel` / `CLIPTextModelWithProjection`, `tokenizers`), which
compute the same thing without importing transformers (seconds of a cold start); any other text model or
tokenizer loads through transformers, as do all of them with LATENTDIFF_TEXT_BACKEND=transformers (parity
checks, debugging). `TextEncoder(model, tokenizer)` takes either kind. transformers is imported inside functions
only, so `import latentdiff` stays cheap. The loading itself (`load_text_model`, `load_tokenizer`) is in
`text_model_loading`; its names stay importable from here.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .. import hub
from ..config import ComponentConfig, is_int, read_json
from ..errors import ConfigError, InputError, describe
from ..registry import COMPONENTS, SINGLE_FILE
from ..utils.devices import check_device
from ..utils.dtypes import resolve_torch_dtype
from ..version import __version__
from .clip_text import (  # noqa: F401
    MACHINERY_KEYS,
    MODEL_TYPE,
    PROJECTION_ARCHITECTURE,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    check_input_ids,
)
from .text_model_loading import (  # noqa: F401  (re-exported: they were defined here)
    BACKEND_ENV,
    BACKENDS,
    ENCODER_CLASS_SUFFIXES,
    GENERIC_TOKENIZER_CLASSES,
    MODEL_CONFIG,
    VOCAB_FILES,
    _native_tokenizer,
    _weight_files,
    _weight_names,
    load_text_model,
    load_tokenizer,
    native_backend,
    native_class_of,
    native_config_of,
)
from .tokenizers import check_token_ids

CONFIG_FILE = "latentdiff_text_encoder.json"  # beside the transformers files; absent -> defaults
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "tokenizer.model")
# Where the final layer norm lives: CLIPTextModel in transformers 5 / in 4.x and CLIPTextModelWithProjection,
# T5EncoderModel. The penultimate layer goes through it, as the last layer does (diffusers' clip_skip).
FINAL_NORM_PATHS = ("final_layer_norm", "text_model.final_layer_norm", "encoder.final_layer_norm")
# transformers 5 flattened CLIPTextModel (no `text_model.` level); checkpoints in the wild and transformers 4
# keep the prefix. Writing it keeps saved folders loadable by both (transformers 5 strips it on load).
LEGACY_WEIGHT_PREFIX = {"CLIPTextModel": "text_model."}
MAX_SANE_LENGTH = 1_000_000  # tokenizers without a limit report model_max_length = 1e30


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig(ComponentConfig):
    max_length: int | None = None  # tokens per prompt (padded / truncated); None: the tokenizer's model_max_length
    layer: Literal["last", "penultimate"] = "last"  # penultimate: SD 2.x (diffusers' clip_skip=1)
    apply_final_norm: bool = True  # pass the penultimate layer through the final layer norm, as diffusers does
    use_attention_mask: bool | None = None  # None: the model config's use_attention_mask (CLIP: no mask)

    def validate(self) -> None:
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError("max_length must leave room for the start and end tokens", where="max_length",
                              expected=">= 2", found=self.max_length)


@COMPONENTS.register("text_encoder")
class TextEncoder(nn.Module):
    """prompts -> (B, L, D) token embeddings for cross-attention; L = max_length, D = hidden_size.

        encoder = TextEncoder.from_pretrained(sd_folder, "text_encoder", tokenizer_subfolder="tokenizer")
        cond = encoder(["a photo of a cat"])          # (1, 77, 768) for SD 1.x
        cond = encoder.encode_ids(encoder.tokenize(["a photo of a cat"]))   # the same, in two steps

    `model` is a text model whose output has last_hidden_state and hidden_states: latentdiff's or transformers'
    CLIPTextModel for SD 1.x / 2.x, or any transformers encoder; `tokenizer` is latentdiff's or transformers'
    tokenizer for it. Gradients flow as usual: wrap calls in torch.no_grad() / inference_mode() for inference.
    """

    config_class: ClassVar[type[ComponentConfig]] = TextEncoderConfig
    registry_name: ClassVar[str]

    def __init__(self, model: nn.Module, tokenizer: Any, config: TextEncoderConfig | None = None):
        super().__init__()
        config = TextEncoderConfig() if config is None else config
        if not isinstance(config, TextEncoderConfig):
            raise ConfigError("TextEncoder needs a TextEncoderConfig", where="config",
                              expected="TextEncoderConfig", found=describe(config))
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise ConfigError("model must be a text model with a config", where="model",
                              expected="e.g. latentdiff's or transformers' CLIPTextModel", found=describe(model))
        if not callable(tokenizer):
            raise ConfigError("tokenizer must be a tokenizer", where="tokenizer",
                              expected="e.g. latentdiff's or transformers' CLIPTokenizer",
                              found=describe(tokenizer))
        self.model, self.tokenizer, self.config = model, tokenizer, config
        check_token_ids(tokenizer, model)
        self._max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        self._max_length = self._resolve_max_length()
        self._use_mask = bool(getattr(model.config, "use_attention_mask", False)
                              if config.use_attention_mask is None else config.use_attention_mask)
        self._norm_path = self._find_final_norm() if config.layer == "penultimate" and config.apply_final_norm else None
        self._warned_truncation = False
        # a multi-vector textual-inversion token -> "tok tok_1 ... tok_{n-1}" (latentdiff.adapters.embeddings)
        self.token_expansions: dict[str, str] = {}

    def _resolve_max_length(self) -> int:
        length = self.config.max_length
        if length is None:
            length = getattr(self.tokenizer, "model_max_length", None)
            if length is None or length > MAX_SANE_LENGTH:  # the tokenizer sets no limit: use the model's
                length = self._max_positions
        if length is None:
            raise ConfigError("cannot tell how many tokens a prompt has", where="max_length",
                              expected="TextEncoderConfig(max_length=...)", found="no limit in tokenizer or model")
        if self._max_positions is not None and length > self._max_positions:
            raise ConfigError("max_length is longer than the model's position embeddings", where="max_length",
                              expected=f"<= {self._max_positions}", found=length)
        return int(length)

    def _find_final_norm(self) -> str:
        for path in FINAL_NORM_PATHS:
            if _get_path(self.model, path) is not None:
                return path
        raise ConfigError("layer='penultimate' with apply_final_norm needs the model's final layer norm",
                          where=type(self.model).__name__, expected=f"a module at one of {FINAL_NORM_PATHS}, "
                          "or TextEncoderConfig(apply_final_norm=False)", found="none")

    # ---- properties -------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        config: Any = self.model.config  # latentdiff's or transformers' text model config
        return int(config.hidden_size)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- encoding ---------------------------------------------------------------------------
    def forward(self, prompts: str | Sequence[str], *, clip_skip: int | None = None) -> torch.Tensor:
        """prompts: a string or B strings -> (B, max_length, hidden_size) on the model's device and dtype.
        clip_skip: see `encode_ids`."""
        self.check_clip_skip(clip_skip)
        input_ids, attention_mask = self._tokenize(prompts)
        mask = attention_mask if self._use_mask else None
        if clip_skip:
            return self.encode_ids(input_ids, attention_mask=mask, clip_skip=clip_skip)
        return self.encode_ids(input_ids, attention_mask=mask)

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """prompts -> input_ids (B, max_length) int64 on the CPU: padded, and truncated with a warning."""
        return self._tokenize(prompts)[0]

    def encode_ids(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                   clip_skip: int | None = None) -> torch.Tensor:
        """input_ids: (B, L) integer token ids -> (B, L, hidden_size), from the layer the config names.

        clip_skip: that many more layers skipped, the hidden states then passed through the final layer norm, as
        diffusers' clip_skip (1: the penultimate layer; A1111's "Clip skip: 2"); None or 0: the config's layer."""
        self.check_clip_skip(clip_skip)
        skip = int(clip_skip or 0) + (self.config.layer == "penultimate")
        if skip == 0:
            check_input_ids(input_ids, self._max_positions)
            mask = attention_mask.to(self.device) if attention_mask is not None else None
            return self.model(input_ids=input_ids.to(self.device), attention_mask=mask).last_hidden_state
        return self._encode(input_ids, attention_mask, skip, self.config.apply_final_norm)[0]

    def encode_with_pooled(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                           layer: Literal["last", "penultimate"] | None = None,
                           apply_final_norm: bool | None = None,
                           clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids: (B, L) -> (hidden (B, L, hidden_size), pooled (B, P)), from one forward pass: what SDXL
        conditions on. pooled is the end-of-text token's final (layer-normed) state, projected where the model has
        a projection (CLIPTextModelWithProjection's `text_embeds`: P = projection_dim; else `pooler_output`:
        P = hidden_size). It does not depend on the layer or clip_skip, as in diffusers.

        layer / apply_final_norm: this call's choice of hidden states, in place of the config's (None: the
        config's). SDXL takes both encoders' penultimate layer WITHOUT the final norm: layer="penultimate",
        apply_final_norm=False, i.e. hidden_states[-2]. clip_skip counts further back from that layer, so with
        SDXL's choice clip_skip=c is hidden_states[-(c + 2)], diffusers' StableDiffusionXLPipeline numbering
        (its clip_skip=1 is the third-to-last hidden state; the SD 1.x meaning of clip_skip=1, the penultimate
        layer, is SDXL's default)."""
        layer = self.config.layer if layer is None else layer
        norm = self.config.apply_final_norm if apply_final_norm is None else apply_final_norm
        if layer not in ("last", "penultimate") or not isinstance(norm, bool):
            raise InputError("unknown choice of hidden states", where="layer" if layer not in (
                "last", "penultimate") else "apply_final_norm", expected="layer 'last' | 'penultimate', "
                "apply_final_norm a bool", found=f"layer={layer!r}, apply_final_norm={norm!r}")
        self._check_clip_skip(clip_skip, self._skip_layers(layer, norm))
        skip = int(clip_skip or 0) + (layer == "penultimate")
        hidden, out = self._encode(input_ids, attention_mask, skip, norm)
        pooled = getattr(out, "text_embeds", None)
        pooled = out.pooler_output if pooled is None else pooled
        return hidden, pooled

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, skip: int,
                norm: bool) -> tuple[torch.Tensor, Any]:
        """(the hidden states `skip` layers before the last, through the final norm if `norm`, the model's whole
        output). skip 0 is last_hidden_state whatever `norm` says: the norm is the tower's own there, and
        `apply_final_norm` is about the layers before it (as TextEncoderConfig's)."""
        check_input_ids(input_ids, self._max_positions)
        device = self.device
        mask = attention_mask.to(device) if attention_mask is not None else None
        out = self.model(input_ids=input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        if skip == 0:
            return out.last_hidden_state, out
        hidden = out.hidden_states[-(skip + 1)]
        if not norm:
            return hidden, out
        path = self._norm_path or self._find_final_norm()
        return _get_path(self.model, path)(hidden), out

    @property
    def clip_skip_layers(self) -> int | None:
        """How many layers the output comes after (clip_skip counts back from it: 0 <= clip_skip < this); None: a
        model without layers to skip (no hidden states per layer, or no final layer norm to pass them through)."""
        return self._skip_layers(self.config.layer, self.config.apply_final_norm)

    def _skip_layers(self, layer: str, apply_final_norm: bool) -> int | None:
        layers = getattr(self.model.config, "num_hidden_layers", None)
        if not isinstance(layers, int) or (apply_final_norm and not any(
                _get_path(self.model, path) is not None for path in FINAL_NORM_PATHS)):
            return None
        return layers - (layer == "penultimate")

    def check_clip_skip(self, clip_skip: Any) -> None:
        """An InputError naming clip_skip unless it is None or an int in [0, clip_skip_layers)."""
        self._check_clip_skip(clip_skip, self.clip_skip_layers)

    def _check_clip_skip(self, clip_skip: Any, layers: int | None) -> None:
        if clip_skip is None:
            return
        if layers is None:
            raise InputError("this text encoder has no layers to skip", where="clip_skip",
                             expected="clip_skip=None (it is for CLIP text encoders)", found=type(self.model).__name__)
        if not is_int(clip_skip) or not 0 <= clip_skip < layers:
            raise InputError("clip_skip must be a number of layers to skip", where="clip_skip",
                             expected=f"an int in [0, {layers}) (layers counted back from the chosen layer; with "
                                      "the last one chosen, 1 is the penultimate)", found=repr(clip_skip))

    def expand_tokens(self, prompts: list[str]) -> list[str]:
        """Each multi-vector embedding token of a prompt replaced by its n tokens (`tok` -> `tok tok_1 tok_2`), as
        diffusers' maybe_convert_prompt: where the prompt's tokens include the embedding's first token."""
        expansions = getattr(self, "token_expansions", None)
        if not expansions:
            return prompts
        vocab = self.tokenizer.get_vocab()
        ids = {vocab[t]: (t, text) for t, text in expansions.items() if t in vocab}
        out = []
        for prompt, found in zip(prompts, self.tokenizer(prompts, add_special_tokens=False)["input_ids"], strict=True):
            for index in sorted(set(found) & set(ids)):
                token, text = ids[index]
                prompt = prompt.replace(token, text)
            out.append(prompt)
        return out

    def _tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = self.expand_tokens(_check_prompts(prompts))
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self._max_length, truncation=True,
                                return_attention_mask=True, return_tensors="pt")
        if not self._warned_truncation:
            self._warn_if_truncated(prompts, tokens["attention_mask"])
        return tokens["input_ids"], tokens["attention_mask"]

    def _warn_if_truncated(self, prompts: list[str], attention_mask: torch.Tensor) -> None:
        # Only a prompt that fills every position can have been cut; re-tokenize just those, unpadded.
        full = [p for p, last in zip(prompts, attention_mask[:, -1].tolist(), strict=True) if last]
        if not full:
            return
        lengths = [len(ids) for ids in self.tokenizer(full, truncation=False, verbose=False)["input_ids"]]
        dropped = [(n - self._max_length, p) for n, p in zip(lengths, full, strict=True) if n > self._max_length]
        if dropped:
            self._warned_truncation = True
            count, prompt = max(dropped)
            warnings.warn(f"prompt truncated to {self._max_length} tokens: {count} token(s) dropped from "
                          f"{prompt[:60]!r}{'...' if len(prompt) > 60 else ''}"
                          f"{f' (and {len(dropped) - 1} more prompt(s))' if len(dropped) > 1 else ''}; "
                          "further truncations by this encoder are not reported", UserWarning, stacklevel=3)

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, subfolder: str | None = None, *,
                        tokenizer_subfolder: str | None = None, revision: str | None = None,
                        variant: str | None = None, torch_dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, cache_dir: str | os.PathLike | None = None,
                        token: str | bool | None = None, local_files_only: bool | None = None,
                        tokenizer: Any = None, config: TextEncoderConfig | None = None) -> TextEncoder:
        """Load a transformers text model folder (+ tokenizer folder) from a local folder or a Hub id.

        `subfolder` holds the model (config.json + weights), `tokenizer_subfolder` the tokenizer (default: the
        same folder). `config` overrides the folder's latentdiff_text_encoder.json (absent: defaults).
        Loading is strict: a missing, unexpected or mis-shaped weight is a CheckpointError.
        """
        model_prefix = f"{subfolder}/" if subfolder else ""
        tok_sub = tokenizer_subfolder if tokenizer_subfolder is not None else subfolder
        tok_prefix = f"{tok_sub}/" if tok_sub else ""
        stem = f"model.{variant}" if variant else "model"
        patterns = [f"{model_prefix}{MODEL_CONFIG}", f"{model_prefix}{CONFIG_FILE}",
                    *(f"{model_prefix}{name}" for name in _weight_names(stem))]
        if tokenizer is None:
            patterns += [f"{tok_prefix}{name}" for name in TOKENIZER_FILES]
        location = hub.HubLocation(revision=revision, cache_dir=cache_dir, token=token,
                                   local_files_only=local_files_only)
        root = location.resolve(path_or_id, allow_patterns=patterns)
        folder = root / subfolder if subfolder else root
        if not _weight_files(folder, stem):  # an older repo without safetensors: its safe (weights-only) pickle
            stem = f"pytorch_model.{variant}" if variant else "pytorch_model"
            pickles = [f"{model_prefix}{n}" for n in _weight_names(stem, ".bin")]
            root = location.resolve(path_or_id, allow_patterns=pickles)
        if tokenizer is None:
            tokenizer = load_tokenizer(root / tok_sub if tok_sub else root)
        if config is None:
            config = TextEncoderConfig.from_json_file(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() \
                else TextEncoderConfig()
        torch_dtype = resolve_torch_dtype(torch_dtype, device=device, model=str(path_or_id))[0]
        model = load_text_model(folder, variant=variant, torch_dtype=torch_dtype)
        if device is not None:
            model.to(check_device(device))
        return cls(model, tokenizer, config)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, *, original_config: Any = None, tokenizer: Any = None,
                         torch_dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                         cache_dir: str | os.PathLike | None = None,
                         local_files_only: bool | None = None) -> TextEncoder:
        """The conditioning stage of an original single file (CLIP for SD 1.x, OpenCLIP for SD 2.x, LDMBert),
        built strictly, with its tokenizer.

        The file holds no tokenizer: `tokenizer=` (a tokenizer, a folder or a Hub id), else the conventional
        repository in the local Hub cache (openai/clip-vit-large-patch14 for SD 1.x, stabilityai/stable-diffusion-2
        for SD 2.x), else the Hub unless offline (HF_HUB_OFFLINE=1 or local_files_only=True); failing all three,
        a CheckpointError says which (see latentdiff.convert.tokenizers).
        """
        return SINGLE_FILE.get("text_encoder_from_single_file")(
            cls, path, original_config=original_config, tokenizer=tokenizer, torch_dtype=torch_dtype,
            device=device, cache_dir=cache_dir, local_files_only=local_files_only)

    # ---- saving -----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *,
                        tokenizer_directory: str | os.PathLike | None = None, variant: str | None = None) -> Path:
        """Write model (safetensors) + config + tokenizer atomically; an interrupted save changes nothing.
        variant: the weights file is model.<variant>.safetensors (load it back with the same variant)."""
        save_directory = Path(save_directory).absolute()
        tok_dir = Path(tokenizer_directory).absolute() if tokenizer_directory is not None else save_directory
        if save_directory != tok_dir and save_directory.is_relative_to(tok_dir):
            raise InputError("the model folder cannot lie inside the tokenizer folder (saving would replace it)",
                             where="tokenizer_directory", expected=f"a folder outside {save_directory}",
                             found=str(tok_dir))
        if tok_dir.is_relative_to(save_directory):  # the same folder, or one inside it
            with hub.atomic_folder(save_directory) as tmp:
                self.write_files(tmp, tmp / tok_dir.relative_to(save_directory), variant=variant)
        else:
            with hub.atomic_folder(save_directory) as tmp, hub.atomic_folder(tok_dir) as tok_tmp:
                self.write_files(tmp, tok_tmp, variant=variant)
        return save_directory

    def write_files(self, model_dir: Path, tokenizer_dir: Path, *, variant: str | None = None) -> None:
        """Write the model folder and the tokenizer folder in place (no atomicity: callers wrap it)."""
        model_dir, tokenizer_dir = Path(model_dir), Path(tokenizer_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        tokenizer_dir.mkdir(parents=True, exist_ok=True)
        legacy = not hasattr(self.model, "text_model")  # transformers 5's flat layout
        prefix = LEGACY_WEIGHT_PREFIX.get(type(self.model).__name__, "") if legacy else ""
        state = {prefix + k: v for k, v in self.model.state_dict().items()}
        settings, layers = self.config, None
        if self.config.layer == "penultimate":   # written as diffusers' SD 2.x folders are: the tower truncated
            state, layers = self._truncated(state)
            settings = dataclasses.replace(self.config, layer="last")
        model: Any = self.model  # latentdiff's or transformers' text model: both have this save_pretrained
        model.save_pretrained(model_dir, state_dict=state, variant=variant)
        if layers is not None:
            written = read_json(model_dir / MODEL_CONFIG) | {"num_hidden_layers": layers}
            hub.write_json(written, model_dir / MODEL_CONFIG)
        hub.write_json({**settings.to_dict(), "_latentdiff_version": __version__}, model_dir / CONFIG_FILE)
        self.tokenizer.save_pretrained(tokenizer_dir)

    def _truncated(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """(state without the last layer, the layer count left): a tower whose last hidden state is this encoder's
        penultimate one through the final layer norm, which every library reads as the text model's output
        (diffusers, and latentdiff with layer="last"), so no reader of the folder conditions on the last layer."""
        layers = getattr(self.model.config, "num_hidden_layers", None)
        layers = layers if isinstance(layers, int) else 0
        last = [k for k in state if f"encoder.layers.{layers - 1}." in k]
        if not last or layers < 2 or not self.config.apply_final_norm:
            raise ConfigError("layer='penultimate' cannot be written as a diffusers folder for this text model",
                              where="text_encoder.config.layer", expected="a CLIP tower of >= 2 layers, with "
                              "apply_final_norm=True (diffusers reads the last hidden state through the final norm)",
                              found=f"{type(self.model).__name__}, {layers} layers, "
                                    f"apply_final_norm={self.config.apply_final_norm}")
        return {k: v for k, v in state.items() if k not in set(last)}, layers - 1

    def diffusers_entries(self) -> dict[str, list[str]]:
        """model_index.json entries for this part, e.g. {"text_encoder": ["transformers", "CLIPTextModel"], ...}
        (latentdiff's own CLIP classes name the transformers classes that load their files)."""
        return {"text_encoder": library_entry(self.model), "tokenizer": library_entry(self.tokenizer)}


def _get_path(module: Any, path: str | None) -> Any:
    for name in (path or "").split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _library(obj: Any) -> str:
    return type(obj).__module__.split(".")[0]


def library_entry(obj: Any) -> list[str]:
    """[library, class] of a model or tokenizer for model_index.json: latentdiff's own text classes give the
    transformers class that loads their files (`library_entry`), other objects their own."""
    entry = getattr(type(obj), "library_entry", None)
    return list(entry) if entry is not None else [_library(obj), type(obj).__name__]


def _check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        return list(prompts)
    raise InputError("prompts must be a string or a non-empty list of strings", where="prompts",
                     expected="str | list[str]", found=describe(prompts))
