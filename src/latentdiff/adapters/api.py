"""The pipelines' adapter methods (load_lora_weights, set_adapters, fuse_lora ...), registered as
`registry.ADAPTERS` hooks at import: the pipelines call them by name without importing this package.

Loading is all-or-nothing: the file is read, every key matched to a module (`names.module_table`) and every
`Delta` built (`delta.delta_from_group`, whatever its kind) before the pipeline is touched; any error leaves the
pipeline as it was. A loaded adapter becomes the active one (diffusers' behaviour); `set_adapters` picks several.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import hub
from ..errors import CheckpointError, InputError, UsageError, describe
from ..registry import ADAPTERS
from . import embeddings, save  # noqa: F401  (register the textual-inversion hooks and save_lora_weights)
from .delta import Delta, delta_from_group
from .names import Target, check_family, components, describe_pipeline, group_keys, module_table
from .runtime import Adapter, AdapterState, check_names, fuse, refresh, state_of, unfuse, weights_of
from .tags import Tag, has_tags, strip_tags

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")
LORA_PATH_ENV = "LATENTDIFF_LORA_PATH"


# ---- reading a file ---------------------------------------------------------------------------------------------
def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:   # the tensors were read already: a header without metadata is no error
        return {}


def read_file(source: Any, *, weight_name: str | None = None,
              location: hub.HubLocation | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str], str, str]:
    """-> (tensors, metadata, where (for errors), default adapter name)."""
    if isinstance(source, Mapping):
        state = dict(source)
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise InputError("a LoRA state dict maps key names to tensors", where="state_dict",
                             expected="{str: torch.Tensor}", found=f"{bad[0]!r}: {describe(state[bad[0]])}")
        return state, {}, "state_dict", ""
    if not isinstance(source, (str, os.PathLike)):
        raise InputError("load_lora_weights takes a file, a folder, a Hub id or a state dict",
                         where="pretrained_model_name_or_path_or_dict", expected="str | PathLike | dict",
                         found=describe(source))
    path = Path(source).expanduser()
    if not path.is_file():
        folder = (location or hub.HubLocation()).resolve(
            source, allow_patterns=[weight_name or DIFFUSERS_WEIGHT_NAME])
        path = hub.contained(folder, weight_name or DIFFUSERS_WEIGHT_NAME, file=folder, entry="weight_name")
        if not path.is_file():
            raise CheckpointError("no LoRA file in the folder", where=str(folder),
                                  expected=weight_name or DIFFUSERS_WEIGHT_NAME, found="nothing of that name")
        default = path.stem if weight_name else Path(str(source)).name
    else:
        default = path.stem
    if path.suffix in PICKLE_SUFFIXES:
        obj = hub.load_torch_pickle(path)   # weights_only: nothing in the file runs
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(state, dict):
            raise CheckpointError("a LoRA pickle holds a dict of tensors", where=str(path), expected="dict",
                                  found=describe(state))
        return read_file(state)[0], {}, str(path), default
    return hub.load_safetensors(path), _metadata(path), str(path), default


def build_adapter(pipe: Any, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, name: str,
                  source: str) -> Adapter:
    """Every Delta of the file, checked against the pipeline's modules; the pipeline is not touched."""
    if not state:
        raise CheckpointError("the LoRA file holds no tensors", where=source, expected="lora_* / unet.* keys",
                              found="nothing")
    check_family(state, metadata, pipe, source=source)
    parts = components(pipe)
    deltas: dict[Target, Delta] = {}
    grouped = group_keys(state, module_table(pipe), source=source, pipeline=describe_pipeline(pipe))
    for target, (spelled, group) in grouped.items():
        module: Any = parts[target.component].get_submodule(target.name)
        # copies in the module's dtype and device: nothing stays mapped to the file, no conversion per step
        group = {k: v.to(module.weight.device, module.weight.dtype if v.is_floating_point() else v.dtype, copy=True)
                 for k, v in group.items()}
        where = f"{source}: {spelled} (module {target.component}.{target.name})"
        bad = [k for k, v in group.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise CheckpointError("NaN or Inf in an adapter's tensors", where=f"{where}.{bad[0]}",
                                  expected="finite values", found="NaN / Inf")
        try:
            deltas[target] = delta_from_group(group, tuple(module.weight.shape), where=where)
        except (IndexError, RuntimeError, ValueError, TypeError) as e:   # tensors of a shape no builder expects
            raise CheckpointError(f"an adapter's tensors do not fit the module ({type(e).__name__}: {e})",
                                  where=where, expected=f"tensors for a weight of shape {tuple(module.weight.shape)}",
                                  found={k: tuple(v.shape) for k, v in group.items()}) from None
    return Adapter(name, deltas, source)


def _state(pipe: Any) -> AdapterState:
    return state_of(pipe)


# ---- the hooks ---------------------------------------------------------------------------------------------------
@ADAPTERS.register("load_lora_weights")
def load_lora_weights(pipe: Any, source: Any, *, adapter_name: str | None = None, weight_name: str | None = None,
                      location: hub.HubLocation | None = None) -> str:
    """Load a LoRA / LyCORIS file (kohya / A1111 or diffusers / PEFT) as `adapter_name` and make it the active
    adapter; returns its name."""
    state = _state(pipe)
    if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name):
        raise InputError("adapter_name must be a non-empty string", where="adapter_name", expected="str",
                         found=describe(adapter_name))
    if adapter_name in state.adapters:
        raise UsageError("an adapter of that name is loaded already", where="adapter_name", found=adapter_name,
                         hint="pass another adapter_name, or pipe.delete_adapters(name) first")
    tensors, metadata, source_name, default = read_file(source, weight_name=weight_name, location=location)
    name = adapter_name or default or f"default_{len(state.adapters)}"
    if name in state.adapters:
        raise UsageError("an adapter of that name is loaded already", where="adapter_name", found=name,
                         hint="pass adapter_name= to load the file under another name")
    state.adapters[name] = build_adapter(pipe, tensors, metadata, name=name, source=source_name)
    state.active = {name: weights_of(1.0, argument="adapter_weights")}
    refresh(pipe, state)
    return name


