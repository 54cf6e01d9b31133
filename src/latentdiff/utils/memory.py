"""Give back the resident pages of memory-mapped weights that a pipeline stage no longer needs.

Weights read from .safetensors are memory-mapped (hub.load_safetensors): a page becomes resident when a
forward pass first touches it and then stays counted in the process's RSS, though the kernel could re-read
it from the file at any time. A text-to-image call needs the text encoder only at the start and the UNet
only until the decode, so after each stage its pages can be dropped with madvise(MADV_DONTNEED); the next
call faults them back in from the page cache (what that costs is in benchmarks/RESULTS.md).

This is only safe for pages that still hold the file's bytes. The mappings are private (copy-on-write):
a weight changed in place (fine-tuning, load_state_dict into the mapped tensors) lives in anonymous pages
that MADV_DONTNEED would silently throw away, bringing the file's old values back. So every span is checked
in /proc/self/pagemap first: a storage with any present page that is no longer file-backed is left alone.
Weights that were cast, moved to another device or created in memory are not in a file mapping: untouched.
Linux only; elsewhere every function here returns 0 and does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
from collections.abc import Iterable, Iterator

import numpy as np
import torch

MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE
# /proc/self/pagemap bits: page present; swapped out; file-backed (or shared anonymous)
PM_PRESENT, PM_SWAPPED, PM_FILE = 1 << 63, 1 << 62, 1 << 61
_LIBC = None


def release_mapped(tensors: torch.nn.Module | Iterable[torch.Tensor]) -> int:
    """Drop the resident pages of every tensor (or every parameter/buffer of a module) that lies in an
    unmodified private mapping of a .safetensors file. Returns the bytes released (0 off Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    if isinstance(tensors, torch.nn.Module):
        # parameters and buffers, not state_dict(): that would hand a released packed weight (layers.prepacked)
        # over as a fresh dense copy
        tensors = [*tensors.parameters(), *tensors.buffers()]
    spans = _storage_spans(tensors)
    if not spans:
        return 0
    files = _safetensors_mappings()
    released = 0
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for start, end in spans:
            if any(lo <= start and end <= hi for lo, hi in files) and _unmodified(pagemap, start, end):
                released += _madvise(start, end)
    return released


def _storage_spans(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """Page-aligned [start, end) of each distinct CPU storage (a storage shared by tied weights once), rounded
    inwards: the pages only this storage occupies, so that a neighbour modified in place does not matter."""
    spans = set()
    for tensor in tensors:
        if (not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or tensor.is_meta
                or tensor.is_mkldnn):   # a packed weight (layers.prepacked): in no file, and without a storage
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:
            continue
        lo = -(-storage.data_ptr() // PAGE) * PAGE
        hi = (storage.data_ptr() + storage.nbytes()) // PAGE * PAGE
        if hi > lo:
            spans.add((lo, hi))
    return sorted(spans)


def _safetensors_mappings() -> list[tuple[int, int]]:
    """Address ranges of private, read-only-or-cow file mappings of .safetensors files (/proc/self/maps)."""
    found = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n").endswith(".safetensors") and fields[1].endswith("p"):
                    lo, hi = (int(v, 16) for v in fields[0].split("-"))
                    found.append((lo, hi))
    except OSError:
        return []
    return found


def _unmodified(pagemap, start: int, end: int) -> bool:
    """True when no page of [start, end) is an anonymous (copy-on-written) page, present or swapped out: a
    file page is never swapped (it is dropped and re-read), so a swapped page in a file mapping was written."""
    try:
        pagemap.seek(start // PAGE * 8)
        raw = pagemap.read((end - start) // PAGE * 8)
    except OSError:
        return False
    if len(raw) != (end - start) // PAGE * 8:
        return False
    entries = np.frombuffer(raw, dtype="<u8")
    anonymous = (entries & np.uint64(PM_PRESENT) != 0) & (entries & np.uint64(PM_FILE) == 0)
    return not bool(np.any(anonymous | (entries & np.uint64(PM_SWAPPED) != 0)))


def _madvise(start: int, end: int) -> int:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return end - start if _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0 else 0


@contextlib.contextmanager
def released_after_each_block(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, each top-level block of `model` (a child, or each entry of a child ModuleList: a UNet's
    down, mid and up blocks) releases its mapped weights right after its forward. The resident weights of a
    forward are then one block's, not the model's, at the cost of reading every weight back from the page cache
    at every call (a few per cent of denoising time on the CPU: benchmarks/RESULTS.md). Forward hooks: not under
    torch.compile (a compiled forward would trace them)."""
    blocks = [block for child in model.children()
              for block in (child if isinstance(child, torch.nn.ModuleList) else (child,))]

    def release_after(module: torch.nn.Module, args: object, output: object) -> None:
        release_mapped(module)  # returns None: a forward hook's return value would replace the block's output

    handles = [block.register_forward_hook(release_after) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
