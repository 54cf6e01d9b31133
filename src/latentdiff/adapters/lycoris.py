"""The LyCORIS kinds beyond LoRA / LoCon (that one, with its Tucker core and DoRA, is `delta.build_lora`):
LoHa, LoKr, full-weight deltas and the norm-layer deltas, as A1111's `extensions-builtin/Lora` and LyCORIS
define them. Each builder checks every tensor's shape against the module's weight and raises a CheckpointError
naming the key, what fits and what the file holds; each kind may carry a `dora_scale` (DoRA, `delta.with_dora`).

Scale, A1111's rule (`NetworkModule.calc_scale`): alpha / dim where the file has an alpha and the kind has a rank
(LoHa: hada_w1_b's rows; LoKr: the rows of lokr_w2_b, else lokr_w1_b, only when a factor is low-rank), else 1;
the user's weight w multiplies the result.

    LoHa   dW = (w1a @ w1b) * (w2a @ w2b) * alpha / rank        (Hadamard product of two low-rank factors)
           with hada_t1 / hada_t2 (Tucker, conv): w = einsum(t, b, a) -> (out, in, kh, kw)
    LoKr   dW = kron(w1, w2) * scale, w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, w2 = lokr_w2 or lokr_w2_a @ lokr_w2_b
           (or the Tucker einsum with lokr_t2); reshaped to the weight
    Full   dW = diff, db = diff_b                                (w_norm / b_norm: the same for norm layers)
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from ..errors import CheckpointError
from .delta import Delta, LayerKind, _alpha, check_keys, register_kind, with_dora

Group = Mapping[str, torch.Tensor]


def _need(group: Group, key: str, where: str, kind: str) -> torch.Tensor:
    tensor = group.get(key)
    if tensor is None:
        raise CheckpointError(f"a {kind} key group without {key}", where=f"{where}.{key}", expected=key,
                              found=sorted(group))
    return tensor


def _fit(ok: bool, what: str, where: str, key: str, expected: str, found: object) -> None:
    if not ok:
        raise CheckpointError(f"{what} do not fit the module", where=f"{where}.{key}", expected=expected, found=found)


def tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A Tucker-factored weight (A1111's make_weight_cp): t (r, r, kh, kw), a (r, out), b (r, in) ->
    w[o, i, k, l] = sum_pq a[p, o] t[p, q, k, l] b[q, i]."""
    return torch.einsum("pqkl,po,qi->oikl", t, a, b)