@ADAPTERS.register("set_adapters")
def set_adapters(pipe: Any, names: str | Sequence[str], adapter_weights: Any = None) -> None:
    state = _state(pipe)
    names = [names] if isinstance(names, str) else list(names)
    check_names(state, names, argument="adapter_names")
    if adapter_weights is None or not isinstance(adapter_weights, (list, tuple)):
        weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
    else:
        weights = list(adapter_weights)
    if len(weights) != len(names):
        raise InputError("adapter_weights needs one weight per adapter", where="adapter_weights",
                         expected=len(names), found=len(weights))
    active = {n: weights_of(w, argument=f"adapter_weights[{i}]")
              for i, (n, w) in enumerate(zip(names, weights, strict=True))}
    if state.fused and any(n in state.fused for n in set(active) ^ set(state.active)):
        raise UsageError("fused adapters cannot be switched", where="set_adapters", found=state.fused,
                         hint="call pipe.unfuse_lora() first")
    state.active = active
    refresh(pipe, state)


@ADAPTERS.register("get_active_adapters")
def get_active_adapters(pipe: Any) -> list[str]:
    return list(_state(pipe).active)


@ADAPTERS.register("get_list_adapters")
def get_list_adapters(pipe: Any) -> dict[str, list[str]]:
    """component -> the loaded adapters that change it (diffusers' form)."""
    out: dict[str, list[str]] = {}
    for name, adapter in _state(pipe).adapters.items():
        for component in sorted({t.component for t in adapter.deltas}):
            out.setdefault(component, []).append(name)
    return out


@ADAPTERS.register("delete_adapters")
def delete_adapters(pipe: Any, names: str | Sequence[str]) -> None:
    state = _state(pipe)
    names = [names] if isinstance(names, str) else list(names)
    check_names(state, names, argument="adapter_names")
    if any(n in state.fused for n in names):
        raise UsageError("a fused adapter cannot be deleted", where="delete_adapters", found=state.fused,
                         hint="call pipe.unfuse_lora() first")
    for name in names:
        state.adapters.pop(name)
        state.active.pop(name, None)
    refresh(pipe, state)


