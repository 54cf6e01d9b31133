"""Adapters on a pipeline's modules: runtime (unfused) through forward hooks, or fused into the weights.

    runtime   each targeted nn.Linear / nn.Conv2d gets one forward hook that adds, for the active adapters,
              sum_k delta_k.forward(x) * w_k (x -> down -> up for a LoRA: cheap). Switching adapters or weights
              changes only the table the hooks read: no weight is copied.
    fused     W <- delta.weight(W, w) for each active adapter, after a copy of W (and the bias) is kept: unfusing
              puts the copies back, bit for bit (a backup, not a subtraction). Fused modules carry no hook, so the
              UNet is plain weights again (`pipe.compile()` works).

The base weights are never written except by fusing, so `unload` (hooks removed, backups restored) gives the base
model bit for bit.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError, UsageError
from ..layers.prepacked import restore_weights
from .delta import Delta, LayerKind
from .names import COMPONENTS, Target, components


@dataclasses.dataclass
class Adapter:
    """One loaded file: its deltas per module, and where it came from."""

    name: str
    deltas: dict[Target, Delta]
    source: str


@dataclasses.dataclass
class AdapterState:
    """What a pipeline's adapters are: loaded, active with their weights (per component), fused, hooked."""

    adapters: dict[str, Adapter] = dataclasses.field(default_factory=dict)
    # name -> {"unet": w, "text_encoder": w, "text_encoder_2": w}, in activation order
    active: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    fused: list[str] = dataclasses.field(default_factory=list)
    backups: dict[Target, tuple[torch.Tensor, torch.Tensor | None]] = dataclasses.field(default_factory=dict)
    enabled: bool = True
    # what the hooks read: target -> [(delta, scale)]
    running: dict[Target, list[tuple[Delta, float]]] = dataclasses.field(default_factory=dict)
    hooks: dict[Target, Any] = dataclasses.field(default_factory=dict)


def state_of(pipe: Any, *, create: bool = True) -> AdapterState:
    state = pipe.__dict__.get("_adapter_state")
    if state is None:
        state = AdapterState()
        if create:
            pipe.__dict__["_adapter_state"] = state
    return state


def _module(pipe: Any, target: Target) -> Any:
    """The nn.Linear / nn.Conv2d a target names, its plain weight restored if `optimize_for_cpu` had packed it in
    its place (fusing reads and writes it; a hooked layer stays unpacked: layers.prepacked._Packed)."""
    module = components(pipe)[target.component].get_submodule(target.name)
    restore_weights(module)
    return module


def _hook(state: AdapterState, target: Target, layer: LayerKind) -> Any:
    def add_deltas(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        for delta, scale in state.running.get(target, ()):
            output = output + delta.forward(args[0], module.weight, layer, scale)
        return output
    return add_deltas


def refresh(pipe: Any, state: AdapterState) -> None:
    """Rebuild the hooks' table from the active, unfused adapters; hook the modules that need it, unhook the rest."""
    running: dict[Target, list[tuple[Delta, float]]] = {}
    if state.enabled:
        for name, weights in state.active.items():
            if name in state.fused:
                continue
            for target, delta in state.adapters[name].deltas.items():
                if weights[target.component] != 0.0:
                    running.setdefault(target, []).append((delta, weights[target.component]))
    state.running = running
    for target in [t for t in state.hooks if t not in running]:
        state.hooks.pop(target).remove()
    for target in running:
        if target not in state.hooks:
            module = _module(pipe, target)
            state.hooks[target] = module.register_forward_hook(_hook(state, target, LayerKind.of(module)))


def check_names(state: AdapterState, names: Sequence[str], *, argument: str) -> None:
    if not all(isinstance(n, str) for n in names):
        raise InputError("adapter names are strings", where=argument, expected="str or a list of str",
                         found=[type(n).__name__ for n in names])
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        raise InputError("no adapter of that name is loaded", where=argument,
                         expected=f"one of {sorted(state.adapters)}", found=unknown)


def weights_of(value: Any, *, argument: str) -> dict[str, float]:
    """A number (every component) or {"unet": w, "text_encoder": w, "text_encoder_2": w} (SDXL's second text
    encoder; a component left out: 1.0, as diffusers) -> per-component weights."""
    if isinstance(value, Mapping):
        unknown = set(value) - set(COMPONENTS)
        if unknown:
            raise InputError("adapter weights per component take the keys " + ", ".join(COMPONENTS),
                             where=argument, expected=", ".join(COMPONENTS), found=sorted(unknown))
        return {c: _number(value.get(c, 1.0), argument=argument) for c in COMPONENTS}
    w = _number(value, argument=argument)
    return dict.fromkeys(COMPONENTS, w)


def _number(value: Any, *, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise InputError("an adapter weight must be a finite number", where=argument, expected="a float",
                         found=repr(value))
    return float(value)


# ---- fusing -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def fuse(pipe: Any, state: AdapterState, names: Sequence[str], lora_scale: float) -> None:
    """Merge `names` (at their weights x lora_scale) into the weights, after a backup of each module changed."""
    if state.fused:
        raise UsageError("adapters are already fused", where="fuse_lora", found=state.fused,
                         hint="call pipe.unfuse_lora() first")
    merged: dict[Target, list[tuple[Delta, float]]] = {}
    for name in names:
        weights = state.active.get(name) or weights_of(1.0, argument="adapter_weights")
        for target, delta in state.adapters[name].deltas.items():
            merged.setdefault(target, []).append((delta, weights[target.component] * lora_scale))
    new: dict[Target, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for target, deltas in merged.items():   # every new weight first: nothing half-fused on an error
        module = _module(pipe, target)
        weight, bias = module.weight, module.bias
        for delta, scale in deltas:
            weight = delta.weight(weight, scale).to(module.weight.dtype)
            extra = delta.bias_delta(scale)
            if extra is not None:
                bias = (torch.zeros_like(weight[:, 0].flatten()) if bias is None else bias) + extra.to(weight)
        new[target] = (weight, bias)
    for target, (weight, bias) in new.items():
        module = _module(pipe, target)
        state.backups[target] = (module.weight.detach().clone(),
                                 None if module.bias is None else module.bias.detach().clone())
        module.weight.copy_(weight)
        if bias is not None:
            if module.bias is None:
                module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            else:
                module.bias.copy_(bias)
    state.fused = list(names)
    refresh(pipe, state)


@torch.no_grad()
def unfuse(pipe: Any, state: AdapterState) -> None:
    """Put back the backups (bit for bit), the fused adapters run again at runtime if active."""
    for target, (weight, bias) in state.backups.items():
        module = _module(pipe, target)
        module.weight.copy_(weight)
        if bias is None:
            module.bias = None   # type: ignore[assignment]  # a bias only a full-weight delta added
        else:
            module.bias.copy_(bias)
    state.backups.clear()
    state.fused = []
    refresh(pipe, state)


__all__ = ["Adapter", "AdapterState", "state_of", "refresh", "fuse", "unfuse", "check_names", "weights_of"]
