"""`--quantize` as `latentdiff generate` and `latentdiff serve` both apply it (docs/fast.md "## CPU"): the UNet of a
loaded CPU pipeline quantized by `cpu_paths.quantize`, and one line saying what was quantized and how long the
calibration took (the command prints it, the server logs it).
"""
from __future__ import annotations

import time
from typing import Any

from ..errors import UsageError

# pipelines.cpu_paths.QUANTIZATIONS, without torch (the command line starts without it; a test keeps them equal)
QUANTIZATIONS = ("int8", "int8-static")


def on_cpu(device: Any) -> bool:
    """Whether the run's device (None: as load_pipeline chooses, cuda if there is one) is the CPU."""
    if device is not None:
        return bool(device.type == "cpu")
    import torch  # here: the command line starts without torch

    return not torch.cuda.is_available()


def check_int8_dtype(method: str | None, dtype: str, *, where: str, found: str) -> None:
    """Dynamic int8 takes a float32 UNet (torch's dynamic kernels are fp32): a UsageError before anything loads."""
    if method == "int8" and dtype != "float32":
        raise UsageError("int8 dynamic quantization needs a float32 model", where=where,
                         expected="--dtype float32, or --quantize int8-static (float32 or bfloat16)", found=found)


def check_static_calibration(method: str | None, *, control: str | None, where: str, model: str | None = None) -> None:
    """For `latentdiff serve`: int8-static calibrates each model's UNet when it loads, on prompts alone, and requests
    may bring control inputs later (`control`: the flag that lets them, None: none) whose residuals meet
    activations the calibration never saw. A UsageError naming the flags and the `model` before anything loads.
    (`latentdiff generate` has its control images before it quantizes: it calibrates with them, `quantize_unet`.)"""
    if method == "int8-static" and control is not None:
        unet = "each model's UNet" if model is None else f"the UNet of {model}"
        raise UsageError(f"int8-static calibrates {unet} when it loads, on prompts alone, and never sees the "
                         "control images requests bring later", where=where,
                         expected=f"--quantize int8 (with --dtype float32), no --quantize, or no {control}",
                         found=f"--quantize int8-static with {control}")


def quantize_unet(pipe: Any, method: str, *, options: dict[str, Any] | None = None) -> str:
    """`cpu_paths.quantize(pipe, method)` on a CPU pipeline; -> what it did, for one line of output. options: the
    run's control inputs (hints, their size, an IP-Adapter image), which int8-static's calibration calls take
    (`calibration_options`). Its errors (InputError: a dtype or a pipeline the default calibration cannot run)
    are the caller's to name."""
    from ..pipelines import cpu_paths  # here: the command line starts without torch

    start = time.perf_counter()
    if options and method == "int8-static":
        cpu_paths.quantize(pipe, method, calibration_options=options)
    else:
        cpu_paths.quantize(pipe, method)
    calibrated_on = "prompts with the run's control images" if options else "prompts"
    return _done(pipe, method, time.perf_counter() - start, "the UNet", calibrated_on)


def quantize_refiner(refiner: Any, method: str, *, base: Any, switch: float,
                     base_options: dict[str, Any] | None = None) -> str:
    """--quantize on an SDXL refiner's UNet (after the base's): dynamic int8 as the base's; int8-static calibrated
    on what the refiner sees in the run, the calibration prompts through the (quantized) `base` up to `switch`
    (with `base_options`, its control inputs) and the refiner from the base's latents
    (`cpu_paths.refiner_calibration`); -> what it did, for one line."""
    from ..pipelines import cpu_paths  # here: the command line starts without torch

    start = time.perf_counter()
    if method == "int8-static":
        run = cpu_paths.refiner_calibration(base, switch=switch, base_options=base_options)
        cpu_paths.quantize(refiner, method, calibration=run)
    else:
        cpu_paths.quantize(refiner, method)
    return _done(refiner, method, time.perf_counter() - start, "the refiner's UNet",
                 "prompts through the base and the refiner")


def _done(pipe: Any, method: str, seconds: float, what: str, calibrated_on: str) -> str:
    from ..layers.prepacked import is_int8
    from ..pipelines import cpu_paths

    if method == "int8":
        return f"{cpu_paths.quantized_linears(pipe.unet)} linear layers of {what} in int8 (dynamic: no calibration)"
    layers = sum(is_int8(m) for m in pipe.unet.modules())
    return (f"{layers} convolutions and linear layers of {what} in int8, calibrated in {seconds:.1f} s "
            f"({len(cpu_paths.CALIBRATION_PROMPTS)} {calibrated_on})")
