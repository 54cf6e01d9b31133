"""A safetensors file's header, checked in full before the safetensors library reads the file: its length, its
JSON structure (`name -> {dtype, shape, data_offsets}`, `__metadata__` text -> text) and that the data it
describes lies within the file (a truncated file is an error naming it, never a crash)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError

SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # a sane header is far smaller


def check_safetensors_header(path: Path) -> dict[str, Any]:
    """Validate the header and the data length before any tensor is read: catches truncated files."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError("not a safetensors file (shorter than its 8-byte header length)",
                                      where=str(path), found=f"{size} bytes")
            n = int.from_bytes(raw, "little")
            if n > min(SAFETENSORS_HEADER_LIMIT, size - 8):
                raise CheckpointError("not a safetensors file, or truncated (header length past the end)",
                                      where=str(path), expected=f"header of at most {size - 8} bytes",
                                      found=f"{n} bytes")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError("checkpoint file not found", where=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError("not a safetensors file (header is not JSON)", where=str(path)) from None
    end = check_header_structure(header, where=str(path))
    if 8 + n + end > size:
        raise CheckpointError("truncated safetensors file", where=str(path), expected=f"{8 + n + end} bytes",
                              found=f"{size} bytes")
    return header


def check_header_structure(header: Any, *, where: str) -> int:
    """A safetensors header's structure, fully, before the library (or anything) reads it: a dict of
    name -> {dtype: str, shape: [int >= 0, ...], data_offsets: [begin, end] ordered ints}, and `__metadata__`
    a dict of str -> str. -> the end of the data the entries claim (the caller checks it against the file)."""
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors header: not a JSON object", where=where,
                              expected="a JSON object of tensor name -> {dtype, shape, data_offsets}",
                              found=type(header).__name__)
    end = 0
    for name, entry in header.items():
        key = f"{where}: header[{name!r}]"
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError("corrupt safetensors header: __metadata__ must map text to text", where=key,
                                      expected="a JSON object of str -> str", found=_describe_json(entry))
            continue
        if not isinstance(entry, dict):
            raise CheckpointError("corrupt safetensors header: a tensor entry is not an object", where=key,
                                  expected="{dtype, shape, data_offsets}", found=_describe_json(entry))
        missing = sorted({"dtype", "shape", "data_offsets"} - set(entry))
        if missing:
            raise CheckpointError("corrupt safetensors header: a tensor entry lacks keys", where=key,
                                  expected="dtype, shape, data_offsets", found=f"missing {', '.join(missing)}")
        if not isinstance(entry["dtype"], str):
            raise CheckpointError("corrupt safetensors header: dtype is not a name", where=f"{key}.dtype",
                                  expected="a dtype name such as F32", found=_describe_json(entry["dtype"]))
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError("corrupt safetensors header: shape is not a list of sizes", where=f"{key}.shape",
                                  expected="a list of ints >= 0", found=_describe_json(shape))
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError("corrupt safetensors header: data_offsets is not an ordered pair",
                                  where=f"{key}.data_offsets", expected="[begin, end] with 0 <= begin <= end",
                                  found=_describe_json(offsets))
        end = max(end, offsets[1])
    return end


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe_json(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    if isinstance(value, list):
        text = f"list {json.dumps(value)[:60]}"
    return text if len(text) <= 80 else text[:77] + "..."
