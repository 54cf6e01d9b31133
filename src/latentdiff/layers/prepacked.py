"""Convolutions and linear layers with their weights reordered once into oneDNN's blocked layout (CPU), and the
GEGLU feed-forward fused into its GEMMs.

An `nn.Conv2d` on the CPU hands oneDNN a plain (O, I, kh, kw) weight, and oneDNN reorders it into the blocked
layout its kernels read (for AMX bf16: VNNI-packed tiles) on every call: in one bf16 SD 1.5 UNet call at 256 px
that reorder was 248 ms of 587 ms of oneDNN time. `prepack_convolutions` makes the reorder once
(`torch.ops.mkldnn._reorder_convolution_weight`, the op inductor's freezing pass uses, for the input shape of the
latest call) and calls
`mkldnn._convolution_pointwise` with the packed weight; the result is the same convolution (fp32: to rounding
order; bf16: the same rounding of inputs, the same fp32 accumulation).

The module stays an `nn.Conv2d` with its parameters, so `state_dict`, saving, LoRA fusing and `.to()` are
unchanged. By default the packed copy (as large again as the weight) lives beside the parameter and is rebuilt
when the weight is changed in place or moved (its version, storage, dtype or device differ), so it is never
stale; with `release=True` (what `optimize_for_cpu` does) it takes the plain weight's place in the same
Parameter object, so the weights are held once, and whatever reads or changes the values (state_dict,
load_state_dict, `.to()`, a training forward, `restore_weights`, an in-place change, an optimizer's step) gets
the exact plain weight back (`_Packed`, `ReleasedWeight`).
`unpack_convolutions` drops the packed copies.

`prepack_linears` does the same for `nn.Linear` (`mkldnn._reorder_linear_weight` / `_linear_pointwise`) and gives
every `GEGLU` (layers.attention: `h, gate = proj(x).chunk(2); h * gelu(gate)`) a fused forward: the gate half of
the projection is one GEMM with GELU applied to its accumulator, and the value half a second GEMM that multiplies
by it as it writes (oneDNN post-ops), so the (tokens, 2 x inner) projection, its two strided halves and the
separate GELU and product passes never exist. On a bf16 SD 1.5 UNet the GEGLU was a third of the transformer
blocks' time, nearly all of it in the element-wise passes over the strided halves (benchmarks/RESULTS.md, "CPU
paths"). The GELU then sees the fp32 accumulator instead of its bf16 rounding: bf16 results move by a rounding
step, fp32 ones equal the plain ones to rounding order. `unpack_linears` goes back.
"""
from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .attention import GEGLU


def can_prepack(conv: nn.Module) -> bool:
    """A 2-d convolution oneDNN runs from a packed weight: on the CPU, float32 or bfloat16, zero padding, no
    gradient wanted (the packed op has no backward)."""
    return (type(conv) is nn.Conv2d and conv.weight.device.type == "cpu"
            and conv.weight.dtype in (torch.float32, torch.bfloat16) and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and torch.backends.mkldnn.is_available())


# A "same" convolution whose output has at most this many pixels (batch x height x width) runs as im2col + one
# packed GEMM: there (the 4 x 4 level of a 256 px SD UNet at batch 2) the weights dominate, and oneDNN's GEMM
# reads them faster than its convolution (1280 -> 1280 channels: 0.74 vs 1.26 ms, 2560 -> 1280: 2.0 vs 3.7 ms, 2
# threads, bf16, AMX); from 8 x 8 on (128 pixels) the convolution is as fast or faster.
GEMM_MAX_PIXELS = 32


