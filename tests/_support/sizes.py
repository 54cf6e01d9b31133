"""Helpers of the size cases (tests/adversarial/test_sizes.py): several inputs checked in ONE bounded subprocess
(a torch import costs seconds), each input's outcome read back on its own, and the hostile files they read."""
from __future__ import annotations

import json
import shutil
import struct
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

from tests._support.bounded import run_bounded

_CASE_RUNNER = """
import json as _json, time as _time, traceback as _tb
_results = {{}}
{setup}
for _name, _code in {cases!r}.items():
    _t = _time.perf_counter()
    try:
        exec(compile(_code, "<case " + _name + ">", "exec"), dict(globals()))
        _out = dict(raised=None, module=None, message=None)
    except BaseException as _e:
        _out = dict(raised=type(_e).__name__, module=type(_e).__module__, message=str(_e)[:2000],
                    traceback=_tb.format_exc()[-3000:])
    _out["seconds"] = _time.perf_counter() - _t
    _results[_name] = _out
print("@@CASES@@" + _json.dumps(_results))
"""


@dataclass
class Case:
    raised: str | None
    module: str | None
    message: str | None
    seconds: float
    peak_rss_mb: float        # of the whole group's process: an upper bound of this case's
    traceback: str | None = None

    @property
    def is_latentdiff_error(self) -> bool:
        return self.module == "latentdiff.errors"


def run_cases(cases: dict[str, str], *, setup: str = "", timeout_s: float = 120,
              address_space_gb: float = 8) -> dict[str, Case]:
    """Run each snippet of `cases` (after `setup`, once) in one bounded subprocess; -> name -> Case."""
    code = _CASE_RUNNER.format(setup=textwrap.dedent(setup),
                               cases={k: textwrap.dedent(v) for k, v in cases.items()})
    run = run_bounded(code, timeout_s=timeout_s, address_space_gb=address_space_gb)
    if run.raised is not None:
        raise AssertionError(f"the case group itself failed: {run.raised}: {run.message}\n{run.traceback}")
    marker = run.stdout.rfind("@@CASES@@")
    results = json.loads(run.stdout[marker + len("@@CASES@@"):].splitlines()[0])
    return {name: Case(r["raised"], r["module"], r["message"], r["seconds"], run.peak_rss_mb, r.get("traceback"))
            for name, r in results.items()}


def assert_refused(case: Case, *, error: str, names: tuple[str, ...], rss_mb: float = 1500,
                   seconds: float = 10) -> None:
    """A latentdiff `error` whose message names every string of `names` (key, bound, value), within the
    memory and time bounds."""
    assert case.raised == error and case.is_latentdiff_error, (case.raised, case.message, case.traceback)
    for name in names:
        assert name in case.message, (name, case.message)
    assert case.peak_rss_mb < rss_mb, f"peak RSS {case.peak_rss_mb:.0f} MB"
    assert case.seconds < seconds, f"took {case.seconds:.1f} s"


# ---- hostile files ---------------------------------------------------------------------------------------------
def nested_json(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def nested_yaml(depth: int) -> str:
    return "[" * depth + "]" * depth


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (and no pixel data): what a decompression bomb shows PIL."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def npy_claiming(path: Path, shape: tuple[int, ...]) -> Path:
    """An .npy file whose header claims `shape` float64 and that holds 64 bytes of data."""
    from numpy.lib import format as npy_format

    with open(path, "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": shape})
        f.write(b"\0" * 64)
    return path


def npz_deflate_bomb(path: Path, side: int = 17_000) -> Path:
    """A ~2 MB .npz whose `sigma` (side x side float64: 2.3 GB for 17,000) is zeros that deflate 1000:1.

    Written without compressing 2.3 GB: after a full flush a deflate stream restarts on a byte boundary with no
    back-references, so the compressed bytes of one 16 MB block of zeros can be repeated."""
    import io

    from numpy.lib import format as npy_format

    def member(name: str, header: bytes, zeros: int) -> tuple[bytes, bytes]:
        block = 1 << 24
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        head = deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH)
        full = deflate.compress(b"\0" * block) + deflate.flush(zlib.Z_FULL_FLUSH)
        tail = deflate.compress(b"\0" * (zeros % block)) + deflate.flush()
        data = head + full * (zeros // block) + tail
        crc = crc32_zeros(zeros, start=zlib.crc32(header))
        size = len(header) + zeros
        fields = (20, 0, 8, 0, 0x21, crc, len(data), size, len(name))
        local = struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, 0) + name.encode()
        return local + data, struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, *fields, 0, 0, 0, 0, 0, 0)

    def npy_header(shape: tuple[int, ...]) -> bytes:
        buffer = io.BytesIO()
        npy_format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": shape})
        return buffer.getvalue()

    parts = [("sigma.npy", npy_header((side, side)), side * side * 8), ("mu.npy", npy_header((side,)), side * 8)]
    body, directory = b"", b""
    for name, header, zeros in parts:
        local, central = member(name, header, zeros)
        directory += central[:-4] + struct.pack("<I", len(body)) + name.encode()
        body += local
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(parts), len(parts), len(directory), len(body), 0)
    path.write_bytes(body + directory + end)
    return path


def _gf2_times(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, row) for row in matrix]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc32(A), crc32(B) and len(B): zeros are appended to A by squaring the GF(2)
    operator of one zero bit (the method of zlib's crc32_combine)."""
    odd = [0xEDB88320] + [1 << n for n in range(31)]   # one zero bit
    odd = _gf2_square(_gf2_square(odd))                  # four zero bits
    while len2:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
    return crc1 ^ crc2


def crc32_zeros(n: int, *, start: int = 0) -> int:
    """crc32(data + n zero bytes) from crc32(data) = start, in O(log n) (checksumming 2.3 GB takes seconds)."""
    length, zeros, out = 1, zlib.crc32(b"\0"), start
    while n:
        if n & 1:
            out = crc32_combine(out, zeros, length)
        zeros = crc32_combine(zeros, zeros, length)
        length *= 2
        n >>= 1
    return out


def copy_builtin(dest: Path, *, settings: dict | None = None) -> Path:
    """A copy of the built-in shapes-64 folder (its weights hard-linked where possible), with `settings` as its
    latentdiff_generate.json (a new file: the hard-linked original is never written)."""
    from latentdiff.builtin import GENERATE_SETTINGS, builtin_path

    src = builtin_path("latentdiff/shapes-64")
    assert src is not None

    def link(a: str, b: str) -> None:
        try:
            Path(b).hardlink_to(a)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dest, copy_function=link)
    if settings is not None:
        (dest / GENERATE_SETTINGS).unlink()
        (dest / GENERATE_SETTINGS).write_text(json.dumps(settings))
    return dest
