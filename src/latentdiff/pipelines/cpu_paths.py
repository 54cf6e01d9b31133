"""Faster sampling on a CPU: prepacked convolutions with channels-last activations, and int8 Linear weights.

`optimize_for_cpu(pipe)` packs every convolution weight of the pipeline's networks once into oneDNN's blocked
layout (`layers.prepacked`) and hands the UNet its input in channels-last memory order, which the packed
convolutions keep from layer to layer: the same convolutions, computed without re-laying out each weight on
every call (fp32 outputs equal to rounding; bf16 ones as close to fp32 as eager bf16). `undo_cpu_optimization`
goes back.

`quantize(pipe, "int8")` replaces the UNet's `nn.Linear` layers (attention projections, feed-forwards) by
dynamically quantized ones (int8 weights per tensor, activations quantized per call): faster than fp32 on a CPU
without bf16 matrix units, slower than bf16 on one with them, and lossy (docs/fast.md "## CPU" has the error and
the speed). A quantized pipeline refuses to be saved: its weights are no longer the model's.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..errors import InputError, UsageError
from ..layers.prepacked import prepack_convolutions, prepack_linears, unpack_convolutions, unpack_linears

QUANTIZATIONS = ("int8",)


def _channels_last_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """forward pre-hook: the UNet's x_t (B, C, H, W) in channels-last order, which the packed convs keep."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:]), kwargs
    return None


def optimize_for_cpu(pipe: Any, *, channels_last: bool = True, keep_weights: bool = False) -> Any:
    """Prepack the convolutions of every CPU network of `pipe` and (channels_last) feed the UNet channels-last
    activations; -> pipe. Networks on another device are left alone; calling it again changes nothing.

    Each packed weight takes its plain weight's place (`layers.prepacked._Packed`), so the weights are held
    once, as in eager: state_dict, saving, load_state_dict, `.to()`, LoRA and `undo_cpu_optimization` see the
    plain values; reading a packed layer's `.weight` values directly raises (`restore_weights` first).
    keep_weights: keep the plain weights as well (twice the weights' memory)."""
    for network in pipe.networks():
        prepack_convolutions(network, release=not keep_weights)
        prepack_linears(network, release=not keep_weights)
    unet = pipe.unet
    if channels_last and unet.device.type == "cpu" and "_latentdiff_channels_last" not in unet.__dict__:
        unet.__dict__["_latentdiff_channels_last"] = unet.register_forward_pre_hook(_channels_last_input,
                                                                                   with_kwargs=True)
    return pipe


def undo_cpu_optimization(pipe: Any) -> Any:
    """The plain convolutions and the UNet's own input layout again; -> pipe."""
    for network in pipe.networks():
        unpack_convolutions(network)
        unpack_linears(network)
    handle = pipe.unet.__dict__.pop("_latentdiff_channels_last", None)
    if handle is not None:
        handle.remove()
    return pipe


def quantize(pipe: Any, method: str = "int8") -> Any:
    """Quantize the UNet's Linear layers in place (see the module docstring); -> pipe. The UNet must be float32
    on the CPU (dynamic int8 kernels are CPU-only and take fp32 activations)."""
    if method not in QUANTIZATIONS:
        raise InputError("unknown quantization", where="quantize", expected=list(QUANTIZATIONS), found=method)
    unet = pipe.unet
    if unet.device.type != "cpu" or unet.dtype != torch.float32:
        raise InputError("int8 dynamic quantization needs a float32 UNet on the CPU", where="quantize",
                         expected="torch_dtype=torch.float32, device='cpu'", found=f"{unet.dtype} on {unet.device}")
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():   # torch.ao.quantization's deprecation notice (CHANGELOG: why still this API)
        warnings.simplefilter("ignore")
        quantize_dynamic(unet, {nn.Linear}, dtype=torch.qint8, inplace=True)
    pipe.__dict__["quantization"] = method
    for name in ("save_pretrained", "save_single_file", "push_to_hub"):
        pipe.__dict__[name] = _refuse_save(name, method)
    return pipe


def quantized_linears(module: nn.Module) -> int:
    """How many dynamically quantized Linear layers `module` holds."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return sum(isinstance(m, DynamicLinear) for m in module.modules())


def _refuse_save(name: str, method: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise UsageError(f"a pipeline quantized to {method} cannot be saved: its weights are not the model's",
                         where=name, expected="the pipeline as loaded (quantize after saving, or load again)",
                         found=f"quantize({method!r}) applied")
    return refuse
