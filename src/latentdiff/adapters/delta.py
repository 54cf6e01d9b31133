"""The one internal form of every adapter: a `Delta` per module of the UNet or the text encoder.

A file's keys are grouped per module (`lora_unet_..._to_q.lora_down.weight`, `.lora_up.weight`, `.alpha` -> one
group); `delta_from_group` turns a group into a `Delta` by the builder of its kind (the first registered marker
key found in the group: "lora_down" for LoRA / LoCon, "hada_w1_a" for LoHa, "lokr_w1" for LoKr, "diff" for a full
delta ...). A Delta says two things:

    weight(W, scale) -> W'          the module's weight with the adapter merged at `scale` (fusing; DoRA needs W)
    forward(x, W, scale) -> dy      what the adapter adds to the module's output, unfused (runtime adapters:
                                    y = module(x) + sum of each active delta's dy)

`forward` defaults to running the layer with weight(W, scale) - W; a low-rank delta overrides it with the cheap
path (x -> down -> up), which is why runtime adapters cost little per step. Scale is the user's weight w times the
file's own alpha / rank, as A1111 computes it (`LoRA.scale`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """How a module computes y from x and its weight: "linear", or "conv" with its stride / padding / dilation /
    groups (a LoCon delta runs with the module's own)."""

    kind: str                          # "linear" | "conv"
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1

    @classmethod
    def of(cls, module: torch.nn.Module) -> LayerKind:
        if isinstance(module, torch.nn.Conv2d):
            return cls("conv", module.stride, module.padding, module.dilation, module.groups)
        return cls("linear")

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "conv":
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, weight, bias)


