"""Writing adapters as kohya-format safetensors, the files AUTOMATIC1111, ComfyUI and kohya's scripts load.

    lora_unet_<module, "." -> "_">.lora_down.weight / .lora_up.weight / .alpha      (LoRA, LoCon; + .lora_mid.weight)
    lora_te_text_model_<module>.…                                                   (the text encoder)
    SDXL: lora_unet_<original SGM name> (input_blocks_4_1_…), lora_te1_… (CLIP-L), lora_te2_… (bigG), as kohya
    LoHa: .hada_w1_a … ; LoKr: .lokr_w1 … ; full: .diff / .diff_b (norm layers: .w_norm / .b_norm); DoRA: .dora_scale

with kohya's `ss_*` metadata (ss_network_module, ss_network_dim, ss_network_alpha, ss_base_model_version when
known). Every Delta kind is written with the keys its builder reads, so save -> load rebuilds the same deltas.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, UsageError
from ..hub import save_safetensors
from ..registry import ADAPTERS
from .delta import Delta, DoRA, LoRA
from .lycoris import Full, LoHa, LoKr
from .names import is_sdxl, original_unet_names

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
SDXL_PREFIXES = {**PREFIXES, "text_encoder": "lora_te1_"}   # kohya's SDXL files: lora_te1_ (CLIP-L), lora_te2_
# kohya's ss_base_model_version by the text encoder's width (what A1111's metadata readers and ComfyUI show)
BASE_VERSIONS = {768: "sd_v1", 1024: "sd_v2"}
SDXL_VERSION = "sdxl_base_v1-0"


def kohya_key(component: str, name: str, *, sdxl: bool = False, unet_names: Mapping[str, str] | None = None) -> str:
    """The kohya key prefix of a module: ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") ->
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" (or its original name from
    `unet_names`: "lora_unet_input_blocks_1_1_..."); text-encoder names with or without transformers'
    `text_model.` level -> "lora_te_text_model_encoder_layers_0_self_attn_q_proj" (sdxl: lora_te1_ / lora_te2_)."""
    prefixes = SDXL_PREFIXES if sdxl else PREFIXES
    if component not in prefixes:
        raise InputError("adapters are saved for the UNet and the text encoders only", where="deltas",
                         expected=f"components {sorted(prefixes)}", found=repr(component))
    if component != "unet":
        bare = name.removeprefix("text_model.")
        return prefixes[component] + ("" if bare == "text_projection" else "text_model_") + bare.replace(".", "_")
    return prefixes[component] + (unet_names or {}).get(name, name).replace(".", "_")


def _alpha(value: float | None, rank: int | None) -> dict[str, torch.Tensor]:
    if value is None:
        return {} if rank is None else {"alpha": torch.tensor(float(rank))}
    return {"alpha": torch.tensor(float(value))}


def group_of(delta: Delta) -> dict[str, torch.Tensor]:
    """The file keys (suffix -> tensor) that rebuild `delta` (delta.delta_from_group's inverse)."""
    if isinstance(delta, DoRA):
        return {**group_of(delta.inner), "dora_scale": delta.magnitude}
    if isinstance(delta, LoRA):
        group = {"lora_down.weight": delta.down, "lora_up.weight": delta.up, **_alpha(delta.alpha, delta.rank)}
        if delta.mid is not None:
            group["lora_mid.weight"] = delta.mid
        return group
    if isinstance(delta, LoHa):
        optional: dict[str, torch.Tensor | None] = {
            "hada_w1_a": delta.w1a, "hada_w1_b": delta.w1b, "hada_w2_a": delta.w2a, "hada_w2_b": delta.w2b,
            "hada_t1": delta.t1, "hada_t2": delta.t2, **_alpha(delta.alpha, None)}
        return {k: v for k, v in optional.items() if v is not None}
    if isinstance(delta, LoKr):
        optional = {"lokr_w1": delta.w1, "lokr_w1_a": delta.w1a, "lokr_w1_b": delta.w1b, "lokr_w2": delta.w2,
                    "lokr_w2_a": delta.w2a, "lokr_w2_b": delta.w2b, "lokr_t2": delta.t2, **_alpha(delta.alpha, None)}
        return {k: v for k, v in optional.items() if v is not None}
    if isinstance(delta, Full):
        w_key, b_key = ("w_norm", "b_norm") if len(delta.shape) == 1 else ("diff", "diff_b")
        return {w_key: delta.diff, **({} if delta.diff_b is None else {b_key: delta.diff_b})}
    raise InputError("an adapter kind with no kohya file form", where="deltas",
                     expected="LoRA, LoHa, LoKr, Full or DoRA deltas", found=type(delta).__name__)


def _deltas_of_pipeline(pipe: Any, adapter_name: str | None) -> dict[str, dict[str, Delta]]:
    """The deltas of one adapter loaded on `pipe` (pipe.load_lora_weights), per component and module name."""
    state = getattr(pipe, "__dict__", {}).get("_adapter_state")
    loaded = dict(getattr(state, "adapters", {}) or {})
    if adapter_name is None:
        if len(loaded) != 1:
            raise UsageError("say which loaded adapter to save", where="adapter_name",
                             expected=f"one of {sorted(loaded)}" if loaded else "an adapter loaded with "
                             "pipe.load_lora_weights", found=f"{len(loaded)} adapters loaded",
                             hint="save_lora_weights(pipe, path, adapter_name=NAME)")
        adapter_name = next(iter(loaded))
    if adapter_name not in loaded:
        raise UsageError("no adapter of that name is loaded", where="adapter_name",
                         expected=f"one of {sorted(loaded)}", found=repr(adapter_name))
    out: dict[str, dict[str, Delta]] = {}
    for target, delta in loaded[adapter_name].deltas.items():
        out.setdefault(target.component, {})[target.name] = delta
    return out


def _metadata(deltas: Mapping[str, Mapping[str, Delta]], pipe: Any, metadata: Mapping[str, str] | None,
              ) -> dict[str, str]:
    flat = [d for per in deltas.values() for d in per.values()]
    inner = [d.inner if isinstance(d, DoRA) else d for d in flat]
    plain = all(isinstance(d, LoRA) and d.mid is None for d in flat)
    info: dict[str, str] = {"ss_network_module": "networks.lora" if plain else "lycoris.kohya"}
    loras = [d for d in inner if isinstance(d, LoRA)]
    if loras:
        info["ss_network_dim"] = str(loras[0].rank)
        info["ss_network_alpha"] = str(loras[0].alpha if loras[0].alpha is not None else loras[0].rank)
    if not plain:
        algo = {LoRA: "locon", LoHa: "loha", LoKr: "lokr", Full: "full"}.get(type(inner[0]), "lora") if inner else ""
        args = {"algo": algo, **({"dora_wd": "True"} if any(isinstance(d, DoRA) for d in flat) else {})}
        info["ss_network_args"] = json.dumps(args)
    width = getattr(getattr(pipe, "text_encoder", None), "hidden_size", None)
    if pipe is not None and is_sdxl(pipe):
        if getattr(pipe, "text_encoder", None) is not None:   # the base (kohya trains no refiner LoRAs)
            info["ss_base_model_version"] = SDXL_VERSION
    elif isinstance(width, int) and width in BASE_VERSIONS:
        info["ss_base_model_version"] = BASE_VERSIONS[width]
        info["ss_v2"] = str(width == 1024)
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InputError("safetensors metadata is text", where=f"metadata[{key!r}]",
                             expected="str keys and values", found=f"{type(key).__name__}: {type(value).__name__}")
        info[key] = value
    return info


@ADAPTERS.register("save_lora_weights")
def save_lora_weights(deltas: Any, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None,
                      adapter_name: str | None = None) -> None:
    """Write adapters as one kohya-format safetensors file at `path` (atomic: a temporary name, then rename).

    save_lora_weights(deltas: dict[str, dict[str, Delta]] | pipeline, path, *, metadata=None, adapter_name=None)

    deltas: {"unet": {module name: Delta}, "text_encoder": {...}, "text_encoder_2": {...}} with diffusers /
    latentdiff module names ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "text_model.encoder.layers.0.self_attn.q_proj" or without `text_model.`), or a pipeline: its adapter
    `adapter_name` loaded by `load_lora_weights` (the only one when None). metadata: extra `ss_*` (or any) text
    entries, over the ones written (ss_network_module "networks.lora" for plain LoRA, "lycoris.kohya" otherwise;
    ss_network_dim / ss_network_alpha; ss_base_model_version "sd_v1" / "sd_v2" from a pipeline's text-encoder
    width, "sdxl_base_v1-0" from an SDXL base pipeline, whose UNet keys are written with the original block
    names)."""
    target = Path(path)
    if target.is_dir() or not target.parent.is_dir():
        raise InputError("save_lora_weights writes one file into an existing folder", where=f"path: {target}",
                         expected="a file name in an existing folder",
                         found="a folder" if target.is_dir() else f"no folder {target.parent}")
    pipe = None
    if not isinstance(deltas, Mapping):
        pipe, deltas = deltas, _deltas_of_pipeline(deltas, adapter_name)
    # SDXL as kohya writes it: the UNet by its original block names, the text encoders as lora_te1_ / lora_te2_
    sdxl = "text_encoder_2" in deltas or (pipe is not None and is_sdxl(pipe))
    unet_names = original_unet_names(pipe.unet) if pipe is not None and is_sdxl(pipe) else {}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, object]] = set()   # (storage, offset): safetensors refuses tensors that share memory
    for component, per_module in deltas.items():
        if not isinstance(per_module, Mapping):
            raise InputError("deltas maps a component to its modules' deltas", where=f"deltas[{component!r}]",
                             expected="{module name: Delta}", found=type(per_module).__name__)
        for name, delta in per_module.items():
            if not isinstance(delta, Delta):
                raise InputError("not an adapter delta", where=f"deltas[{component!r}][{name!r}]",
                                 expected="a latentdiff.adapters.delta.Delta", found=type(delta).__name__)
            prefix = kohya_key(component, name, sdxl=sdxl, unet_names=unet_names)
            for suffix, tensor in group_of(delta).items():
                tensor = tensor.detach().to("cpu").contiguous()
                ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
                if ptr in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                    tensor = tensor.clone()
                seen.add((tensor.untyped_storage().data_ptr(), tensor.storage_offset()))
                tensors[f"{prefix}.{suffix}"] = tensor
    if not tensors:
        raise InputError("nothing to save", where="deltas", expected="at least one module's delta", found="none")
    save_safetensors(tensors, path, metadata=_metadata(deltas, pipe, metadata))


