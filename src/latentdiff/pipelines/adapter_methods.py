"""LoRA / LyCORIS methods of the text-conditioned pipelines, with diffusers' names. Each calls the function of
the same name that `latentdiff.adapters.api` registers in `registry.ADAPTERS` (the file formats and the module
patching live there, above the pipelines).

    pipe.load_lora_weights("detail.safetensors")                # adapter name: the file's stem
    pipe.set_adapters(["detail", "style"], adapter_weights=[0.8, 0.5])
    pipe.fuse_lora(); pipe.unfuse_lora(); pipe.unload_lora_weights()

`with_prompt_adapters` wraps a `__call__`: `<lora:NAME:W>` tags in its prompts activate adapters for that call.
"""
from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..registry import ADAPTERS

F = TypeVar("F", bound=Callable[..., Any])
TAGGED_ARGUMENTS = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2")   # SDXL: the second encoder's


def _tagged(value: Any) -> bool:
    if isinstance(value, str):
        return "<lora:" in value
    return isinstance(value, (list, tuple)) and any(isinstance(v, str) and "<lora:" in v for v in value)


def with_prompt_adapters(call: F) -> F:
    """A `__call__` whose prompt / negative_prompt may hold `<lora:...>` tags (and that takes `lora_dirs=`):
    without tags it runs as it is; with tags, stripped of them and with their adapters active for the call."""
    signature = inspect.signature(call)

    @functools.wraps(call)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        prompts = {k: bound.arguments[k] for k in TAGGED_ARGUMENTS if k in bound.arguments}
        if not any(_tagged(v) for v in prompts.values()):
            return call(self, *args, **kwargs)
        with ADAPTERS.get("prompt_adapters")(self, prompts, bound.arguments.get("lora_dirs")) as stripped:
            bound.arguments.update(stripped)
            return call(*bound.args, **bound.kwargs)

    return run  # type: ignore[return-value]  # same signature as `call`


class LoraMixin:
    """diffusers' LoRA and textual-inversion methods (`StableDiffusionLoraLoaderMixin`,
    `TextualInversionLoaderMixin`), on a pipeline with `unet` and `text_encoder` (and SDXL's `text_encoder_2`)."""

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict, *,
                          adapter_name: str | None = None, weight_name: str | None = None) -> str:
        """Load a LoRA / LyCORIS file (kohya / A1111 `lora_unet_*` with diffusers or CompVis module names,
        diffusers / PEFT `unet.*.lora_A`), a folder or Hub repo holding `pytorch_lora_weights.safetensors` (or
        `weight_name`), or a state dict, as `adapter_name` (default: the file's stem) and make it the active
        adapter. Nothing is changed on an error (CheckpointError naming the file, the key, the module)."""
        return ADAPTERS.get("load_lora_weights")(self, pretrained_model_name_or_path_or_dict,
                                                 adapter_name=adapter_name, weight_name=weight_name)

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: Any = None) -> None:
        """The active adapters and their weights (a number, or {"unet": w, "text_encoder": w, "text_encoder_2": w},
        per adapter; 1.0 when left out). Runtime: switching copies no weight."""
        ADAPTERS.get("set_adapters")(self, adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return ADAPTERS.get("get_active_adapters")(self)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """{"unet": [names], "text_encoder": [names]}: the loaded adapters that change each component."""
        return ADAPTERS.get("get_list_adapters")(self)

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        ADAPTERS.get("delete_adapters")(self, adapter_names)

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None) -> None:
        """Merge the active adapters (or `adapter_names`) into the weights, after a backup (`unfuse_lora`)."""
        ADAPTERS.get("fuse_lora")(self, lora_scale, adapter_names)

    def unfuse_lora(self) -> None:
        """The weights from before `fuse_lora`, bit for bit (restored from the backup, not subtracted)."""
        ADAPTERS.get("unfuse_lora")(self)

    def unload_lora_weights(self) -> None:
        """Back to the base model, bit for bit."""
        ADAPTERS.get("unload_lora_weights")(self)

    def save_lora_weights(self, path: str | os.PathLike, *, adapter_name: str | None = None,
                          metadata: dict[str, str] | None = None) -> None:
        """Write the loaded adapter `adapter_name` (the only one when None) as a kohya-format .safetensors file
        (`lora_unet_*` / `lora_te_*` keys, alpha, ss_* metadata) that A1111 and ComfyUI load (atomic write)."""
        ADAPTERS.get("save_lora_weights")(self, path, adapter_name=adapter_name, metadata=metadata)

    # ---- textual inversion (latentdiff.adapters.embeddings) ----
    def load_textual_inversion(self, pretrained_model_name_or_path: Any, token: str | list[str] | None = None, *,
                               weight_name: str | None = None, **hub_options: Any) -> None:
        """Add a textual-inversion embedding's token(s) to the tokenizer and its vectors to the text encoder, as
        diffusers' load_textual_inversion: a file (A1111 .pt / .safetensors, diffusers learned_embeds), a folder, a
        Hub id, a state dict, or a list of them (with a list of tokens). token: default the diffusers file's key,
        else the file's stem (A1111's token). SDXL: a file's `clip_l` and `clip_g` vectors go into both text
        encoders in one call. All or nothing: after an error nothing has changed."""
        ADAPTERS.get("load_textual_inversion")(self, pretrained_model_name_or_path, token, weight_name=weight_name,
                                               **hub_options)

    def unload_textual_inversion(self, tokens: str | list[str] | None = None) -> None:
        """Remove loaded embeddings (None: all); with none left, the tokenizer and the token-embedding table are
        the originals again, bit for bit (every text encoder's)."""
        ADAPTERS.get("unload_textual_inversion")(self, tokens)

    def disable_lora(self) -> None:
        ADAPTERS.get("enable_lora")(self, False)

    def enable_lora(self) -> None:
        ADAPTERS.get("enable_lora")(self, True)
