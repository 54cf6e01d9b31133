"""The autograd switch of the pipelines' stage methods (`encode_prompt`, `prepare_latents`, `denoise`, `decode`,
`encode_image`, `sample`), and the options of their progress bars (`set_progress_bar_config`).

A stage called by hand runs without autograd by default, as `__call__` does: a graph through every UNet call of a
50-step run would hold every activation (2.4 GB instead of 0.3 GB for a tiny model at 256 px; an out-of-memory at
Stable Diffusion's size). `grad=True`, the same keyword on every stage, runs the stage as plain torch code (autograd
as the caller has it), for training uses:

    x_T = pipe.prepare_latents(1, 64, 64, generator=g)             # no graph
    z0 = pipe.denoise(x_T, cond, uncond, grad=True)                # a graph back to the UNet's weights
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ..diffusion.samplers.base import PROGRESS_BAR_OPTIONS

Method = TypeVar("Method", bound=Callable[..., Any])


def stage(method: Method) -> Method:
    """Run `method` under torch.no_grad() unless it is called with grad=True, its sampling loops' progress bars with
    the pipeline's `set_progress_bar_config` options. The method declares the keyword
    itself (`grad: bool = False`, so signatures and type checkers show it) and receives it, to pass it on to the
    stages it calls."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, grad: bool = False, **kwargs: Any) -> Any:
        if not isinstance(grad, bool):
            raise TypeError(f"{type(self).__name__}.{method.__name__}: grad must be True or False, "
                            f"found {type(grad).__name__}")
        options = PROGRESS_BAR_OPTIONS.set(getattr(self, "_progress_bar_config", {}))
        try:
            with contextlib.nullcontext() if grad else torch.no_grad():
                return method(self, *args, grad=grad, **kwargs)
        finally:
            PROGRESS_BAR_OPTIONS.reset(options)

    return run  # type: ignore[return-value]  # the same signature, grad included
