"""`torch_dtype="auto"`: the fastest precision whose image error latentdiff has measured and bounds.

On a CPU, bfloat16 is only fast where the cores multiply bf16 matrices natively (AMX-BF16 tiles or the
AVX512-BF16 dot products); elsewhere oneDNN emulates it and bf16 runs slower than float32, so "auto" picks bf16
on such CPUs only. bf16 keeps 8 bits of mantissa: the images move, and "auto" takes bf16 only where the
measured bf16-vs-fp32 image error of the model's family (`BF16_IMAGE_ERROR`, docs/fast.md "## CPU") is within
`BF16_ERROR_BOUND`. On CUDA: bf16 where the GPU supports it (no fp16 overflow to guard against), else fp16.
Every answer comes with its reason, which `latentdiff generate` prints.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

# Mean |bf16 image - fp32 image| over pixels in [0, 1], same seeds and sampler, measured on this library's
# models (docs/fast.md "## CPU" has the script and the p99 / max). A family not listed gets the worst one.
BF16_IMAGE_ERROR: dict[str, float] = {
    "latentdiff/shapes-64": 0.0011,       # 4 prompts, DDIM 50 steps, guidance 1.5: checker scores identical
    "stable-diffusion": 0.0021,           # tiny random-weight SD folder (tests/_support/sd.py), DDIM 20, cfg 7.5
}
BF16_ERROR_BOUND = 0.01   # 1% of the pixel range (2.6 levels of 255), mean over the image

# The x86 CPU flags of native bf16 matrix arithmetic (/proc/cpuinfo names).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# "0": treat this CPU as one without native bf16, "1": as one with it; unset or else: detect.
BF16_ENV = "LATENTDIFF_CPU_BF16"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's flags in /proc/cpuinfo; empty where there is none (macOS, Windows)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_native_bf16(flags: Callable[[], set[str]] = cpu_flags) -> str | None:
    """The CPU feature that makes bf16 fast here ("amx_bf16" or "avx512_bf16"), or None; `BF16_ENV` overrides.

    torch 2.13 exposes no `_is_amx_tile_supported`; `get_cpu_capability()` says "AVX512" on Sapphire Rapids and on
    Skylake alike, so the flags come from /proc/cpuinfo; oneDNN must also have a bf16 path
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported`)."""
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("0", "1"):   # the user's word over the detection (the test suite sets 0: same images anywhere)
        return f"{BF16_ENV}=1" if forced == "1" else None
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    found = flags()
    return next((flag for flag in BF16_CPU_FLAGS if flag in found), None)


def family_of(model: str | None) -> str:
    """The `BF16_IMAGE_ERROR` key for a model id or path: the built-in by its id, any other as the worst case."""
    if model in BF16_IMAGE_ERROR:
        return str(model)
    return max(BF16_IMAGE_ERROR, key=BF16_IMAGE_ERROR.__getitem__)


def resolve_torch_dtype(torch_dtype: Any, *, device: Any = None, model: str | None = None,
                        native_bf16: Callable[[], str | None] | None = None) -> tuple[torch.dtype | None, str]:
    """(the dtype to load with, why). A torch dtype or None passes through; "auto" is decided here.

    device: where the weights go (None: the CPU); model: its id or path, for the measured bf16 error;
    native_bf16: the CPU check (default `cpu_native_bf16`, looked up at call time so tests can replace it)."""
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return torch_dtype, "as given"
    if torch_dtype != "auto":
        raise InputError("not a torch dtype", where="torch_dtype",
                         expected='a torch.dtype, None or "auto"', found=repr(torch_dtype))
    kind = torch.device(device).type if device is not None else "cpu"
    family = family_of(model)
    error = BF16_IMAGE_ERROR[family]
    if error > BF16_ERROR_BOUND:
        return torch.float32, (f"float32: the measured bf16 image error of {family} ({error:.4f}) exceeds "
                               f"the bound {BF16_ERROR_BOUND}")
    if kind == "cpu":
        feature = (native_bf16 or cpu_native_bf16)()
        if feature is None:
            return torch.float32, "float32: this CPU has no native bf16 matrix unit (AMX-BF16 / AVX512-BF16)"
        return torch.bfloat16, (f"bfloat16: the CPU has {feature}, and the measured bf16 image error of {family} "
                                f"({error:.4f}) is within {BF16_ERROR_BOUND}")
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"bfloat16: the GPU supports it (image error of {family} {error:.4f})"
        return torch.float16, "float16: the GPU has no bf16"
    return torch.float32, f"float32: no measured low-precision path for {kind}"
