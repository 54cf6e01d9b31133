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

`quantize(pipe, "int8-static")` runs the UNet's convolutions (kernels larger than 1 x 1) and linear layers on
int8 weights and int8 activations (`layers.int8`: per-channel weight scales, per-layer activation ranges observed
on calibration runs of the pipeline itself), in float32 or bfloat16, faster than bf16 on a CPU with int8 matrix
units (AMX-INT8, VNNI) and lossy (docs/fast.md "## CPU"). The weights stay the model's, so the pipeline can still
be saved; `dequantize(pipe)` goes back. An SDXL refiner is calibrated behind its base: `quantize(refiner,
"int8-static", calibration=refiner_calibration(base, switch=0.8))`.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError, UsageError
from ..layers.int8 import dequantize_layers, int8_candidates, is_int8, observe_input_ranges, quantize_layers
from ..layers.prepacked import prepack_convolutions, prepack_linears, unpack_convolutions, unpack_linears

QUANTIZATIONS = ("int8", "int8-static")

# What `quantize(pipe, "int8-static")` runs a text pipeline on to observe its activations when it is given no
# calibration: varied subjects, so every layer sees a typical range (CFG adds the empty prompt).
CALIBRATION_PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolor painting of a harbour at dawn",
                       "a close-up portrait of an old man, dramatic light", "a red circle on the left, blue background")


