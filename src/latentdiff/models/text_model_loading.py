"""Loading a text model and its tokenizer from a local folder, never the network (the half of `text_encoder` that
reads files; `TextEncoder.from_pretrained` calls it, and `text_encoder` re-exports its names).

A CLIP text model (with or without projection), a CLIP tokenizer or a plain tokenizer.json builds latentdiff's own
classes (`clip_text`, `tokenizers`: no transformers import) unless its config holds a setting they do not
implement, or the backend is "transformers" (the `backend=` argument, else $LATENTDIFF_TEXT_BACKEND); any other
text model or tokenizer loads through transformers, imported inside the functions only.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import hub
from ..config import read_json
from ..errors import CheckpointError, ConfigError
from .clip_text import MODEL_TYPE, PROJECTION_ARCHITECTURE, CLIPTextModel, CLIPTextModelWithProjection

# why a folder goes to transformers: debug lines under the logger they had before the split (users filter on it)
LOGGER = "latentdiff.models.text_encoder"
MODEL_CONFIG = "config.json"
VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.model")
# Base / encoder-only classes whose output has last_hidden_state and hidden_states; anything else -> AutoModel.
ENCODER_CLASS_SUFFIXES = ("Model", "ModelWithProjection")
# "transformers": load every text model and tokenizer with transformers; "auto" (default): the native classes
# where they apply. Also the `backend=` argument of load_text_model / load_tokenizer.
BACKEND_ENV = "LATENTDIFF_TEXT_BACKEND"
BACKENDS = ("auto", "transformers")
# tokenizer_config.json classes that are a tokenizer.json pipeline as it is (transformers 5 / 4 names).
GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(folder: Path, *, backend: str | None = None) -> Any:
    """The tokenizer of a local folder, never the network; a CheckpointError when the folder has no tokenizer.

    A CLIP tokenizer (tokenizer_class CLIPTokenizer) or a plain tokenizer.json (PreTrainedTokenizerFast) loads
    as latentdiff's equivalent (see `tokenizers`); anything else, or backend="transformers", with AutoTokenizer.
    """
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not any(name in present for name in VOCAB_FILES):
        raise CheckpointError("no tokenizer files in the tokenizer folder; pass tokenizer= to from_pretrained",
                              where=str(folder), expected=f"one of {list(VOCAB_FILES)}", found=present or "no folder")
    native = _native_tokenizer(folder, present) if native_backend(backend) else None
    if native is not None:
        return native
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"could not load the tokenizer ({type(e).__name__}: {e})", where=str(folder)) from None


def _native_tokenizer(folder: Path, present: list[str]) -> Any:
    """latentdiff's tokenizer for a CLIP or tokenizer.json folder; None when transformers must load it."""
    from .tokenizers import CLIP_CLASSES, load_clip_tokenizer, load_fast_tokenizer

    try:
        config = read_json(folder / "tokenizer_config.json") if "tokenizer_config.json" in present else {}
        name = config.get("tokenizer_class")
        if name in CLIP_CLASSES:
            return load_clip_tokenizer(folder)
        if name in GENERIC_TOKENIZER_CLASSES and "tokenizer.json" in present:
            return load_fast_tokenizer(folder)
    except ConfigError as error:  # a setting the native classes do not reproduce: transformers' job
        logging.getLogger(LOGGER).debug("tokenizer in %s goes to transformers: %s", folder, error)
        return None
    return None


def native_backend(backend: str | None = None) -> bool:
    """Whether latentdiff's own text classes may load a folder: `backend`, else $LATENTDIFF_TEXT_BACKEND, else auto."""
    value = backend if backend is not None else (os.environ.get(BACKEND_ENV) or "auto")
    if value not in BACKENDS:
        raise ConfigError("unknown text model backend", where="backend" if backend is not None else BACKEND_ENV,
                          expected=list(BACKENDS), found=value)
    return value == "auto"


