"""Where `latentdiff generate`'s model is: `latentdiff.model_source`, below the command line so that the library
(`serve`, `integrations.ray`) may use it too; its names stay importable from here."""
from __future__ import annotations

from ..model_source import (
    SETTINGS_KEYS,
    SINGLE_FILE_SUFFIXES,
    ModelSource,
    find_on_hub,
    local_kind,
    locate_model,
    read_settings,
    tokenizer_file,
)

__all__ = ["SETTINGS_KEYS", "SINGLE_FILE_SUFFIXES", "ModelSource", "find_on_hub", "local_kind", "locate_model",
           "read_settings", "tokenizer_file"]