def _low_rank(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    a, b = a.float(), b.float()
    return a @ b.flatten(1) if t is None else tucker(t.float(), a, b.flatten(1))


def _check_factor(group: Group, names: tuple[str, str, str], shape: tuple[int, ...], where: str,
                  kind: str) -> tuple[int, int]:
    """Shapes of a low-rank factor a @ b (or Tucker t, a, b) whose product is (out, cols) -> (out, cols).
    Without Tucker: a (out, r), b (r, cols); with: t (r, r, kh, kw), a (r, out), b (r, in)."""
    a_key, b_key, t_key = names
    a, b, t = _need(group, a_key, where, kind), _need(group, b_key, where, kind), group.get(t_key)
    if t is None:
        _fit(a.dim() == 2 and b.dim() >= 2 and a.shape[1] == b.shape[0] >= 1, f"{kind} factors", where, a_key,
             f"{a_key} (rows, r) and {b_key} (r, cols)", f"{a_key} {tuple(a.shape)}, {b_key} {tuple(b.shape)}")
        return int(a.shape[0]), int(b[0].numel())
    r = t.shape[0] if t.dim() else 0
    _fit(r >= 1 and t.dim() == 4 and t.shape[1] == r and a.dim() == 2 and a.shape[0] == r and b.dim() == 2
         and b.shape[0] == r and tuple(t.shape[2:]) == tuple(shape[2:]), f"{kind} Tucker factors", where, t_key,
         f"{t_key} (r, r, {tuple(shape[2:])}), {a_key} (r, out), {b_key} (r, in) for a conv weight of shape "
         f"{tuple(shape)}", f"{t_key} {tuple(t.shape)}, {a_key} {tuple(a.shape)}, {b_key} {tuple(b.shape)}")
    return int(a.shape[1]), int(b.shape[1]) * math.prod(shape[2:])


# ---- LoHa -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoHa(Delta):
    """LoHa (Hyeon-Woo et al. 2022, FedPara): dW = (w1a @ w1b) * (w2a @ w2b) * alpha / rank, each factor optionally
    Tucker-factored (t1 / t2). rank: w1b's rows (A1111)."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    t1: torch.Tensor | None
    t2: torch.Tensor | None
    alpha: float | None
    shape: tuple[int, ...]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / int(self.w1b.shape[0])

    def weight_delta(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        w1 = _low_rank(self.w1a, self.w1b, self.t1).to(weight.device)
        w2 = _low_rank(self.w2a, self.w2b, self.t2).to(weight.device)
        return (w1 * w2).reshape(self.shape) * (scale * self.scale)


@register_kind("hada_w1_a")
def build_loha(group: Group, shape: tuple[int, ...], where: str) -> Delta:
    """LoHa: hada_w1_a / hada_w1_b / hada_w2_a / hada_w2_b, optional hada_t1 / hada_t2, alpha, dora_scale."""
    shape = tuple(shape)
    check_keys(group, {f"hada_{p}{i}{s}" for p, s in (("w", "_a"), ("w", "_b"), ("t", "")) for i in "12"}
               | {"alpha", "dora_scale"}, where, "LoHa")
    cols = math.prod(shape[1:])
    for i in ("1", "2"):
        names = (f"hada_w{i}_a", f"hada_w{i}_b", f"hada_t{i}")
        out, got = _check_factor(group, names, shape, where, "LoHa")
        _fit((out, got) == (shape[0], cols), "LoHa factors", where, names[0],
             f"a product of shape ({shape[0]}, {cols}) for a weight of shape {shape}",
             f"({out}, {got}) from {', '.join(f'{k} {tuple(group[k].shape)}' for k in names if k in group)}")
    loha = LoHa(group["hada_w1_a"], group["hada_w1_b"], group["hada_w2_a"], group["hada_w2_b"],
                group.get("hada_t1"), group.get("hada_t2"), _alpha(group, where), shape)
    return with_dora(group, loha, shape, where)


# ---- LoKr -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoKr(Delta):
    """LoKr (Kronecker product): dW = kron(w1, w2) * scale reshaped to the weight; w1 (a, b) full or w1a @ w1b,
    w2 (c, d[, kh, kw]) full, w2a @ w2b, or Tucker (t2, w2a, w2b). scale = alpha / rank only when a factor is
    low-rank (rank: w2b's rows, else w1b's: A1111's order), else 1."""

    w1: torch.Tensor | None
    w1a: torch.Tensor | None
    w1b: torch.Tensor | None
    w2: torch.Tensor | None
    w2a: torch.Tensor | None
    w2b: torch.Tensor | None
    t2: torch.Tensor | None
    alpha: float | None
    shape: tuple[int, ...]

    @property
    def rank(self) -> int | None:
        low = self.w2b if self.w2b is not None else self.w1b
        return None if low is None else int(low.shape[0])

    @property
    def scale(self) -> float:
        rank = self.rank
        return 1.0 if self.alpha is None or rank is None else float(self.alpha) / rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.w1.float() if self.w1 is not None else _low_rank(self.w1a, self.w1b, None)  # type: ignore[arg-type]
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is None:
            w2 = _low_rank(self.w2a, self.w2b, None)  # type: ignore[arg-type]
        else:
            w2 = _low_rank(self.w2a, self.w2b, self.t2)  # type: ignore[arg-type]
        return w1, w2

    def weight_delta(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        w1, w2 = self.factors()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1.contiguous(), w2.contiguous()).to(weight.device).reshape(self.shape) * (scale * self.scale)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, layer: LayerKind, scale: float) -> torch.Tensor:
        """Linear: x (..., b*d) as X (..., b, d); kron(w1, w2) x = vec(w1 X w2^T), without forming the product."""
        w1, w2 = self.factors()
        if layer.kind != "linear" or w2.dim() != 2:
            return super().forward(x, weight, layer, scale)
        w1, w2 = w1.to(x), w2.to(x)
        grid = x.reshape(*x.shape[:-1], w1.shape[1], w2.shape[1])
        out = torch.einsum("ij,...jq,pq->...ip", w1, grid, w2)
        return out.reshape(*x.shape[:-1], w1.shape[0] * w2.shape[0]) * (scale * self.scale)


@register_kind("lokr_w1")
@register_kind("lokr_w1_a")
def build_lokr(group: Group, shape: tuple[int, ...], where: str) -> Delta:
    """LoKr: lokr_w1 or lokr_w1_a / lokr_w1_b; lokr_w2, or lokr_w2_a / lokr_w2_b, optional lokr_t2; alpha;
    dora_scale."""
    shape = tuple(shape)
    check_keys(group, {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha",
                       "dora_scale"}, where, "LoKr")
    if "lokr_w1" in group:
        w1 = group["lokr_w1"]
        _fit(w1.dim() == 2, "LoKr factors", where, "lokr_w1", "a matrix (a, b)", tuple(w1.shape))
        a, b = int(w1.shape[0]), int(w1.shape[1])
    else:
        a, b = _check_factor(group, ("lokr_w1_a", "lokr_w1_b", "lokr_w1_t"), shape, where, "LoKr")
    w2_4d = False
    if "lokr_w2" in group:
        w2 = group["lokr_w2"]
        _fit(w2.dim() in (2, 4), "LoKr factors", where, "lokr_w2", "(c, d) or (c, d, kh, kw)", tuple(w2.shape))
        c, d, w2_4d = int(w2.shape[0]), int(w2.shape[1]), w2.dim() == 4
        kernel = tuple(w2.shape[2:])
    else:
        c, d = _check_factor(group, ("lokr_w2_a", "lokr_w2_b", "lokr_t2"), shape, where, "LoKr")
        w2_4d, kernel = "lokr_t2" in group, tuple(shape[2:])
        if w2_4d:
            d //= math.prod(kernel)
    if w2_4d:
        produced: tuple[int, ...] = (a * c, b * d, *kernel)
        fits = produced == shape
    else:
        produced = (a * c, b * d)
        fits = produced == (shape[0], math.prod(shape[1:]))
    present = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(group.items()) if k.startswith("lokr_"))
    _fit(fits, "LoKr factors", where, "lokr_w1" if "lokr_w1" in group else "lokr_w1_a",
         f"kron(w1, w2) of shape ({shape[0]}, {math.prod(shape[1:])}) or {shape} for a weight of shape {shape}",
         f"{produced} from {present}")
    lokr = LoKr(group.get("lokr_w1"), group.get("lokr_w1_a"), group.get("lokr_w1_b"), group.get("lokr_w2"),
                group.get("lokr_w2_a"), group.get("lokr_w2_b"), group.get("lokr_t2"), _alpha(group, where), shape)
    return with_dora(group, lokr, shape, where)


