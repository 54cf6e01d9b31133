"""Adapters on a loaded pipeline: LoRA and LyCORIS files (kohya / A1111, diffusers / PEFT), textual-inversion
embeddings.

    delta.py     the one internal form of every adapter file: a `Delta` per module (what it changes of the
                 module's weight, and how it runs unfused), and the builders of each file kind

The pipelines reach this package through `registry.ADAPTERS` (it sits above `pipelines` and `convert`, whose
key tables it uses).
"""
from __future__ import annotations
