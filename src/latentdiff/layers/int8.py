"""Static int8 convolutions and linear layers on the CPU, with activation ranges calibrated on the model's own
inputs (W8A8: what OpenVINO's and TensorRT's int8 paths run).

Weights: int8, symmetric, one scale per output channel (max |w| / 127), quantized from the layer's own weight on
first use and again whenever it changes (version, storage, dtype, device: never stale, like `layers.prepacked`).
Activations: uint8, one scale and zero point per layer, from the [min, max] range of the layer's inputs seen on
calibration runs (`observe_input_ranges`); values outside that range are clipped. oneDNN's int8 kernels (AMX-INT8
or VNNI) accumulate in int32 and write the dequantized result in the input's dtype (float32 or bfloat16), so the
layer is a drop-in: `int8(x) == conv(dq(q(x)), dq(q(w)))` up to float rounding, where q/dq are the quantizers
above (the tests check exactly that, against `F.conv2d` / `F.linear` on the fake-quantized operands).

Where it pays: the int8 kernel reads half the weight bytes of bf16 and runs twice the MACs per cycle, but each
call first quantizes its input (one read, one write of the activation). So a layer runs int8 only where the
weight dominates (measured, benchmarks/RESULTS.md "int8-static"): convolutions with a kernel larger than 1 x 1, and
linear layers with at most `INT8_MAX_ROWS` rows (tokens x batch) when the input is bfloat16; elsewhere it runs
its float forward (packed where `layers.prepacked` can pack it). The input quantizer is one fused loop compiled
by inductor (`torch.compile`, once per process and cached on disk) where a C++ compiler is present; torch's eager
ops otherwise (the same uint8 values, about 3x slower).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .attention import GEGLU
from .prepacked import (
    PackedForward,
    PackedLinearForward,
    _Packed,
    can_prepack,
    can_prepack_linear,
    copyable,
    is_int8,
    restore_weights,
)

# Rows (tokens x batch) above which a bf16 linear layer stays bf16: there the input's quantization pass costs as
# much as the int8 GEMM saves (per layer, 1 thread, AMX: 2048 x 320 -> 320: bf16 0.40 ms, int8 0.35 + 0.2 ms to
# quantize; 128 x 5120 -> 1280: 2.0 vs 1.1 + 0.2 ms). On the SD 1.5 UNet, int8 linear layers at every length made
# the step slower, at <= 256 rows (its deepest levels) no slower (benchmarks/int8_unet.py, RESULTS.md "int8-static").
INT8_MAX_ROWS = 256
INT8_MIN_CHANNELS = 32   # narrower layers (a UNet's conv_in / conv_out) stay float: little time, much error


def input_qparams(low: float, high: float) -> tuple[float, int]:
    """The uint8 (scale, zero point) of an activation range; the range always holds 0 (zero padding is exact)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = max(high - low, 1e-8) / 255
    return scale, min(255, max(0, round(-low / scale)))


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, ...) float weight -> (int8 weight, float32 scale per output channel): symmetric, max |w| -> 127."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=tuple(range(1, w.dim()))).clamp_min(1e-12) / 127
    q = torch.round(w / scales.view(-1, *(1,) * (w.dim() - 1))).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_eager(x: torch.Tensor, inv_scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """x (float32 or bfloat16) -> uint8 clamp(round(x / scale) + zero_point), in x's memory format."""
    return torch.clamp(torch.round(x.float() * inv_scale) + zero_point, 0, 255).to(torch.uint8)


_quantizer: list[Callable[..., torch.Tensor]] = []


def quantize_input(x: torch.Tensor, inv_scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """`quantize_eager`, as one compiled loop where inductor can compile it. The compiled function only ever sees
    a dense float32 or bfloat16 vector over x's storage (no view, so no guard on a base tensor), tensor scales,
    in inference mode: two graphs (one per dtype) serve every layer, shape and memory format."""
    dense = x if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()
    if not _quantizer:
        _quantizer.append(torch.compile(quantize_eager, dynamic=True, fullgraph=True))
    try:
        with torch.inference_mode():   # one kind of tensor in, inference mode or not
            flat = torch.empty(0, dtype=dense.dtype).set_(dense.untyped_storage(), dense.storage_offset(),
                                                          (dense.numel(),), (1,))
            q = _quantizer[0](flat, inv_scale, zero_point)
    except Exception as error:   # no C++ compiler, or inductor unavailable: eager ops from now on
        if _quantizer[0] is quantize_eager:
            raise
        warnings.warn(f"int8: the compiled input quantizer failed ({type(error).__name__}); using eager ops",
                      RuntimeWarning, stacklevel=2)
        _quantizer[0] = quantize_eager
        return quantize_eager(x, inv_scale, zero_point)
    return q.as_strided(dense.shape, dense.stride())


class _Int8Forward:
    """What the int8 conv and linear forwards share: the input's quantization parameters and the call test."""

    latentdiff_prepacked = True   # prepack_* leave the layer alone
    latentdiff_int8 = True

    def __init__(self, layer: nn.Module, input_range: tuple[float, float]):
        self.layer: Any = layer
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self.scale, self.zero_point = input_qparams(*self.input_range)
        self.inv_scale_t = torch.tensor(1 / self.scale)
        self.zero_point_t = torch.tensor(float(self.zero_point))
        self.packed = _Packed(self._pack)
        self.previous = layer.__dict__.get("forward")   # a packed forward, restored by dequantize_layers
        self.float_path: Any = None                     # the packed float forward for shapes int8 does not pay
        self.float_bias: tuple[tuple[Any, ...], torch.Tensor] | None = None   # (the bias's key, its fp32 copy)

    def _pack(self, w: torch.Tensor, *size: Any) -> Any:
        raise NotImplementedError

    def copy_for(self, layer: nn.Module) -> Any:
        """The same int8 forward (same calibrated range) for a copy of the layer (`prepacked._deepcopy`)."""
        return type(self)(layer, self.input_range)

    def _int8_call(self, x: torch.Tensor) -> bool:
        """No gradient wanted (the int8 ops have no backward), a float32 / bfloat16 input on the CPU."""
        weight = self.layer.weight
        return (not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
                and x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu")

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_input(x, self.inv_scale_t, self.zero_point_t)

    def _bias(self) -> torch.Tensor | None:
        """The bias in float32 (oneDNN's int8 kernels take an fp32 bias), converted once and again whenever the
        bias changes: in place (its version), swapped (its storage), or to another dtype or device, as
        `prepacked._Packed` keys a weight. An inference tensor has no version counter: the rest still tells."""
        bias = self.layer.bias
        if bias is None:
            return None
        key = (None if bias.is_inference() else bias._version, bias.data_ptr(), bias.dtype, bias.device)
        cached = self.float_bias    # one read: another thread may replace it (both copies are right)
        if cached is None or cached[0] != key:
            cached = self.float_bias = (key, bias.detach().float())
        return cached[1]

    def _float(self, x: torch.Tensor) -> bool:
        """Whether x runs the float path (a shape where int8 does not pay)."""
        raise NotImplementedError

    def run(self, x: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.run(x)
        return type(self.layer).forward(self.layer, x) if out is None else out   # nn.Conv2d / nn.Linear's own

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
        """layer(x) + residual fused where the float path runs; None otherwise (layers.fused then adds)."""
        return self.float_path.add(x, residual) if self._float(x) else None


class Int8ConvForward(_Int8Forward):
    """The replacement `forward` of one Conv2d: oneDNN's int8 convolution (see the module docstring). Outputs too
    small to pay for it in bf16 (`PackedForward`'s im2col-GEMM shapes) run the packed bf16 convolution."""

    def __init__(self, conv: nn.Conv2d, input_range: tuple[float, float]):
        super().__init__(conv, input_range)
        self.float_path = PackedForward(conv) if can_prepack(conv) else None

    def _pack(self, w: torch.Tensor, *size: Any) -> Any:
        conv: Any = self.layer
        q, scales = quantize_weight(w)
        packed = torch.ops.onednn.qconv_prepack(q, scales, self.scale, self.zero_point, list(conv.stride),
                                                list(conv.padding), list(conv.dilation), conv.groups, list(size[0]))
        return packed, scales, torch.zeros(scales.shape, dtype=torch.long)

    def _float(self, x: torch.Tensor) -> bool:
        return (self.float_path is not None and x.dtype == torch.bfloat16 and x.dim() == 4
                and self.float_path._as_gemm(x.shape))

    def run(self, x: torch.Tensor) -> torch.Tensor | None:
        """The int8 convolution of x (in x's dtype); None where it cannot run."""
        if self._float(x):
            return self.float_path.run(x)
        if not self._int8_call(x) or x.dim() != 4:
            return None
        conv: Any = self.layer
        packed, scales, zero_points = self.packed.get(conv.weight, x.shape)
        return torch.ops.onednn.qconv2d_pointwise(
            self._quantized(x), self.scale, self.zero_point, packed, scales, zero_points, self._bias(),
            list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups, 1.0, 0, x.dtype, "none", [], "")


class Int8LinearForward(_Int8Forward):
    """The replacement `forward` of one Linear: oneDNN's int8 GEMM for inputs of at most `INT8_MAX_ROWS` rows
    (any number in float32); the float forward (packed where possible) for longer bf16 inputs."""

    def __init__(self, linear: nn.Linear, input_range: tuple[float, float]):
        super().__init__(linear, input_range)
        self.float_path = PackedLinearForward(linear) if can_prepack_linear(linear) else None

    def _pack(self, w: torch.Tensor, *size: Any) -> Any:
        q, scales = quantize_weight(w)
        return torch.ops.onednn.qlinear_prepack(q, None), scales, torch.zeros(scales.shape, dtype=torch.long)

    def _float(self, x: torch.Tensor) -> bool:
        rows = x.numel() // max(x.shape[-1], 1)
        return self.float_path is not None and x.dtype == torch.bfloat16 and rows > INT8_MAX_ROWS

    def run(self, x: torch.Tensor) -> torch.Tensor | None:
        """The int8 GEMM of x (in x's dtype); None where it cannot run."""
        if self._float(x):
            return self.float_path.run(x)
        if not self._int8_call(x):
            return None
        packed, scales, zero_points = self.packed.get(self.layer.weight)
        rows = self._quantized(x.reshape(-1, x.shape[-1]))
        out = torch.ops.onednn.qlinear_pointwise(rows, self.scale, self.zero_point, packed, scales, zero_points,
                                                 self._bias(), 1.0, 0, x.dtype, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


def int8_candidates(module: nn.Module) -> dict[str, nn.Module]:
    """The layers of `module` the int8 path quantizes, by name: CPU Conv2d with a kernel larger than 1 x 1 and
    every CPU Linear, at least `INT8_MIN_CHANNELS` wide on both sides (GEGLU projections stay in their fused
    float GEMMs)."""
    geglu_projections = {id(m.proj) for m in module.modules() if type(m) is GEGLU}
    chosen: dict[str, nn.Module] = {}
    for name, layer in module.named_modules():
        if type(layer) is nn.Conv2d:
            wide = min(layer.in_channels, layer.out_channels) >= INT8_MIN_CHANNELS
            if wide and layer.kernel_size != (1, 1) and layer.padding_mode == "zeros" and _on_cpu(layer):
                chosen[name] = layer
        elif type(layer) is nn.Linear and id(layer) not in geglu_projections and _on_cpu(layer) and min(
                layer.in_features, layer.out_features) >= INT8_MIN_CHANNELS:
            chosen[name] = layer
    return chosen


def _on_cpu(layer: nn.Module) -> bool:
    return layer.weight.device.type == "cpu" and layer.weight.dtype in (torch.float32, torch.bfloat16)


@contextmanager
def observe_input_ranges(layers: Mapping[str, nn.Module]) -> Iterator[dict[str, tuple[float, float]]]:
    """Within the block, record the [min, max] of each layer's input over every call (forward pre-hooks); the
    yielded dict fills as the model runs. The hooks are removed on exit."""
    ranges: dict[str, tuple[float, float]] = {}

    def observer(name: str) -> Callable[..., None]:
        def observe(module: nn.Module, args: tuple[Any, ...]) -> None:
            low, high = (float(v) for v in torch.aminmax(args[0].detach().float()))
            old = ranges.get(name, (low, high))
            ranges[name] = (min(old[0], low), max(old[1], high))
        return observe

    handles = [layer.register_forward_pre_hook(observer(name)) for name, layer in layers.items()]
    try:
        yield ranges
    finally:
        for handle in handles:
            handle.remove()


def quantize_layers(layers: Mapping[str, nn.Module], ranges: Mapping[str, tuple[float, float]]) -> int:
    """Give each layer with an observed range its int8 forward; -> how many. A weight `optimize_for_cpu` packed
    in place (`prepacked._Packed`, released) is turned back into the plain one first: the int8 copy is made from
    it, and the float path beside it packs a copy of its own."""
    count = 0
    for name, layer in layers.items():
        if name in ranges:
            restore_weights(layer)
            forward = (Int8ConvForward(layer, ranges[name]) if type(layer) is nn.Conv2d  # type: ignore[arg-type]
                       else Int8LinearForward(layer, ranges[name]))  # type: ignore[arg-type]
            layer.forward = forward  # type: ignore[method-assign,assignment]
            copyable(layer)
            count += 1
    return count


def dequantize_layers(module: nn.Module) -> int:
    """Back to the float forwards each layer had before (plain or packed; the weights were never changed);
    -> how many layers."""
    count = 0
    for layer in module.modules():
        if is_int8(layer):
            previous = layer.__dict__.pop("forward").previous
            if previous is not None:
                layer.forward = previous
            count += 1
    return count