# ---- full deltas ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Full(Delta):
    """A full-weight delta (LyCORIS "full" / kohya `diff`): dW = diff * w, db = diff_b * w. Also the norm layers'
    `w_norm` / `b_norm` (their weight (C,) and bias): fused only, `forward` runs linear / conv layers."""

    diff: torch.Tensor
    diff_b: torch.Tensor | None
    shape: tuple[int, ...]

    def weight_delta(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return self.diff.to(weight.device, torch.float32).reshape(self.shape) * scale

    def bias_delta(self, scale: float) -> torch.Tensor | None:
        return None if self.diff_b is None else self.diff_b.float() * scale


def _build_full(group: Group, shape: tuple[int, ...], where: str, w_key: str, b_key: str) -> Delta:
    shape = tuple(shape)
    # alpha: LyCORIS writes one for every module; A1111 has no rank here to divide by, so it changes nothing
    check_keys(group, {w_key, b_key, "alpha", "dora_scale"}, where, "full-delta")
    diff, diff_b = _need(group, w_key, where, "full-delta"), group.get(b_key)
    _fit(diff.numel() == math.prod(shape), "full-delta shapes", where, w_key, f"a tensor of shape {shape}",
         tuple(diff.shape))
    if diff_b is not None:
        _fit(diff_b.numel() == shape[0], "full-delta shapes", where, b_key, f"a bias of shape ({shape[0]},)",
             tuple(diff_b.shape))
        diff_b = diff_b.reshape(shape[0])
    return with_dora(group, Full(diff, diff_b, shape), shape, where)


@register_kind("diff")
def build_full(group: Group, shape: tuple[int, ...], where: str) -> Delta:
    """Full-weight delta: diff (the weight's shape), optional diff_b (out,)."""
    return _build_full(group, shape, where, "diff", "diff_b")


@register_kind("w_norm")
def build_norm(group: Group, shape: tuple[int, ...], where: str) -> Delta:
    """A norm layer's delta (A1111's network_norm): w_norm (C,), optional b_norm (C,)."""
    return _build_full(group, shape, where, "w_norm", "b_norm")


__all__ = ["LoHa", "LoKr", "Full", "tucker", "build_loha", "build_lokr", "build_full", "build_norm"]