class PackedForward:
    """The replacement `forward` of one Conv2d: the oneDNN convolution on a weight packed once per version (or,
    for a tiny output, im2col and a packed GEMM: `GEMM_MAX_PIXELS`)."""

    latentdiff_prepacked = True

    def __init__(self, conv: nn.Conv2d, *, release: bool = False):
        self.release = release
        self.conv = conv
        self.packed = _Packed(self._pack, owner=conv if release else None,
                              releasable=lambda size: not self._as_gemm(size))   # a GEMM copy has another shape

    def copy_for(self, conv: nn.Conv2d) -> PackedForward:
        """The same forward for a copy of the layer (`copy.deepcopy`: see `_deepcopy`)."""
        return PackedForward(conv, release=self.release)

    def _pack(self, w: torch.Tensor, size: torch.Size) -> torch.Tensor:
        conv = self.conv
        if self._as_gemm(size):   # (O, I, kh, kw) -> (O, kh * kw * I): the order of the channels-last patches
            return torch.ops.mkldnn._reorder_linear_weight(w.permute(0, 2, 3, 1).reshape(w.shape[0], -1))
        return torch.ops.mkldnn._reorder_convolution_weight(w, list(conv.padding), list(conv.stride),
                                                            list(conv.dilation), conv.groups, list(size))

    def _as_gemm(self, size: torch.Size | tuple[int, ...]) -> bool:
        conv = self.conv
        kh, kw = conv.kernel_size
        return (len(size) == 4 and size[0] * size[2] * size[3] <= GEMM_MAX_PIXELS and conv.groups == 1
                and conv.stride == (1, 1) and conv.dilation == (1, 1) and kh % 2 == 1 and kw % 2 == 1
                and conv.padding == (kh // 2, kw // 2))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.run(x)
        if out is None:   # training, or a dtype it does not mix: the plain weight again
            restore_weights(self.conv)
            return nn.Conv2d.forward(self.conv, x)
        return out

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
        """conv(x) + residual in one call (layers.fused); None where it cannot run (the caller adds)."""
        return self.run(x, residual) if residual.dim() == 4 else None

    def run(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | None:
        """The packed convolution of x (+ residual, as a post-op); None where the packed call cannot run."""
        conv = self.conv
        if not _packed_call(x, conv.weight, residual):
            return None
        bias = conv.bias.detach() if conv.bias is not None else None
        packed = self.packed.get(conv.weight, x.shape)
        if self._as_gemm(x.shape):
            patches = self._patches(x)
            if residual is None:
                return self._image(torch.ops.mkldnn._linear_pointwise(patches, packed, bias, "none", [], ""), x)
            rows = residual.permute(0, 2, 3, 1).reshape(-1, residual.shape[1])
            return self._image(torch.ops.mkldnn._linear_pointwise.binary(patches, rows, packed, bias, "add"), x)
        geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *geometry, "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed, bias, *geometry, "add", None,
                                                              None, [], None)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B * H * W, kh * kw * C): each output pixel's zero-padded neighbourhood, channels last."""
        kh, kw = self.conv.kernel_size
        ph, pw = kh // 2, kw // 2
        nhwc = torch.nn.functional.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)        # (B, H+2p, W+2p, C)
        windows = nhwc.unfold(1, kh, 1).unfold(2, kw, 1)                                # (B, H, W, C, kh, kw)
        return windows.permute(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * x.shape[1])

    @staticmethod
    def _image(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B * H * W, O) -> (B, O, H, W), channels-last."""
        b, _, h, w = x.shape
        return rows.view(b, h, w, -1).permute(0, 3, 1, 2)


class PackedLinearForward:
    """The replacement `forward` of one Linear: oneDNN's GEMM on a weight packed once per version."""

    latentdiff_prepacked = True

    def __init__(self, linear: nn.Linear, *, release: bool = False):
        self.release = release
        self.linear = linear
        self.packed = _Packed(lambda w: torch.ops.mkldnn._reorder_linear_weight(w), owner=linear if release else None)

    def copy_for(self, linear: nn.Linear) -> PackedLinearForward:
        return PackedLinearForward(linear, release=self.release)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.run(x)
        if out is None:
            restore_weights(self.linear)
            return nn.Linear.forward(self.linear, x)
        return out

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
        """linear(x) + residual in one call (layers.fused); None where it cannot run (the caller adds)."""
        return self.run(x, residual)

    def run(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | None:
        """The packed GEMM of x (+ residual, as a post-op); None where the packed call cannot run."""
        linear = self.linear
        if not _packed_call(x, linear.weight, residual):
            return None
        bias = linear.bias.detach() if linear.bias is not None else None
        packed = self.packed.get(linear.weight)
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")


class FusedGEGLUForward:
    """The replacement `forward` of one GEGLU: gelu(x W_gate + b_gate) * (x W_h + b_h) as two fused GEMMs (see
    the module docstring). The halves of `proj.weight` are packed separately, each once per version."""

    latentdiff_prepacked = True

    def __init__(self, geglu: GEGLU):
        self.geglu = geglu
        self.value = _Packed(lambda w: torch.ops.mkldnn._reorder_linear_weight(_half(w, 0)))
        self.gate = _Packed(lambda w: torch.ops.mkldnn._reorder_linear_weight(_half(w, 1)))

    def copy_for(self, geglu: GEGLU) -> FusedGEGLUForward:
        return FusedGEGLUForward(geglu)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        geglu = self.geglu
        proj = geglu.proj
        if not _packed_call(x, proj.weight) or proj.bias is None:
            return GEGLU.forward(geglu, x)
        bias = proj.bias.detach()
        gate = torch.ops.mkldnn._linear_pointwise(x, self.gate.get(proj.weight), _half(bias, 1), "gelu", [],
                                                   "none")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, self.value.get(proj.weight), _half(bias, 0),
                                                          "mul")


