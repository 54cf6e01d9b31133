"""Adapters on a loaded pipeline: LoRA and LyCORIS files (kohya / A1111, diffusers / PEFT), textual-inversion
embeddings.

    delta.py     the one internal form of every adapter file: a `Delta` per module (what it changes of the
                 module's weight, and how it runs unfused), and the builders of each file kind
    lycoris.py   the LyCORIS kinds: LoHa, LoKr, full-weight and norm deltas (LoCon Tucker and DoRA: delta.py)
    save.py      save_lora_weights: kohya-format safetensors; extract_lora (truncated SVD of a fine-tune)

The pipelines reach this package through `registry.ADAPTERS` (it sits above `pipelines` and `convert`, whose
key tables it uses).
"""
from __future__ import annotations

from . import lycoris  # noqa: F401  # registers the LyCORIS kinds with delta.register_kind