def extract_lora(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], rank: int, *,
                 min_difference: float = 0.0) -> dict[str, Delta]:
    """LoRA deltas (alpha = rank) by truncated SVD of tuned - base per weight: {"a.b.weight": W} pairs of one
    component's state dicts -> {"a.b": LoRA}, for the 2-D (linear) and 4-D (conv) weights that differ by more
    than `min_difference` (max abs). Conv weights give LoCon (down (r, in, kh, kw), up (out, r, 1, 1))."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InputError("the LoRA rank is a positive int", where="rank", expected="an int >= 1", found=repr(rank))
    out: dict[str, Delta] = {}
    for key, w in base.items():
        t = tuned.get(key)
        if not key.endswith(".weight") or t is None or w.dim() not in (2, 4):
            continue
        if tuple(t.shape) != tuple(w.shape):
            raise InputError("the tuned model's weight has another shape", where=f"tuned[{key!r}]",
                             expected=tuple(w.shape), found=tuple(t.shape))
        diff = t.float() - w.float()
        if diff.abs().max() <= min_difference:
            continue
        u, s, vh = torch.linalg.svd(diff.flatten(1), full_matrices=False)
        r = min(rank, s.numel())
        up, down = u[:, :r] * s[:r], vh[:r]
        shape = tuple(w.shape)
        if w.dim() == 4:
            up, down = up.reshape(shape[0], r, 1, 1), down.reshape(r, *shape[1:])
        out[key.removesuffix(".weight")] = LoRA(down.contiguous(), up.contiguous(), float(r), shape)
    return out


__all__ = ["save_lora_weights", "extract_lora", "kohya_key", "group_of"]