def _channels_last_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """forward pre-hook: the UNet's x_t (B, C, H, W) in channels-last order, which the packed convs keep."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:]), kwargs
    return None


def optimize_for_cpu(pipe: Any, *, channels_last: bool = True, keep_weights: bool = True) -> Any:
    """Prepack the convolutions of every CPU network of `pipe` and (channels_last) feed the UNet channels-last
    activations; -> pipe. Networks on another device are left alone; calling it again changes nothing.

    keep_weights=False: each packed weight takes its plain weight's place (`layers.prepacked._Packed`), so the
    weights are held once, as in eager (`latentdiff generate / serve --optimize-cpu` do this): state_dict, saving,
    load_state_dict, `.to()`, LoRA and `undo_cpu_optimization` see the plain values, and reading or changing a
    released weight (`weight.data.mul_()`, an optimizer step: `layers.prepacked.ReleasedWeight`) turns it back into
    the plain one first, repacked at the layer's next call. The default keeps the plain weights beside the packed
    copies (twice the weights' memory; in-place changes are repacked at the next call)."""
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


def quantize(pipe: Any, method: str = "int8", *, calibration: Sequence[str] | Callable[[Any], Any] | None = None,
             calibration_steps: int = 8, calibration_options: Mapping[str, Any] | None = None) -> Any:
    """Quantize the UNet in place (see the module docstring); -> pipe.

    "int8": dynamic int8 Linear layers; the UNet must be float32 on the CPU (torch's dynamic kernels take fp32).
    "int8-static": static int8 convolutions and Linear layers (float32 or bfloat16 UNet on the CPU), calibrated
    by running the pipeline: `calibration` is a list of prompts (default CALIBRATION_PROMPTS, text pipelines only)
    sampled for `calibration_steps` steps at the pipeline's default size, or a function that runs `pipe` as it
    will be used (any pipeline). `calibration_options`: more arguments of each prompt's call, the inputs the
    pipeline will be used with beside the prompt: a ControlNet's or T2I-Adapter's `control_image` (and its scales,
    `height` / `width` to fit it), an `ip_adapter_image`. Their residuals and tokens enter the UNet's layers, so
    a pipeline that will run with them is calibrated with them."""
    if method not in QUANTIZATIONS:
        raise InputError("unknown quantization", where="quantize", expected=list(QUANTIZATIONS), found=method)
    unet = pipe.unet
    if calibration_options is not None:
        _check_calibration_options(calibration_options, method, calibration)
    if method == "int8-static":
        return _quantize_static(pipe, calibration, calibration_steps, dict(calibration_options or {}))
    if unet.device.type != "cpu" or unet.dtype != torch.float32:
        raise InputError("int8 dynamic quantization needs a float32 UNet on the CPU", where="quantize",
                         expected="torch_dtype=torch.float32, device='cpu'", found=f"{unet.dtype} on {unet.device}")
    if any(is_int8(m) for m in unet.modules()):
        raise InputError("the UNet is already quantized with int8-static", where="quantize",
                         expected="dequantize(pipe) first", found="int8-static layers")
    from torch.ao.quantization import quantize_dynamic

    unpack_linears(unet)   # optimize_for_cpu's packed Linear / GEGLU forwards would outlive their Linear layers
    with warnings.catch_warnings():   # torch.ao.quantization's deprecation notice (CHANGELOG: why still this API)
        warnings.simplefilter("ignore")
        quantize_dynamic(unet, {nn.Linear}, dtype=torch.qint8, inplace=True)
    pipe.__dict__["quantization"] = method
    for name in ("save_pretrained", "save_single_file", "push_to_hub"):
        pipe.__dict__[name] = _refuse_save(name, method)
    return pipe


def _check_calibration_options(options: Any, method: str, calibration: Any) -> None:
    """calibration_options are keyword arguments of the calibration prompts' calls: a mapping, for int8-static."""
    if not isinstance(options, Mapping) or not all(isinstance(key, str) for key in options):
        raise InputError("calibration_options must map argument names to values", where="calibration_options",
                         expected="a dict such as {'control_image': hint}", found=type(options).__name__)
    if method != "int8-static" or callable(calibration):
        raise InputError("calibration_options are arguments of the calibration prompts' calls", where=(
            "calibration_options"), expected="method 'int8-static' with calibration prompts (or the default ones)",
            found=f"method {method!r}" if method != "int8-static" else "a calibration function")


def _quantize_static(pipe: Any, calibration: Sequence[str] | Callable[[Any], Any] | None, steps: int,
                     options: dict[str, Any]) -> Any:
    """quantize(pipe, "int8-static"): observe the UNet's layer inputs on calibration runs, then swap forwards."""
    unet = pipe.unet
    if unet.device.type != "cpu" or unet.dtype not in (torch.float32, torch.bfloat16):
        raise InputError("int8 static quantization needs a float32 or bfloat16 UNet on the CPU", where="quantize",
                         expected="torch_dtype=torch.float32 or torch.bfloat16, device='cpu'",
                         found=f"{unet.dtype} on {unet.device}")
    _check_steps(steps, name="calibration_steps", where="quantize")
    run = _calibration_run(pipe, calibration, steps, options)
    layers = {name: layer for name, layer in int8_candidates(unet).items() if not is_int8(layer)}
    with torch.no_grad(), observe_input_ranges(layers) as ranges:
        run(pipe)
    if not ranges:
        raise InputError("the calibration run never called the UNet's quantizable layers", where="calibration",
                         expected="a function that runs the pipeline", found=getattr(calibration, "__name__", None))
    quantize_layers(layers, ranges)
    pipe.__dict__["quantization"] = "int8-static"
    return pipe


def _calibration_run(pipe: Any, calibration: Sequence[str] | Callable[[Any], Any] | None, steps: int,
                     options: dict[str, Any]) -> Callable[[Any], Any]:
    """The function quantize(pipe, "int8-static") observes: the one given, or the pipeline on the prompts."""
    if callable(calibration):
        return calibration
    if getattr(pipe, "text_encoder", None) is None:
        raise InputError("a pipeline without a text encoder needs a calibration function", where="calibration",
                         expected="calibration=lambda pipe: pipe(...) (called as it will be used)",
                         found=type(pipe).__name__)
    prompts = _calibration_prompts(calibration)

    def sample(pipe: Any) -> None:   # one prompt at a time: the peak memory of one image, not of a batch
        for prompt in prompts:
            pipe(prompt, num_inference_steps=steps, output_type="latent", progress=False,
                 generator=torch.Generator().manual_seed(0), **options)
    return sample


def _check_steps(steps: Any, *, name: str, where: str) -> None:
    """A calibration's step count: a positive int (not a bool), else an InputError naming it."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"{name} must be a positive integer", where=where, expected=">= 1", found=steps)


def _calibration_prompts(calibration: Sequence[str] | None) -> list[str]:
    prompts = list(CALIBRATION_PROMPTS if calibration is None else calibration)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("calibration prompts must be a non-empty list of strings", where="calibration",
                         expected="list[str] or a function", found=calibration)
    return prompts


def refiner_calibration(base: Any, *, switch: float, prompts: Sequence[str] | None = None, steps: int = 8,
                        base_options: Mapping[str, Any] | None = None) -> Callable[[Any], None]:
    """The calibration of an SDXL refiner, for `quantize(refiner, "int8-static", calibration=...)`: each prompt
    (default CALIBRATION_PROMPTS) through `base` for the first `switch` of the noise schedule, then through the
    refiner from the base's latents (diffusers' ensemble of expert denoisers, as `latentdiff generate --refiner`
    runs them), `steps` steps at the base's default size, seed 0: the refiner's UNet is observed on the inputs
    it really sees (a refiner alone has no first text encoder for the default calibration, nor latents to start
    from). Quantize the base first, and its quantized latents are what the refiner is calibrated on.
    base_options: more arguments of the base's calls (its control hints and their size, as `quantize`'s
    calibration_options); the refiner takes the prompt alone, as `generate --refiner` runs it."""
    if isinstance(switch, bool) or not isinstance(switch, int | float) or not 0.0 < switch < 1.0:
        raise InputError("the refiner switch is a fraction of the schedule", where="switch",
                         expected="a number strictly between 0 and 1", found=switch)
    _check_steps(steps, name="steps", where="steps")
    texts = _calibration_prompts(prompts)
    options = dict(base_options or {})

    def sample(refiner: Any) -> None:   # one prompt at a time, as _calibration_run's
        for prompt in texts:
            latents = base(prompt, num_inference_steps=steps, denoising_end=switch, output_type="latent",
                           progress=False, generator=torch.Generator().manual_seed(0), **options).images
            refiner(prompt, image=latents, num_inference_steps=steps, denoising_start=switch, output_type="latent",
                    progress=False, generator=torch.Generator().manual_seed(0))
    return sample


def dequantize(pipe: Any) -> Any:
    """Undo quantize(pipe, "int8-static") (the float layers again); -> pipe. Dynamic "int8" replaced the Linear
    layers themselves and cannot be undone: load the pipeline again."""
    if getattr(pipe, "quantization", None) == "int8":
        raise UsageError("dynamic int8 quantization replaced the UNet's Linear layers", where="dequantize",
                         expected="a pipeline quantized with 'int8-static'", found="'int8'")
    dequantize_layers(pipe.unet)
    pipe.__dict__.pop("quantization", None)
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
