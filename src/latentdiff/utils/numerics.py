"""Non-finite numbers never pass silently: the checks that turn NaN / Inf into a `NumericalError`.

A NaN weight, a NaN latent or prompt embedding, an fp16 overflow or an infinite guidance scale would otherwise
return a black or NaN image without a word. Each check is one reduction (`torch.isfinite(x).all()`), made once
per stage, never per sampling step (on CUDA a check is a host sync):

    check_finite_input(latents, argument="latents")              # the call's tensors, before any work
    check_finite_output(z0, stage="denoising", step=N, steps=N, dtype=unet.dtype)   # once, after the loop
    check_finite_weights(unet, part="unet", source=folder)       # opt-in at load: names the first bad key

`non_finite_hint` is the likely cause and the fix the error carries (`hint`; `latentdiff generate` prints it).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import NumericalError

HALF_DTYPES = (torch.float16,)   # fp16 overflows past 65504; bfloat16 has fp32's range
WEIGHTS_HINT = "NaN/Inf weights: load with check_finite_weights=True to name the part and the first bad tensor"


def is_finite(x: torch.Tensor) -> bool:
    """Whether every value of x is finite: one reduction and one host read (integer tensors always are)."""
    if not (x.is_floating_point() or x.is_complex()) or x.numel() == 0:
        return True
    return bool(torch.isfinite(x).all())


def non_finite_hint(dtype: torch.dtype | None, *, stage: str) -> str:
    """The likely causes of NaN/Inf at `stage` for networks of `dtype`, most likely first."""
    causes = []
    if dtype in HALF_DTYPES:
        causes.append("fp16 overflow: load with torch_dtype=torch.bfloat16 or torch.float32")
    causes.append(WEIGHTS_HINT)
    if stage == "denoising":
        causes.append("an extreme guidance_scale, or latents / prompt_embeds too large")
    return "; ".join(causes)


def check_finite_input(x: Any, *, argument: str) -> None:
    """A NumericalError naming `argument` if the tensor x holds NaN or Inf (non-tensors are left to the type
    checks)."""
    if isinstance(x, torch.Tensor) and not is_finite(x):
        raise NumericalError(f"the input {argument} holds NaN or Inf values", stage="input", where=argument,
                             expected="finite values", found=_count(x),
                             hint=f"pass finite {argument} (check the code that made them)")


def check_finite_output(x: torch.Tensor, *, stage: str, dtype: torch.dtype | None = None, step: int | None = None,
                        steps: int | None = None, where: str | None = None) -> torch.Tensor:
    """x itself, or a NumericalError naming `stage` (and the sampling step reached, `step` of `steps`) and the
    likely causes, if x holds NaN or Inf. `dtype`: the networks' (fp16 adds the overflow cause)."""
    if is_finite(x):
        return x
    at = f" after step {step} of {steps}" if step is not None and steps is not None else ""
    raise NumericalError(f"{stage} produced NaN or Inf values{at}", stage=stage, step=step, where=where,
                         expected="finite values", found=_count(x), hint=non_finite_hint(dtype, stage=stage))


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding NaN or Inf, else None (one reduction per tensor)."""
    for name, tensor in tensors:
        if not is_finite(tensor):
            return name
    return None


def check_finite_weights(module: torch.nn.Module, *, part: str, source: str | None = None) -> None:
    """Scan every parameter and buffer of `module` once; a NumericalError naming the part, the first key holding
    NaN or Inf and the file it came from (the opt-in `check_finite_weights=True` of the loaders)."""
    state = module.state_dict(keep_vars=True)
    key = first_non_finite((name, t.detach()) for name, t in state.items() if isinstance(t, torch.Tensor))
    if key is not None:
        where = f"{source}: {part}.{key}" if source else f"{part}.{key}"
        raise NumericalError(f"the {part} weights hold NaN or Inf values", stage="load", where=where,
                             expected="finite weights", found=_count(state[key].detach()),
                             hint="the file is damaged or was saved after training diverged: download or convert "
                                  "it again, or use an earlier checkpoint")


def _count(x: torch.Tensor) -> str:
    """'3 NaN and 1 Inf of 1024 values' (a second reduction, only on the error path)."""
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    return f"{nan} NaN and {inf} Inf of {x.numel()} values"