def _half(t: torch.Tensor, index: int) -> torch.Tensor:
    """The value (0) or gate (1) half of a GEGLU projection's weight or bias, as chunk(2) splits its output."""
    return t.detach().chunk(2, dim=0)[index].contiguous()


class _Packed:
    """A weight's packed copy, made by `pack` and remade when the weight changes (version, storage, dtype,
    device; an inference tensor has no version counter, the rest still tells a move or a swap). A convolution's
    layout also depends on its input's shape (oneDNN picks the AMX kernel's blocking from it; packed for another
    shape, oneDNN reorders the weight again on every call): it is packed for the shape of the latest call.

    With an `owner` (`release=True`), the packed copy takes the plain weight's place, so the weight is held once:
    the same Parameter object (`torch.utils.swap_tensors`) then holds the oneDNN-layout tensor (same shape, dtype,
    device), as a `ReleasedWeight`: whatever reads or changes its values turns it back into the exact plain weight
    first (`to_dense` is a pure reorder), as do `restore_weights` and the owner's guards (load_state_dict, `.to()`:
    `_guard`); state_dict copies it out as it is.
    Not released: a copy `releasable(size)` refuses (another shape), a layer with forward hooks (they may read
    the weight, e.g. an unfused LoRA) and a weight holding a gradient (a swap would drop it: a training step's
    preview; released after `zero_grad()`)."""

    def __init__(self, pack: Callable[..., torch.Tensor], *, owner: nn.Module | None = None,
                 releasable: Callable[..., bool] = lambda *size: True):
        self.pack = pack
        self.owner = owner
        self.releasable = releasable
        self.key: tuple[Any, ...] | None = None
        self.packed: torch.Tensor | None = None
        self.size: tuple[torch.Size, ...] = ()   # what a released copy was packed for
        self.lock = threading.Lock()

    def get(self, w: torch.Tensor, *size: torch.Size) -> torch.Tensor:
        with self.lock:   # two threads may share a pipeline: one packs, or swaps the weight, at a time
            return self._get(w, *size)

    def _get(self, w: torch.Tensor, *size: torch.Size) -> torch.Tensor:
        owner = self.owner
        if type(w) is ReleasedWeight:   # the parameter holds the packed copy itself
            if size == self.size and not _hooked(owner):
                return w.__dict__[_PACKED]   # not `w`: its torch functions turn it back (ReleasedWeight)
            _restore(w)
        key = (None if w.is_inference() else w._version, w.data_ptr(), w.dtype, w.device, *size)
        packed = self.packed
        if key != self.key or packed is None:
            with torch.inference_mode(False):   # a released copy becomes the parameter: not an inference tensor
                packed = self.packed = self.pack(w.detach(), *size)
            self.key = key
        if owner is not None and self.releasable(*size) and not _hooked(owner) and w.grad is None:
            try:
                with torch.inference_mode(False):
                    _swap(w, ReleasedWeight.holding(packed, w.requires_grad, where=f"{owner}.weight"))
            except RuntimeError:   # weak references to the weight, or another tensor object on it: keep both
                self.owner = None
                return packed
            self.packed, self.key, self.size = None, None, size
        return packed


