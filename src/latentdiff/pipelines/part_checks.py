"""What a denoising pipeline checks about the parts and arguments it is given, before any work: `to()`'s device and
dtype told apart by kind, a sampler that is a latentdiff sampler (a diffusers scheduler named with the latentdiff
sampler of its class), and the conditioning a UNet's forward needs. `pipelines.denoising` re-exports them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..diffusion.scheduler_io import FOREIGN_CLASSES, NATIVE_CLASSES, matching_sampler
from ..errors import InputError, describe
from ..registry import SAMPLERS
from ..utils.devices import check_device


def device_and_dtype(device: Any = None, dtype: Any = None) -> tuple[Any, Any]:
    """The (torch.device | None, torch.dtype | None) of a `pipe.to(device, dtype)` call, its two values told apart
    by kind (a torch.dtype, else a device), so `to(torch.float16)` and `to(torch.float16, "cpu")` work as well; an
    InputError names the argument that is neither, a kind given twice, or a dtype weights cannot have."""
    found: dict[str, Any] = {}
    for argument, value in (("device", device), ("dtype", dtype)):
        if value is None:
            continue
        kind = "dtype" if isinstance(value, torch.dtype) else "device"
        if argument == "dtype" and kind == "device" and not isinstance(value, torch.device) and not (
                isinstance(value, str) and is_device_name(value)):
            raise InputError("dtype must be a floating-point torch.dtype", where="dtype",
                             expected="torch.float32, torch.float16 or torch.bfloat16", found=describe(value))
        if kind in found:
            raise InputError(f"to() got two values that are each a {kind}", where=f"to({argument}=...)",
                             expected=f"one {kind} (and one {'device' if kind == 'dtype' else 'dtype'})",
                             found=f"{found[kind]!r} and {value!r}")
        found[kind] = value
    dtype = found.get("dtype")
    if dtype is not None and not dtype.is_floating_point:
        raise InputError("dtype must be a floating-point torch.dtype", where="dtype",
                         expected="torch.float32, torch.float16 or torch.bfloat16", found=describe(dtype))
    return check_device(found.get("device")), dtype


def is_device_name(name: str) -> bool:
    """Whether torch reads `name` as a device ("cpu", "cuda:1" ...)."""
    try:
        torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def check_sampler_part(value: Any, *, where: str) -> Any:
    """`value` if it can be a pipeline's sampler (a latentdiff sampler, or a custom object with `init_noise_sigma`
    and `sample`: `SamplerProtocol`), else an InputError; for a diffusers scheduler, one naming the latentdiff
    sampler of its class and the `from_config` line that makes it."""
    name = type(value).__name__
    foreign = type(value).__module__.split(".")[0] == "diffusers" or name in NATIVE_CLASSES or name in FOREIGN_CLASSES
    if not foreign and callable(getattr(value, "sample", None)) and hasattr(value, "init_noise_sigma"):
        return value
    if not foreign:
        raise InputError(f"pipe.{where} must be a latentdiff sampler", where=where,
                         expected="a sampler such as DDIMSampler() or SAMPLERS.create(name)", found=describe(value))
    config = getattr(value, "config", None)
    match = matching_sampler(name, config if isinstance(config, Mapping) else None)
    if match is None:
        raise InputError(f"a diffusers {name} is not a latentdiff sampler, and latentdiff implements none for it",
                         where=where, expected=f"a latentdiff sampler: one of {SAMPLERS.names()}", found=name)
    raise InputError(f"a diffusers {name} is not a latentdiff sampler: its latentdiff sampler is {match.__name__}, "
                     f"e.g. pipe.{where} = {match.__name__}.from_config(pipe.{where}.config)", where=where,
                     expected=f"a latentdiff sampler ({match.__name__} for diffusers' {name})", found=name)


def unet_conditioning(unet: nn.Module) -> tuple[str, ...]:
    """The conditioning inputs a UNet's forward needs besides (x_t, t): "context" (it cross-attends), "class_labels"
    (a class embedding added to the time embedding)."""
    config = unet.config
    needs: tuple[str, ...] = ("context",) if getattr(config, "uses_context", False) else ()
    if getattr(config, "num_class_embeds", None) or getattr(config, "class_embed_type", None):
        needs += ("class_labels",)
    return needs
