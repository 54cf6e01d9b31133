"""ModelCatalog (a minimal stand-in: the startup model only; the full catalog replaces this file)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from .requests import RequestError
from .settings import ServeSettings


class ModelCatalog:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.current = settings.model
        self.lora_dirs: tuple[Path, ...] = tuple(settings.lora_dirs)
        self._pipes: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def resolve(self, name: str, *, field: str) -> str:
        if name != self.settings.model:
            raise RequestError("unknown model", field=field, expected=[self.settings.model], found=name)
        return name

    def pipeline(self, name: str, vae: str | None = None) -> Any:
        import torch

        from ..pipelines.latent_diffusion import LatentDiffusionPipeline

        with self._lock:
            if name not in self._pipes:
                self._pipes[name] = LatentDiffusionPipeline.from_pretrained(
                    name, torch_dtype=getattr(torch, self.settings.dtype))
            return self._pipes[name]

    def preview(self, name: str) -> Any:
        raise NotImplementedError
