"""`latentdiff generate`'s CPU fast paths (issue 20, docs/fast.md "## CPU"): prepacked weights and int8 UNets.

    latentdiff generate "a castle" --optimize-cpu                       # weights packed once for oneDNN
    latentdiff generate "a castle" --quantize int8-static               # int8 convolutions and linear layers
    latentdiff generate "a castle" --dtype float32 --quantize int8      # dynamic int8 linear layers (fp32 only)

`--quantize` changes pixels, so a PNG records it (`quantize`) and `--from` reads it back: int8-static calibrates
on `cpu_paths.CALIBRATION_PROMPTS` with a fixed seed, so the same model, version and machine give the same bytes
again. The shared part (QUANTIZATIONS, without torch; the quantizing and its one line) is `generation.quantize`.
It acts on the model's UNet and a `--refiner`'s (int8-static calibrates the refiner on the calibration prompts run
through the quantized base and the refiner, from the base's latents at the run's --refiner-switch: what it sees),
after `--optimize-cpu`, on the CPU only: on a GPU it is ignored with a warning and not recorded. `--optimize-cpu`
changes only speed (generate_inputs applies it).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from ..errors import LatentDiffError, UsageError
from ..generation.quantize import (
    QUANTIZATIONS,
    check_int8_dtype,
    on_cpu,
    quantize_refiner,
    quantize_unet,
)


def add_cpu_flags(gen: argparse.ArgumentParser) -> None:
    """The flags of this module, in one group of `latentdiff generate --help`."""
    group = gen.add_argument_group("CPU fast paths, ignored on a GPU (docs/fast.md CPU)")
    add = group.add_argument
    add("--optimize-cpu", action="store_true", default=False,
        help="weights packed once for oneDNN, feed-forward and residual sums fused (faster; weights held once, "
             "as in eager; the same image to rounding)")
    add("--quantize", default=None, choices=QUANTIZATIONS,
        help="the UNet in int8 (lossy, recorded): int8-static = calibrated int8 convolutions and linear "
             "layers (float32 or bfloat16); int8 = dynamic int8 linear layers (float32 only)")


def _origin(args: argparse.Namespace) -> str:
    return "--quantize" if getattr(args, "quantize", None) is not None else f"{args.from_png}: quantize"


def check_quantize_value(values: dict[str, Any], origin: dict[str, str]) -> None:
    """quantize (from the flag or a PNG) is one of QUANTIZATIONS, named by where it came from."""
    value = values.get("quantize")
    if value is not None and value not in QUANTIZATIONS:
        raise UsageError("bad value for quantize", where=origin.get("quantize", "quantize"),
                         expected=f"one of {', '.join(QUANTIZATIONS)}", found=repr(value)[:200])


def check_quantize(settings: Any, args: argparse.Namespace, device: Any) -> None:
    """Before the model loads (the dtype settled): dynamic int8 takes a float32 UNet (torch's kernels are fp32)."""
    if settings.quantize is None or not on_cpu(device):
        return
    check_int8_dtype(settings.quantize, settings.dtype, where=_origin(args),
                     found=f"--quantize int8 with dtype {settings.dtype}")


def apply_quantize(pipe: Any, settings: Any, args: argparse.Namespace, *, show: bool = True,
                   refiner: Any = None, control: dict[str, Any] | None = None) -> Any:
    """--quantize on the loaded pipeline's UNet (after --optimize-cpu), then on the SDXL `refiner`'s (int8-static:
    calibrated behind the quantized base, `quantize_refiner`), with one line on stderr each: what was quantized,
    how long calibration took; -> the settings, without quantize when it was ignored (off the CPU). control: the
    run's control arguments (`generate_control.control_options`: ControlNet / T2I-Adapter hints, an IP-Adapter
    image), which int8-static's calibration calls take, at the run's size (the hints are made for it)."""
    method = settings.quantize
    if method is None:
        return settings
    if pipe.device.type != "cpu":
        print(f"latentdiff: warning: --quantize {method} is for the CPU; ignored on {pipe.device.type} (not "
              "recorded)", file=sys.stderr)
        return dataclasses.replace(settings, quantize=None)
    try:
        options = dict(control, height=settings.height, width=settings.width) if control else None
        done = [quantize_unet(pipe, method, options=options)]
        if refiner is not None:
            done.append("refiner: " + quantize_refiner(refiner, method, base=pipe, switch=settings.refiner_switch,
                                                       base_options=options))
    except LatentDiffError as error:    # a pipeline the default calibration cannot run, or a UNet not on the CPU
        raise UsageError(f"cannot quantize this run's UNet: {error.message}", where=_origin(args),
                         expected=error.expected, found=error.found) from None
    if show:
        for line in done:
            print(f"latentdiff: --quantize {method}: {line}", file=sys.stderr)
    return settings