@ADAPTERS.register("fuse_lora")
def fuse_lora(pipe: Any, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None) -> None:
    state = _state(pipe)
    names = list(state.active) if adapter_names is None else \
        ([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
    check_names(state, names, argument="adapter_names")
    scale = weights_of(lora_scale, argument="lora_scale")["unet"]
    fuse(pipe, state, names, scale)


@ADAPTERS.register("unfuse_lora")
def unfuse_lora(pipe: Any) -> None:
    unfuse(pipe, _state(pipe))


@ADAPTERS.register("unload_lora_weights")
def unload_lora_weights(pipe: Any) -> None:
    """Back to the base model, bit for bit: backups restored, hooks removed, every adapter forgotten."""
    state = _state(pipe)
    unfuse(pipe, state)
    state.adapters.clear()
    state.active.clear()
    refresh(pipe, state)


@ADAPTERS.register("enable_lora")
def enable_lora(pipe: Any, enabled: bool = True) -> None:
    state = _state(pipe)
    state.enabled = enabled
    refresh(pipe, state)


# ---- <lora:NAME:W> tags in prompts -------------------------------------------------------------------------------
def lora_folders(lora_dirs: Any) -> list[Path]:
    """lora_dirs= then the folders of LATENTDIFF_LORA_PATH (os.pathsep-separated), those that exist."""
    if lora_dirs is None:
        given: list[Any] = []
    elif isinstance(lora_dirs, (str, os.PathLike)):
        given = [lora_dirs]
    elif isinstance(lora_dirs, (list, tuple)) and all(isinstance(d, (str, os.PathLike)) for d in lora_dirs):
        given = list(lora_dirs)
    else:
        raise InputError("lora_dirs takes a folder or a list of folders", where="lora_dirs",
                         expected="str | PathLike | list of them", found=describe(lora_dirs))
    env = [p for p in os.environ.get(LORA_PATH_ENV, "").split(os.pathsep) if p]
    return [Path(d).expanduser() for d in given + env if Path(d).expanduser().is_dir()]


def _find(name: str, folders: list[Path]) -> Path | None:
    for folder in folders:
        path = hub.contained(folder, name + ".safetensors", file=folder, entry=f"<lora:{name}>")
        if path.is_file():
            return path
    return None


def _collect(prompts: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Tag]]:
    stripped: dict[str, Any] = {}
    tags: dict[str, Tag] = {}
    for argument, prompt in prompts.items():
        if not has_tags(prompt):
            stripped[argument] = prompt
            continue
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        out = []
        for text in texts:
            clean, found = strip_tags(text, argument=argument)
            out.append(clean)
            for tag in found:
                if tags.setdefault(tag.name, tag) != tag:
                    raise InputError("one adapter with two weights in one call", where=f"{argument}: <lora:{tag.name}>",
                                     expected="the same weights in every tag of a name", found=[tags[tag.name], tag])
        stripped[argument] = out[0] if isinstance(prompt, str) else out
    return stripped, tags


@ADAPTERS.register("prompt_adapters")
@contextlib.contextmanager
def prompt_adapters(pipe: Any, prompts: Mapping[str, Any], lora_dirs: Any = None) -> Iterator[dict[str, Any]]:
    """Strip the `<lora:...>` tags of `prompts` ({argument: prompt}), activate their adapters (loading files found
    by name in `lora_dirs` / LATENTDIFF_LORA_PATH, kept loaded) on top of the active ones for the block, then put
    the adapters set before back. Yields the prompts without tags."""
    stripped, tags = _collect(prompts)
    if not tags:
        yield stripped
        return
    state = _state(pipe)
    folders = lora_folders(lora_dirs)
    before = dict(state.active)
    for name in tags:
        if name in state.adapters:
            continue
        path = _find(name, folders)
        if path is None:
            found = sorted(p.stem for f in folders for p in f.glob("*.safetensors"))
            raise InputError("a <lora:...> tag names no loaded adapter and no file found", where=f"<lora:{name}>",
                             expected=f"a loaded adapter {sorted(state.adapters)} or a file NAME.safetensors in "
                                      f"lora_dirs / {LORA_PATH_ENV} {[str(f) for f in folders]}",
                             found=f"{name!r}; files found: {found}")
        load_lora_weights(pipe, path, adapter_name=name)
        state.active = dict(before)
    if any(name in state.fused for name in tags):
        raise UsageError("a <lora:...> tag names a fused adapter", where="prompt", found=state.fused,
                         hint="call pipe.unfuse_lora() first")
    # A1111's text-encoder weight applies to every text encoder (both of SDXL's)
    state.active = {**before, **{n: weights_of({"unet": t.unet, "text_encoder": t.text_encoder,
                                                "text_encoder_2": t.text_encoder}, argument=f"<lora:{n}>")
                                 for n, t in tags.items()}}
    refresh(pipe, state)
    try:
        yield stripped
    finally:
        state.active = before
        refresh(pipe, state)


__all__ = ["load_lora_weights", "set_adapters", "get_active_adapters", "get_list_adapters", "delete_adapters",
           "fuse_lora", "unfuse_lora", "unload_lora_weights", "enable_lora", "prompt_adapters", "read_file",
           "build_adapter", "lora_folders"]
