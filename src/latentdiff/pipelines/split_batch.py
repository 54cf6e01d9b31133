"""A CPU UNet call on a batch, split across threads: each part of the batch runs its own forward on its own
thread, with its share of torch's threads (what `optimize_for_cpu(pipe, split_batch=True)` installs).

Why: with classifier-free guidance every step is one UNet call on a batch of two (unconditional, conditional).
torch splits each op across the cores and the cores meet again at the op's end; the ops that do not split well
(norms, element-wise ops, the small GEMMs of the deep levels, the Python between ops) keep the second core
waiting. Two halves of the batch, each on one thread, run side by side with no meeting point until the end of the
call (measured: benchmarks/RESULTS.md "Batch halves on threads").

Each part's output is that part's own batch-1 (or batch-n) forward, so the result equals the per-sample calls; it
differs from the whole-batch call only by the GEMMs' blocking (float rounding). The call runs whole (not split)
where a split would change what is computed or is not safe: with gradients, under autocast, under
`torch.compile`, with DeepCache's per-call state (`cache=`), with token merging (its random picks are drawn per
call), with keywords the split does not know, on one thread or a batch of one.
"""
from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch
from torch import nn

from ..layers.attention import BasicTransformerBlock
from ..models.residuals import Residuals

KNOWN_KEYWORDS = frozenset({"context", "class_labels", "added_cond", "residuals", "freeu"})


class SplitBatchForward:
    """A UNet's forward (held in its `__dict__`, as `acceleration.CompiledForward`) that runs the parts of a batch
    on threads (module docstring). `parts`: None, one part per thread up to the batch size."""

    def __init__(self, unet: nn.Module, *, parts: int | None = None):
        self.unet, self.parts = unet, parts
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._lock = threading.Lock()
        self._blocks: list[BasicTransformerBlock] | None = None   # found on first use (a UNet being deep-copied
        # has no modules yet when its forward is copied)

    def __deepcopy__(self, memo: dict[int, Any]) -> SplitBatchForward:
        """A copied UNet gets a forward of its own (no shared pool; the copy's own blocks, found on first use)."""
        copied = memo.get(id(self.unet))
        return SplitBatchForward(copied if copied is not None else self.unet, parts=self.parts)

    def __getstate__(self) -> dict[str, Any]:
        return {"unet": self.unet, "parts": self.parts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["unet"], parts=state["parts"])  # type: ignore[misc]

    def __call__(self, x: torch.Tensor, t: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        forward = type(self.unet).forward
        threads = torch.get_num_threads()
        parts = self.part_count(x, args, kwargs, threads)
        if parts < 2:
            return forward(self.unet, x, t, *args, **kwargs)
        batch = x.shape[0]
        calls = [_part_arguments(i, parts, batch, x, t, args, kwargs) for i in range(parts)]
        share = max(1, threads // parts)
        inference, pool = torch.is_inference_mode_enabled(), self._executor(parts - 1)
        futures: list[Future] = [pool.submit(_run_part, forward, self.unet, share, inference, *call)
                                 for call in calls[1:]]
        try:
            torch.set_num_threads(share)
            first = forward(self.unet, *calls[0][0], **calls[0][1])
        finally:
            torch.set_num_threads(threads)
            wait(futures)   # never leave a part running, whichever part failed
        return torch.cat([first, *(f.result() for f in futures)])

    def part_count(self, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any], threads: int) -> int:
        """How many parts this call runs in: 1 (whole) wherever the module docstring says the split does not
        apply."""
        if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu" and x.shape[0] > 1):
            return 1
        if threads < 2 or len(args) > 2 or set(kwargs) - KNOWN_KEYWORDS or torch.is_grad_enabled():
            return 1
        if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
            return 1
        if self._blocks is None:
            self._blocks = [m for m in self.unet.modules() if isinstance(m, BasicTransformerBlock)]
        if any(block.token_merging is not None for block in self._blocks):
            return 1
        return min(x.shape[0], threads, self.parts or threads)

    def _executor(self, workers: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pool_size < workers:
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="latentdiff-split")
                self._pool_size = workers
            return self._pool


def _run_part(forward: Any, unet: nn.Module, threads: int, inference: bool, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> torch.Tensor:
    """One part's forward on a worker thread: its thread count and the caller's inference mode (both are
    per-thread state); gradients are off (the split only runs without them)."""
    torch.set_num_threads(threads)
    with torch.inference_mode(inference), torch.no_grad():
        return forward(unet, *args, **kwargs)


def _part_arguments(index: int, parts: int, batch: int, x: torch.Tensor, t: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The (args, kwargs) of part `index` of `parts`: every per-sample tensor (first dimension = batch) cut to
    the part's rows, the rest (a shared t, FreeU's factors) passed as they are."""
    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.tensor_split(parts)[index] if value.dim() > 0 and value.shape[0] == batch else value
        if isinstance(value, Residuals):
            return dataclasses.replace(value, down=cut(value.down), mid=cut(value.mid),
                                       intrablock=cut(value.intrablock))
        if isinstance(value, tuple | list):
            return type(value)(cut(v) for v in value)
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    return (cut(x), cut(t), *(cut(a) for a in args)), {k: v if k == "freeu" else cut(v) for k, v in kwargs.items()}


def install(unet: nn.Module, *, parts: int | None = None) -> bool:
    """Give `unet` the split forward (module docstring); -> whether it was installed. A UNet with a forward of
    its own already (compiled, offloaded) is left alone."""
    forward = unet.__dict__.get("forward")
    if forward is None:
        unet.forward = SplitBatchForward(unet, parts=parts)  # type: ignore[method-assign]
    return isinstance(unet.__dict__["forward"], SplitBatchForward) if "forward" in unet.__dict__ else False


def uninstall(unet: nn.Module) -> None:
    """The UNet's own forward again (a forward set since, compiled or offloaded, is left alone)."""
    if isinstance(unet.__dict__.get("forward"), SplitBatchForward):
        del unet.__dict__["forward"]
