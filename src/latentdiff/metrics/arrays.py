"""Reading .npy / .npz files without trusting their headers: every array's shape and dtype are read and checked
(against `max_bytes` and against the bytes the file really holds) before any array is allocated.

`np.load` allocates what a header claims: an .npy header saying (10^11,) float64 asks for 745 GiB from a
100-byte file, and a 2 MB .npz member deflates to gigabytes. Here an .npy array must fit in the file, and an
.npz member in its declared uncompressed size (zipfile never inflates past it), both at most `max_bytes`.
"""
from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import numpy as np
from numpy.lib import format as npy_format

from .. import limits
from ..errors import InputError

Headers = dict[str, tuple[tuple[int, ...], np.dtype]]   # array name -> (shape, dtype), read from the headers only


def read_header(f: IO[bytes], *, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the .npy array at f's position (the stream is left at its data)."""
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(f)
        else:
            shape, _, dtype = npy_format.read_array_header_2_0(f)
    except (ValueError, EOFError, SyntaxError, TypeError) as e:
        raise InputError(f"not a readable .npy array ({e})", where=where, expected="an .npy array header") from None
    if dtype.hasobject:
        raise InputError("not a readable array: it holds Python objects (pickles), which are never loaded", where=where,
                         expected="a numeric array", found=str(dtype))
    return tuple(shape), dtype


def _check_size(shape: tuple[int, ...], dtype: np.dtype, *, held: int, max_bytes: int, where: str) -> None:
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise InputError("the array is larger than latentdiff reads", where=where,
                         expected=f"at most {max_bytes} bytes (limits.MAX_ARRAY_BYTES)",
                         found=f"shape {shape} of {dtype} = {nbytes} bytes")
    if nbytes > held:
        raise InputError("the array's header claims more data than the file holds (truncated or forged)",
                         where=where, expected=f"at most {held} bytes of data", found=f"shape {shape} of {dtype} "
                         f"= {nbytes} bytes")


def read_headers(path: str | os.PathLike, *, max_bytes: int = limits.MAX_ARRAY_BYTES) -> Headers:
    """The (shape, dtype) of every array of an .npz (names without ".npy") or of an .npy (name "arr_0"),
    each checked to fit `max_bytes` and the file; nothing is allocated."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(6)
        f.seek(0)
        if magic == b"\x93NUMPY":
            shape, dtype = read_header(f, where=str(path))
            _check_size(shape, dtype, held=os.fstat(f.fileno()).st_size - f.tell(), max_bytes=max_bytes,
                        where=str(path))
            return {"arr_0": (shape, dtype)}
    if not zipfile.is_zipfile(path):
        raise InputError("not an .npz or .npy file", where=str(path), expected="a file written by numpy.savez",
                         found=f"starts with {magic!r}")
    headers: Headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                where = f"{path}: {info.filename}"
                if info.file_size > max_bytes:
                    raise InputError("an archive member inflates to more than latentdiff reads", where=where,
                                     expected=f"at most {max_bytes} bytes (limits.MAX_ARRAY_BYTES)",
                                     found=f"{info.file_size} bytes ({info.compress_size} compressed)")
                with archive.open(info) as member:
                    shape, dtype = read_header(member, where=where)
                    _check_size(shape, dtype, held=info.file_size - member.tell(), max_bytes=max_bytes, where=where)
                headers[info.filename.removesuffix(".npy")] = (shape, dtype)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
        raise InputError(f"not a readable .npz file ({type(e).__name__}: {e})", where=str(path)) from None
    return headers


def load_arrays(path: str | os.PathLike, *, max_bytes: int = limits.MAX_ARRAY_BYTES,
                check: Callable[[Headers], None] | None = None) -> Mapping[str, np.ndarray]:
    """The arrays of an .npz / .npy file, read only after `read_headers` (and `check(headers)`, which may refuse
    shapes the caller cannot use) passed. Nothing is unpickled."""
    headers = read_headers(path, max_bytes=max_bytes)
    if check is not None:
        check(headers)
    try:
        if not zipfile.is_zipfile(path):   # an .npy (read_headers checked the magic)
            return {"arr_0": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files if name in headers}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"not a readable .npz file ({type(e).__name__}: {e})", where=str(path)) from None