def _hooked(layer: nn.Module | None) -> bool:
    return layer is not None and bool(layer._forward_hooks or layer._forward_pre_hooks)


def _swap(param: torch.Tensor, value: torch.Tensor) -> None:
    """Give the Parameter object `param` the contents (and class) of the Parameter `value` (its identity, kept by
    optimizers and adapters, stays)."""
    with torch.inference_mode(False), torch.no_grad(), torch._C.DisableTorchFunctionSubclass():
        torch.utils.swap_tensors(param, value)


_PACKED = "_latentdiff_packed"   # a ReleasedWeight's own tensor, as a plain torch.Tensor (what the packed ops get)
_WHERE = "_latentdiff_where"     # and its layer, as errors name it
_SET_GRAD, _SET_REQUIRES_GRAD = (getattr(torch.Tensor, name).__set__ for name in ("grad", "requires_grad"))
# What a released weight answers as it is: its metadata, never its values (and requires_grad, a flag). (getattr
# by name: descriptors and C methods, which the type stubs do not describe.)
_METADATA = frozenset([*(getattr(torch.Tensor, name).__get__ for name in (
    "dtype", "device", "shape", "layout", "is_mkldnn", "requires_grad", "is_leaf", "grad", "grad_fn", "ndim",
    "is_cpu", "is_cuda", "is_meta", "is_sparse", "is_quantized", "_version")),
    *(getattr(torch.Tensor, name) for name in (
        "size", "dim", "numel", "element_size", "is_inference", "is_floating_point", "get_device", "__hash__",
        "_use_count", "_is_view", "requires_grad_")), _SET_REQUIRES_GRAD])


