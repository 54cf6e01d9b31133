"""One registry per kind of part; parts are created by short, stable names.

    @COMPONENTS.register("unet")
    class UNet2DConditional(ModelMixin): ...

    COMPONENTS.create("unet", UNetConfig(...))

`Hooks` are the same idea for functions: a lower layer calls a function that a higher layer provides
(`ModelMixin.from_single_file` -> `SINGLE_FILE.get("model_from_single_file")`, registered by `convert.api`)
without importing it; the providing module is imported by name on first use.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import RegistryError

T = TypeVar("T")

# Modules whose import registers the built-in parts. Imported on first look-up so that
# `import latentdiff` stays cheap.
_BUILTIN_MODULES = (
    "latentdiff.models.autoencoder_kl",
    "latentdiff.models.autoencoder_tiny",
    "latentdiff.models.vq",
    "latentdiff.models.identity",
    "latentdiff.models.unet",
    "latentdiff.models.unet2d",
    "latentdiff.models.controlnet",
    "latentdiff.models.t2i_adapter",
    "latentdiff.models.text_encoder",
    "latentdiff.models.ldm_bert",
    "latentdiff.models.conditioners",
    "latentdiff.diffusion.noise_scheduler",
    "latentdiff.diffusion.samplers",
    "latentdiff.pipelines.latent_diffusion",
    "latentdiff.pipelines.image_to_image",
    "latentdiff.pipelines.inpaint",
    "latentdiff.pipelines.unconditional",
    "latentdiff.pipelines.super_resolution",
    "latentdiff.pipelines.class_conditional",
    "latentdiff.pipelines.layout_to_image",
    "latentdiff.pipelines.sdxl",
    "latentdiff.pipelines.sdxl_image",
    "latentdiff.pipelines.sdxl_inpaint",
)


class Registry:
    """A name -> class table for one kind of part (components, samplers, pipelines)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if name in self._entries and self._entries[name] is not cls:
                raise RegistryError(f"{self.kind} name {name!r} is registered twice",
                                    where=cls.__qualname__, found=self._entries[name].__qualname__)
            self._entries[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]  # a registered class gets its name here
            return cls

        return add

    def get(self, name: str) -> type:
        _load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(f"unknown {self.kind} {name!r}", expected=f"one of {self.names()}",
                                found=name) from None

    def create(self, name: str, config: Any = None, **kwargs: Any) -> Any:
        """Build the part registered as `name` from its config (or its defaults)."""
        cls = self.get(name)
        if config is None and hasattr(cls, "config_class"):
            config = cls.config_class()
        return cls(config, **kwargs) if config is not None else cls(**kwargs)

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        _load_builtins()
        return name in self._entries


_loaded = False


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


class Hooks:
    """A name -> function table filled by one higher-layer module, imported by name on first look-up."""

    def __init__(self, kind: str, module: str):
        self.kind = kind
        self.module = module  # the module whose import registers the hooks
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(function: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name] is not function:
                raise RegistryError(f"{self.kind} hook {name!r} is registered twice",
                                    where=function.__qualname__, found=self._entries[name].__qualname__)
            self._entries[name] = function
            return function

        return add

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            importlib.import_module(self.module)
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(f"unknown {self.kind} hook {name!r}", expected=f"one of {sorted(self._entries)}",
                                found=name) from None


COMPONENTS = Registry("component")
SAMPLERS = Registry("sampler")
PIPELINES = Registry("pipeline")
# Original single-file checkpoints (CompVis / Stability AI): the models' and pipelines' from_single_file /
# save_single_file call these; the file formats themselves live in `latentdiff.convert`.
SINGLE_FILE = Hooks("single-file", "latentdiff.convert.api")
# Adapters (LoRA / LyCORIS files, textual inversion): the pipelines' load_lora_weights, set_adapters ... call these;
# the file formats and the module patching live in `latentdiff.adapters` (above `convert`, whose key tables it uses).
ADAPTERS = Hooks("adapters", "latentdiff.adapters.api")
