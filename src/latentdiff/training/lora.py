"""A trainable LoRA on a pipeline's UNet, run by the adapters' own runtime and saved in the kohya format.

    lora = TrainableLoRA(pipe.unet, rank=16, alpha=16, targets=("to_q", "conv1", ...))
    lora.attach(pipe)                  # pipe.unet now adds up(down(x)) * alpha / rank at every targeted module
    with lora.disabled(pipe): ...      # the base model (the teacher of a distillation)
    lora.save(path, pipe)              # lora_unet_*.lora_down.weight / .lora_up.weight / .alpha (save_lora_weights)

The parameters live in this nn.Module (checkpointed, averaged, optimised as any module); the pipeline runs them
through `adapters.delta.LoRA` deltas that hold the very same tensors, registered as a loaded adapter, so training
and inference share one forward path (`LoRA.forward`: x -> down -> up) and what is saved is what was trained.
Initialisation as kohya / PEFT: down ~ kaiming-uniform(a = sqrt 5), up = 0, so the adapted model starts as the base.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..adapters.delta import LoRA
from ..adapters.names import Target, patchable
from ..adapters.runtime import Adapter, refresh, state_of, weights_of
from ..adapters.save import save_lora_weights
from ..errors import ConfigError

ADAPTER_NAME = "trained_lora"


def matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's `target_modules` rule: the module's name is a target or ends in "." + a target."""
    return any(name == t or name.endswith("." + t) for t in targets)


class TrainableLoRA(nn.Module):
    """down / up parameters for each targeted nn.Linear / nn.Conv2d of `unet` (LoCon for convolutions: down has the
    module's kernel, up is 1x1)."""

    def __init__(self, unet: nn.Module, *, rank: int, alpha: float | None = None, targets: Sequence[str]):
        super().__init__()
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.names: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.down, self.up = nn.ParameterDict(), nn.ParameterDict()
        for name, module in patchable(unet):
            if not matches(name, targets):
                continue
            weight: torch.Tensor = module.weight   # type: ignore[assignment]  # nn.Linear / nn.Conv2d
            shape = tuple(weight.shape)
            r = min(rank, shape[0], math.prod(shape[1:]))
            down = torch.empty((r, *shape[1:]), device=weight.device)
            nn.init.kaiming_uniform_(down.flatten(1), a=math.sqrt(5))
            kernel: tuple[int, ...] = (1, 1) if weight.dim() == 4 else ()
            up = torch.zeros((shape[0], r, *kernel), device=weight.device)
            key = self.key(name)
            self.down[key], self.up[key] = nn.Parameter(down), nn.Parameter(up)
            self.names.append(name)
            self.shapes[name] = shape
        if not self.names:
            raise ConfigError("no module of the UNet matches the LoRA targets", where="model.lora.targets",
                              expected="module-name suffixes such as to_q, conv1", found=list(targets))

    @staticmethod
    def key(name: str) -> str:
        return name.replace(".", "_")   # ParameterDict keys cannot hold dots (and the kohya key spells it so)

    def deltas(self, *, detach: bool = False) -> dict[str, LoRA]:
        """{module name: LoRA delta over this module's tensors} (detached copies for saving when `detach`)."""
        out = {}
        for name in self.names:
            down, up = self.down[self.key(name)], self.up[self.key(name)]
            if detach:
                down, up = down.detach().clone(), up.detach().clone()
            out[name] = LoRA(down, up, self.alpha, self.shapes[name])
        return out

    def attach(self, pipe: Any) -> None:
        """Register the deltas on `pipe` as its one active adapter (the runtime's forward hooks run them)."""
        state = state_of(pipe)
        deltas = {Target("unet", name): delta for name, delta in self.deltas().items()}
        state.adapters[ADAPTER_NAME] = Adapter(ADAPTER_NAME, deltas, "training")   # type: ignore[arg-type]
        state.active = {ADAPTER_NAME: weights_of(1.0, argument="adapter_weights")}
        refresh(pipe, state)

    @contextlib.contextmanager
    def disabled(self, pipe: Any) -> Iterator[None]:
        """The base model in the body (the hooks unregistered), the adapter back after."""
        state = state_of(pipe)
        state.enabled = False
        refresh(pipe, state)
        try:
            yield
        finally:
            state.enabled = True
            refresh(pipe, state)

    def save(self, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> None:
        """A kohya-format LoRA file (what `pipe.load_lora_weights(path)` and A1111 / ComfyUI read)."""
        save_lora_weights({"unet": self.deltas(detach=True)}, path, metadata=metadata)


__all__ = ["TrainableLoRA", "matches", "ADAPTER_NAME"]