class ReleasedWeight(nn.Parameter):
    """A weight released into its packed copy (`_Packed`): the Parameter holds the oneDNN-layout tensor, on which
    oneDNN's in-place kernels ignore layout and dtype (`zero_()` writes float32s: past a bf16 weight's end, over
    the heap) and reads raise. So every torch function on it but a metadata read first turns it back into the
    plain weight (`_restore`: the same Parameter, exact), then runs: `weight.detach().zero_()`, `.data.copy_(w)`,
    `.data = w`, an optimizer's step, `.sum()` act on the plain values; the layer packs again at its next call.
    The packed layers take the packed tensor from the Parameter's `__dict__` (`_PACKED`), never through here."""

    @classmethod
    def holding(cls, packed: torch.Tensor, requires_grad: bool, *, where: str) -> ReleasedWeight:
        weight = cls(packed, requires_grad=requires_grad)
        weight.__dict__.update({_PACKED: packed, _WHERE: where})
        return weight

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA or (func == _SET_GRAD and args[1] is None):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        for weight in _released_in((args, kwargs)):
            _restore(weight, func)
        return func(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:   # nn.Parameter's own skip __torch_function__
        _restore(self, "copy.deepcopy")
        return self.__deepcopy__(memo)   # a plain Parameter's now

    def __reduce_ex__(self, protocol: Any) -> Any:
        _restore(self, "pickle")
        return self.__reduce_ex__(protocol)


def _released_in(value: Any) -> list[ReleasedWeight]:
    """The released weights among a torch function's arguments (lists of tensors included: `torch._foreach_*`)."""
    if isinstance(value, (list, tuple, dict)):
        return [w for item in (value.values() if isinstance(value, dict) else value) for w in _released_in(item)]
    return [value] if type(value) is ReleasedWeight else []


def _restore(weight: torch.Tensor, reason: Any = "restore_weights") -> None:
    """The released `weight` (a ReleasedWeight) back into its plain tensor: the same Parameter object, class
    nn.Parameter again, with the same values (`to_dense` is a pure reorder). `reason`: the function that needs
    it, named if it cannot be done."""
    with torch.inference_mode(False), torch._C.DisableTorchFunctionSubclass():
        plain = nn.Parameter(weight.detach().to_dense(), requires_grad=weight.requires_grad)
        try:
            _swap(weight, plain)
        except RuntimeError as error:   # a weak reference to it, or another tensor object on it, made since
            name = reason if isinstance(reason, str) else torch.overrides.resolve_name(reason) or repr(reason)
            raise UsageError(f"{name} needs the plain values of a weight packed in place, which cannot be turned back "
                             f"({error}); call latentdiff.layers.prepacked.restore_weights(module) first, or use "
                             "optimize_for_cpu(pipe, keep_weights=True)", where=weight.__dict__.get(_WHERE),
                             expected="a weight nothing else references", found="a ReleasedWeight") from None


def restore_weights(module: nn.Module) -> int:
    """Turn every released weight inside `module` (see `_Packed`) back into its plain tensor, the same Parameter
    object with the same values; the packed layers pack (and release) again on their next call. -> how many."""
    count = 0
    for layer in module.modules():
        weight = layer._parameters.get("weight")
        if type(weight) is ReleasedWeight:
            _restore(weight)
            count += 1
    return count


def _guard(layer: nn.Module) -> list[Any]:
    """What must see a released weight's values gets the plain one: state_dict (a dense copy, the weight stays
    released), load_state_dict and `_apply` (`.to()`, `.float()` ...: the weight is restored first). -> handles."""

    def save(destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        with torch._C.DisableTorchFunctionSubclass():   # the packed tensor as it is, not restored (ReleasedWeight)
            type(layer)._save_to_state_dict(layer, destination, prefix, keep_vars)
            key = prefix + "weight"
            if key in destination and destination[key].is_mkldnn:
                with torch.inference_mode(False), torch.no_grad():
                    destination[key] = destination[key].detach().to_dense()

    def apply(fn: Callable[..., Any], recurse: bool = True) -> nn.Module:
        restore_weights(layer)
        return type(layer)._apply(layer, fn, recurse)

    layer.__dict__.update(_apply=apply, _save_to_state_dict=save)
    return [layer.register_load_state_dict_pre_hook(lambda module, *args: restore_weights(module))]


def _unguard(layer: nn.Module, forward: Any) -> None:
    restore_weights(layer)
    for name in _GUARDS:
        layer.__dict__.pop(name, None)
    for handle in getattr(forward, "guards", ()):
        handle.remove()


_GUARDS = ("_apply", "_save_to_state_dict", "__deepcopy__")   # what a packed layer's __dict__ overrides


def copyable(layer: nn.Module) -> None:
    """Let `copy.deepcopy` copy a layer with a packed, fused or int8 forward (`_deepcopy`)."""
    layer.__dict__["__deepcopy__"] = functools.partial(_deepcopy, layer)


def _deepcopy(layer: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """copy.deepcopy of a layer with a packed (fused, int8) forward. Packed tensors have no storage to copy, so the
    layer is copied as the plain module (a released weight is turned back into the plain one first; the original
    packs again on its next call), and the copy gets a forward of its own, made the same way: it packs on its
    first call, and its int8 layers keep their calibrated ranges."""
    forward: Any = layer.__dict__.get("forward")
    saved: dict[str, Any] = {k: layer.__dict__.pop(k) for k in ("forward", *_GUARDS) if k in layer.__dict__}
    guards = getattr(forward, "guards", [])
    for handle in guards:
        handle.remove()
    restore_weights(layer)
    try:
        new = copy.deepcopy(layer, memo)
    finally:
        layer.__dict__.update(saved)
        if guards:
            forward.guards = _guard(layer)
    if forward is not None and hasattr(forward, "copy_for"):
        release = getattr(forward, "release", False)
        new.forward = _guarded(forward.copy_for(new), new, release)  # type: ignore[method-assign]
        copyable(new)
    return new


def _packed_call(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether a packed call may run: no gradient wanted (the packed ops have no backward), the input (and the
    residual of a fused sum) in the weight's dtype and on the CPU."""
    # (.get: another thread's call may turn it back meanwhile, for another input size)
    dtype = (weight.__dict__.get(_PACKED, weight) if type(weight) is ReleasedWeight else weight).dtype
    return (not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and x.dtype == dtype and x.device.type == "cpu"
            and (residual is None or residual.dtype == x.dtype))


def can_prepack_linear(module: nn.Module) -> bool:
    """An `nn.Linear` or a `GEGLU` whose weight oneDNN's packed GEMM reads: CPU, float32 or bfloat16."""
    weight = module.weight if type(module) is nn.Linear else getattr(getattr(module, "proj", None), "weight", None)
    return (type(module) in (nn.Linear, GEGLU) and isinstance(weight, torch.Tensor) and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available())


def prepack_linears(module: nn.Module, *, release: bool = False) -> int:
    """Give every CPU GEGLU inside `module` its fused forward and every other CPU Linear a packed one (see the
    module docstring); release: a Linear's packed copy replaces its plain weight (`_Packed`; not a GEGLU's,
    packed in two halves); -> how many modules."""
    count = 0
    geglu_projections = {id(m.proj) for m in module.modules() if type(m) is GEGLU}
    for layer in module.modules():
        if id(layer) in geglu_projections or is_prepacked(layer) or not can_prepack_linear(layer):
            continue
        if type(layer) is GEGLU:
            layer.forward = FusedGEGLUForward(layer)  # type: ignore[method-assign,arg-type]
        else:
            layer.forward = _guarded(PackedLinearForward(layer, release=release), layer, release)  # type: ignore
        copyable(layer)
        count += 1
    return count


def unpack_linears(module: nn.Module) -> int:
    """Back to the plain Linear and GEGLU forwards; -> how many."""
    count = 0
    for layer in module.modules():
        if type(layer) in (nn.Linear, GEGLU) and is_prepacked(layer) and not is_int8(layer):
            _unguard(layer, layer.__dict__.pop("forward"))
            count += 1
    return count


def prepack_convolutions(module: nn.Module, *, release: bool = False) -> int:
    """Give every CPU Conv2d inside `module` a prepacked forward (see the module docstring); release: its packed
    copy replaces the plain weight (`_Packed`); -> how many."""
    count = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and can_prepack(conv) and not is_prepacked(conv):
            conv.forward = _guarded(PackedForward(conv, release=release), conv, release)  # type: ignore
            copyable(conv)
            count += 1
    return count


def _guarded(forward: Any, layer: nn.Module, release: bool) -> Any:
    forward.guards = _guard(layer) if release else []
    return forward


def is_prepacked(conv: nn.Module) -> bool:
    return getattr(conv.__dict__.get("forward"), "latentdiff_prepacked", False)


def is_int8(layer: nn.Module) -> bool:
    """An int8 forward (layers.int8): quantization, which `unpack_*` leave to `int8.dequantize_layers`."""
    return getattr(layer.__dict__.get("forward"), "latentdiff_int8", False)


def unpack_convolutions(module: nn.Module) -> int:
    """Back to the plain Conv2d forward (the packed copies are freed); -> how many."""
    count = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and is_prepacked(conv) and not is_int8(conv):
            _unguard(conv, conv.__dict__.pop("forward"))
            count += 1
    return count


def packed_copies(module: nn.Module) -> list[torch.Tensor]:
    """The packed weight copies the prepacked layers inside `module` hold now (none before a first call)."""
    copies = []
    for layer in module.modules():
        forward = layer.__dict__.get("forward")
        if getattr(forward, "latentdiff_prepacked", False):
            caches = [v for v in vars(forward).values() if isinstance(v, _Packed)]
            copies += [c.packed for c in caches if c.packed is not None]
    return copies


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of `tensors` by their element counts (a packed copy's blocked layout may pad a little more)."""
    return sum(t.numel() * t.element_size() for t in tensors)
