"""The one check of a `device=` argument: a torch device name that exists on this machine, else an InputError
naming the argument (torch itself fails late, with a bare AssertionError "Torch not compiled with CUDA enabled"
or a RuntimeError, after the weights are read)."""
from __future__ import annotations

from typing import Any

from ..errors import InputError

EXAMPLES = '"cpu", "cuda", "cuda:1", "mps"'


def check_device(device: Any, *, where: str = "device") -> Any:
    """`device` (str, torch.device or a CUDA index) as a torch.device that exists here; None stays None."""
    if device is None:
        return None
    import torch

    try:
        found = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError("not a torch device", where=where, expected=f"a device name, e.g. {EXAMPLES}",
                         found=repr(device)) from None
    if not is_available(found):
        raise InputError(f"the {found.type} device is not available on this machine", where=where,
                         expected=f"a device torch sees here ({', '.join(available_devices())})", found=str(found))
    return found


def is_available(device: Any) -> bool:
    import torch

    if device.type in ("cpu", "meta"):
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
    if device.type == "mps":
        return bool(torch.backends.mps.is_available())
    backend = getattr(torch, device.type, None)  # xpu, npu ...: their own is_available when torch has one
    check = getattr(backend, "is_available", None)
    return bool(check()) if callable(check) else True


def available_devices() -> list[str]:
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names
