"""An exponential moving average of a module's parameters: the weights latent diffusion exports.

    ema = EMA(unet, decay=0.9999)
    ...; optimizer.step(); ema.update()
    ema.copy_to(unet)                     # or: with ema.applied(): sample(unet)

After each optimizer step, shadow <- decay_n * shadow + (1 - decay_n) * param, with LDM's warm-up
decay_n = min(decay, (1 + n) / (10 + n)) at the n-th update (LitEma), so early averages are not dominated
by the random initialisation. The shadow is kept in float32 beside the parameters (same device), whatever
the autocast precision. Only parameters that require gradients are averaged; buffers are the model's own.
The EMA lives beside the model, never inside it: models know nothing of training.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, TypedDict

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError


class EMAState(TypedDict):
    """`EMA.state_dict()`: the settings, the update count and the shadow weights by parameter name."""

    decay: float
    warmup: bool
    num_updates: int
    shadow: dict[str, torch.Tensor]


class EMA:
    """Shadow copies of `module`'s trainable parameters, updated by `update()`; state_dict for checkpoints."""

    def __init__(self, module: nn.Module, *, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ConfigError("EMA decay must lie in [0, 1)", where="decay", expected="[0, 1)", found=decay)
        self.module, self.decay, self.warmup = module, decay, warmup
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.shadow = [p.detach().float().clone() for p in self._params]
        self.num_updates = 0

    def decay_at(self, n: int) -> float:
        """The decay of the n-th update (n >= 1)."""
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- shadow + (1 - decay_n) (param - shadow), for every averaged parameter at once."""
        self.num_updates += 1
        weight = 1.0 - self.decay_at(self.num_updates)
        params = [p.detach().float() for p in self._params]
        torch._foreach_lerp_(self.shadow, params, weight)

    @torch.no_grad()
    def copy_to(self, module: nn.Module | None = None) -> None:
        """Write the averaged weights into `module` (default: the averaged module itself)."""
        params = self._params if module is None else self._matching(module)
        for p, s in zip(params, self.shadow, strict=True):   # one shadow per averaged parameter
            p.copy_(s)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Run the body with the averaged weights in the module; the training weights come back exactly after."""
        saved = [p.detach().clone() for p in self._params]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self._params, saved, strict=True):
                    p.copy_(s)

    def _matching(self, module: nn.Module) -> list[torch.Tensor]:
        named = dict(module.named_parameters())
        missing = [n for n in self.names if n not in named]
        if missing:
            raise CheckpointError("the module lacks parameters the EMA averages", where=type(module).__name__,
                                  found=missing[:20])
        return [named[n] for n in self.names]

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> EMAState:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": dict(zip(self.names, self.shadow, strict=True))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Strict: the same parameter names and shapes, else a CheckpointError naming the differences. `state`:
        an `EMAState`, of which "shadow" and "num_updates" are read."""
        shadow: dict[str, torch.Tensor] = state["shadow"]
        missing, unexpected = sorted(set(self.names) - set(shadow)), sorted(set(shadow) - set(self.names))
        wrong = [n for n, s in zip(self.names, self.shadow, strict=True) if n in shadow and shadow[n].shape != s.shape]
        if missing or unexpected or wrong:
            raise CheckpointError("EMA state does not match the model", expected=f"{len(self.names)} parameters",
                                  found=f"missing {missing[:10]}, unexpected {unexpected[:10]}, "
                                        f"wrong shape {wrong[:10]}")
        with torch.no_grad():
            for name, s in zip(self.names, self.shadow, strict=True):
                s.copy_(shadow[name])
        self.num_updates = int(state["num_updates"])