def load_text_model(folder: Path, *, variant: str | None = None, torch_dtype: torch.dtype | None = None,
                    backend: str | None = None) -> nn.Module:
    """A text model from a local folder: strict (every weight used, none missing), eval mode.

    A CLIPTextModel or CLIPTextModelWithProjection folder loads as latentdiff's class of that name
    (`clip_text`, no transformers import) unless its config holds a setting that class does not implement, or
    backend="transformers"; any other model with transformers."""
    if not (folder / MODEL_CONFIG).is_file():
        raise CheckpointError(f"no {MODEL_CONFIG} in the text encoder folder", where=str(folder),
                              expected="a transformers model folder (config.json + weights)")
    stem = f"model.{variant}" if variant else "model"
    safetensors = _weight_files(folder, stem)
    for path in safetensors:
        if path.suffix == ".safetensors":
            hub.check_safetensors_header(path)  # a truncated file is named before transformers reads it
    if not safetensors and not _weight_files(folder, stem.replace("model", "pytorch_model", 1), ".bin"):
        raise CheckpointError("no weights in the text encoder folder", where=str(folder),
                              expected=f"{stem}.safetensors (or pytorch_model.bin)",
                              found=sorted(p.name for p in folder.iterdir()))
    native = _native_config(folder) if native_backend(backend) else None
    if native is not None:
        model_class, config = native
        from .base import load_weights

        try:
            state = load_weights(folder, "model" if safetensors else "pytorch_model", variant=variant)
            return model_class.from_state_dict(config, state, torch_dtype=torch_dtype, source=str(folder))
        except CheckpointError as e:  # worded as on the transformers path, whichever loaded it
            raise CheckpointError(f"could not load the text encoder ({e.message})", where=str(folder)) from None
    import transformers
    from safetensors import SafetensorError

    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    errors = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)
    try:
        model_config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                                               trust_remote_code=False)
        model, info = _model_class(model_config).from_pretrained(
            str(folder), config=model_config, local_files_only=True, use_safetensors=bool(safetensors),
            variant=variant, output_loading_info=True, **{dtype_key: torch_dtype or torch.float32})
    except errors as e:
        raise CheckpointError(f"could not load the text encoder ({type(e).__name__}: {e})", where=str(folder)) from None
    problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise CheckpointError(f"checkpoint does not match {type(model).__name__}: " + "; ".join(
            f"{k.replace('_', ' ')} ({len(v)}): {', '.join(map(str, v[:20]))}" for k, v in problems.items()),
            where=str(folder))
    return model.eval()


def _native_config(folder: Path) -> tuple[type[CLIPTextModel] | type[CLIPTextModelWithProjection], Any] | None:
    """(latentdiff's CLIP class, its CLIPTextConfig) for a folder it loads; None for any other model (or setting)."""
    try:
        data = read_json(folder / MODEL_CONFIG)
    except ConfigError:  # transformers reads (or rejects) it
        return None
    config = native_config_of(data, source=str(folder / MODEL_CONFIG))
    return None if config is None else (native_class_of(data), config)


def native_class_of(data: Mapping[str, Any]) -> type[CLIPTextModel] | type[CLIPTextModelWithProjection]:
    """latentdiff's class for a CLIP text config dict: the projection model where `architectures` names it."""
    return CLIPTextModelWithProjection if data.get("architectures") == [PROJECTION_ARCHITECTURE] else CLIPTextModel


def native_config_of(data: Mapping[str, Any], *, source: str | None = None) -> Any:
    """The CLIPTextConfig of a transformers config dict latentdiff's CLIPTextModel or CLIPTextModelWithProjection
    (`native_class_of`) implements; None for any other model or setting (another activation, several
    architectures ...: transformers implements or rejects it)."""
    if data.get("model_type") != MODEL_TYPE:
        return None
    try:
        return native_class_of(data).from_file_config(data, source=source)
    except ConfigError as error:
        logging.getLogger(LOGGER).debug("text model %s goes to transformers: %s", source, error)
        return None


def _model_class(model_config: Any) -> Any:
    """The transformers class named by the config's `architectures` if it is an encoder, else AutoModel."""
    import transformers

    names = list(getattr(model_config, "architectures", None) or ())
    if isinstance(model_config, transformers.CLIPTextConfig) and not any(n.startswith("CLIPText") for n in names):
        return transformers.CLIPTextModel
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and \
                name.endswith(ENCODER_CLASS_SUFFIXES):
            return cls
    return transformers.AutoModel


def _weight_names(stem: str, suffix: str = ".safetensors") -> list[str]:
    return [f"{stem}{suffix}", f"{stem}-*{suffix}", f"{stem}{suffix}.index.json"]


def _weight_files(folder: Path, stem: str, suffix: str = ".safetensors") -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for name in _weight_names(stem, suffix) for p in folder.glob(name) if p.is_file())