class Delta:
    """One adapter's change to one module (see the module docstring). Subclasses are frozen dataclasses holding
    their tensors; `shape` is the module weight's shape the delta was made for (checked at load)."""

    shape: tuple[int, ...]

    def weight_delta(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        """What merging adds to `weight` at `scale`: weight(W, scale) - W. Additive kinds implement this."""
        raise NotImplementedError

    def weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        """The merged weight (non-additive kinds, DoRA, override this)."""
        return weight + self.weight_delta(weight, scale).to(weight.dtype)

    def bias_delta(self, scale: float) -> torch.Tensor | None:
        """What merging adds to the module's bias (None: nothing; full-weight deltas may carry `diff_b`)."""
        return None

    def forward(self, x: torch.Tensor, weight: torch.Tensor, layer: LayerKind, scale: float) -> torch.Tensor:
        """What the delta adds to the module's output for input x, unfused."""
        dw = (self.weight(weight, scale) - weight).to(x.dtype)
        db = self.bias_delta(scale)
        return layer.run(x, dw, None if db is None else db.to(x.dtype))


@dataclasses.dataclass(frozen=True)
class LoRA(Delta):
    """Low rank: dW = up @ down * alpha / rank (Hu et al. 2021; kohya's `lora_down` / `lora_up` / `alpha`).
    Linear: down (r, in), up (out, r). Conv (LoCon): down (r, in, kh, kw), up (out, r, 1, 1).
    LoCon with a Tucker core (`lora_mid`, LyCORIS `use_tucker`): down (r, in, 1, 1), mid (r, r, kh, kw),
    up (out, r, 1, 1); dW[o, i, k, l] = sum_nm up[o, n] mid[n, m, k, l] down[m, i] (A1111's
    rebuild_cp_decomposition); rank = down's rows, as A1111 counts it."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None                # None: alpha = rank (scale 1), as A1111 when the file has no alpha
    shape: tuple[int, ...]
    mid: torch.Tensor | None = None    # the Tucker core (r, r, kh, kw), conv only

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank, A1111's and kohya's factor."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def weight_delta(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        down, up = self.down.to(weight.device, torch.float32), self.up.to(weight.device, torch.float32)
        if self.mid is not None:
            mid = self.mid.to(weight.device, torch.float32)
            dw = torch.einsum("nmkl,on,mi->oikl", mid, up.flatten(1), down.flatten(1))
        else:
            # linear: (out, r) @ (r, in); conv: (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)
            dw = up @ down if down.dim() == 2 else torch.einsum("or,rikl->oikl", up.flatten(1), down)
        return (dw * (scale * self.scale)).reshape(self.shape)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, layer: LayerKind, scale: float) -> torch.Tensor:
        down, up = self.down.to(x), self.up.to(x)
        if layer.kind == "linear":
            return F.linear(F.linear(x, down), up) * (scale * self.scale)
        if self.mid is not None:       # 1x1 down, then the core with the layer's own stride / padding, then 1x1 up
            hidden = F.conv2d(F.conv2d(x, down), self.mid.to(x), None, layer.stride, layer.padding,
                              layer.dilation, layer.groups)
        else:
            hidden = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.conv2d(hidden, up) * (scale * self.scale)


@dataclasses.dataclass(frozen=True)
class DoRA(Delta):
    """Weight-decomposed low rank (Liu et al. 2024, `dora_scale` beside any kind's keys): with V = W + dW (dW the
    inner delta at weight 1, its alpha / rank included), the merged weight is m * V / ||V||, the norm taken per
    input channel (`axis` 1: LyCORIS's default, dora_scale (1, in, 1, 1), what A1111 computes) or per output
    channel (`axis` 0: dora_scale (out, 1, ...), LyCORIS `wd_on_output`, PEFT's magnitude vector). The user's
    weight w blends the result as A1111 and ComfyUI do: W' = W + w * (m * V / ||V|| - W). Not additive in w."""

    inner: Delta
    magnitude: torch.Tensor            # broadcastable to the weight: (1, in, 1, ..) or (out, 1, ..)
    axis: int
    shape: tuple[int, ...]

    def weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        w32 = weight.float()
        v = w32 + self.inner.weight_delta(weight, 1.0).to(w32)
        norm = v.transpose(0, self.axis).reshape(v.shape[self.axis], -1).norm(dim=1)
        norm = norm.reshape([v.shape[self.axis] if i == self.axis else 1 for i in range(v.dim())])
        merged = v * (self.magnitude.to(w32).reshape(norm.shape) / norm)
        return (w32 + scale * (merged - w32)).to(weight.dtype)

    def weight_delta(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return self.weight(weight, scale).float() - weight.float()

    def bias_delta(self, scale: float) -> torch.Tensor | None:
        return self.inner.bias_delta(scale)


def with_dora(group: Mapping[str, torch.Tensor], delta: Delta, shape: tuple[int, ...], where: str) -> Delta:
    """`delta` as is, or wrapped in DoRA when the group has a `dora_scale` (its axis read from its shape)."""
    m = group.get("dora_scale")
    if m is None:
        return delta
    out, inputs = shape[0], shape[1] if len(shape) > 1 else 1
    if m.dim() == 0:
        axis = -1
    elif m.dim() >= 2 and m.shape[0] == 1 and m.numel() == inputs:
        axis = 1
    elif m.shape[0] == out and m.numel() == out:
        axis = 0
    else:
        axis = -1
    if axis < 0:
        raise CheckpointError("a dora_scale that fits neither axis of the module's weight", where=f"{where}.dora_scale",
                              expected=f"(1, {inputs}, 1, ...) (per input channel) or ({out}, 1, ...) (per output "
                                       f"channel) for a weight of shape {tuple(shape)}", found=tuple(m.shape))
    return DoRA(delta, m, axis, tuple(shape))


# ---- the builders of each file kind ----------------------------------------------------------------------------
Builder = Callable[[Mapping[str, torch.Tensor], tuple[int, ...], str], Delta]
KINDS: dict[str, Builder] = {}      # marker key (suffix without ".weight") -> builder, first found wins


def register_kind(marker: str) -> Callable[[Builder], Builder]:
    """Register the builder of the groups holding `marker` (e.g. "hada_w1_a")."""
    def add(build: Builder) -> Builder:
        KINDS[marker] = build
        return build
    return add


def delta_from_group(group: Mapping[str, torch.Tensor], shape: tuple[int, ...], *, where: str) -> Delta:
    """The Delta of one module's keys (`group`: suffix -> tensor, e.g. {"lora_down.weight": ..., "alpha": ...}),
    for a module whose weight has `shape`. `where`: the file and key prefix, for errors."""
    names = {key.removesuffix(".weight") for key in group}
    for marker, build in KINDS.items():
        if marker in names:
            return build(group, shape, where)
    raise CheckpointError("an adapter key group of no known kind", where=where,
                          expected=f"keys with one of {sorted(KINDS)}", found=sorted(group))


def check_keys(group: Mapping[str, torch.Tensor], allowed: set[str], where: str, kind: str) -> None:
    """A key a kind does not read is an error, not silently dropped (A1111's per-module `scale`, a bias ...)."""
    extra = sorted(set(group) - allowed)
    if extra:
        raise CheckpointError(f"keys a {kind} group does not have", where=f"{where}.{extra[0]}",
                              expected=f"only {sorted(allowed)}", found=extra)


def _alpha(group: Mapping[str, torch.Tensor], where: str = "") -> float | None:
    alpha = group.get("alpha")
    if alpha is None:
        return None
    value = float(alpha.float().reshape(-1)[0]) if alpha.numel() == 1 else None
    if value is None or not math.isfinite(value):
        raise CheckpointError("an adapter's alpha is one finite number", where=f"{where}.alpha",
                              expected="a scalar tensor (kohya: alpha = rank or less)",
                              found=f"shape {tuple(alpha.shape)}" if value is None else value)
    return value


@register_kind("lora_down")
def build_lora(group: Mapping[str, torch.Tensor], shape: tuple[int, ...], where: str) -> Delta:
    """kohya LoRA / LoCon: lora_down, lora_up, optional alpha, optional lora_mid (Tucker core, conv), optional
    dora_scale (DoRA)."""
    down, up = group.get("lora_down.weight"), group.get("lora_up.weight")
    if down is None or up is None:
        raise CheckpointError("a LoRA key group without both lora_down and lora_up", where=where,
                              expected="lora_down.weight and lora_up.weight", found=sorted(group))
    if down.dim() not in (2, 4) or up.dim() not in (2, 4) or down.shape[0] < 1:
        raise CheckpointError("LoRA tensors are matrices or conv kernels of rank >= 1",
                              where=f"{where}.lora_down.weight",
                              expected="lora_down (r, in[, kh, kw]), lora_up (out, r[, 1, 1]), r >= 1",
                              found=f"up {tuple(up.shape)}, down {tuple(down.shape)}")
    check_keys(group, {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale"}, where,
               "LoRA")
    mid = group.get("lora_mid.weight")
    if mid is not None:
        return with_dora(group, _build_tucker_lora(down, up, mid, group, shape, where), shape, where)
    rank = down.shape[0]
    expected_out, expected_in = shape[0], shape[1]
    if up.shape[0] != expected_out or up.shape[1] != rank or down.shape[1] != expected_in \
            or (len(shape) == 4 and tuple(down.shape[2:]) != tuple(shape[2:])):
        raise CheckpointError("LoRA shapes do not fit the module", where=where,
                              expected=f"up ({expected_out}, r), down (r, {expected_in}, ...) for a weight of shape "
                                       f"{tuple(shape)}",
                              found=f"up {tuple(up.shape)}, down {tuple(down.shape)}")
    lora = LoRA(down.reshape(rank, *shape[1:]) if len(shape) == 4 else down.reshape(rank, -1),
                up.reshape(expected_out, rank, *([1, 1] if len(shape) == 4 else [])), _alpha(group, where),
                tuple(shape))
    return with_dora(group, lora, shape, where)


def _build_tucker_lora(down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor, group: Mapping[str, torch.Tensor],
                       shape: tuple[int, ...], where: str) -> LoRA:
    """LoCon with a Tucker core: down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1); conv modules only."""
    rank = down.shape[0]
    ok = (len(shape) == 4 and down.dim() == 4 and tuple(down.shape) == (rank, shape[1], 1, 1)
          and tuple(mid.shape) == (rank, rank, *shape[2:]) and tuple(up.shape) == (shape[0], rank, 1, 1))
    if not ok:
        raise CheckpointError("LoCon Tucker shapes (lora_down / lora_mid / lora_up) do not fit the module",
                              where=f"{where}.lora_mid.weight",
                              expected=f"down (r, {shape[1]}, 1, 1), mid (r, r, {tuple(shape[2:])}), up ({shape[0]}, "
                                       f"r, 1, 1) for a conv weight of shape {tuple(shape)}"
                              if len(shape) == 4 else f"no lora_mid: a Tucker core needs a conv module, this weight "
                                                      f"has shape {tuple(shape)}",
                              found=f"down {tuple(down.shape)}, mid {tuple(mid.shape)}, up {tuple(up.shape)}")
    return LoRA(down, up, _alpha(group, where), tuple(shape), mid)


__all__ = ["Delta", "LoRA", "DoRA", "with_dora", "LayerKind", "KINDS", "register_kind", "delta_from_group",
           "build_lora", "check_keys"]
