"""`latentdiff info` reports what this machine does with bf16 (read from the CPU's flags and tried), and the threads
torch will use, instead of a constant (issue 15)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from latentdiff.cli.info import cpu_bf16

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize("flags, expected", [
    ({"fpu", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "native (AMX-BF16, AVX512-BF16)"),
    ({"avx512f", "avx512_bf16"}, "native (AVX512-BF16)"),
    ({"fp", "asimd", "bf16"}, "native (Arm BF16)"),
    ({"avx2", "avx512f"}, "emulated"),        # AMD Zen 3, or an Intel without BF16: works, slower than fp32
    (None, "unknown"),
])
def test_bf16_support_follows_the_cpu_flags(flags, expected):
    assert cpu_bf16(flags).startswith(expected)


def test_info_reports_this_machine():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get(
        "PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "latentdiff", "info"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = {line.split(":", 1)[0]: line for line in out.stdout.splitlines()}
    assert "torch uses 1 threads" in lines["cpu"]
    assert lines["bf16 on cpu"].endswith("a bf16 matmul works")
    try:   # the flags as the test reads them itself
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(next(line for line in text.splitlines() if line.startswith(("flags", "Features"))).split(":")[1]
                .split())
    native = "amx_bf16" in flags or "avx512_bf16" in flags or "bf16" in flags
    assert ("native" in lines["bf16 on cpu"]) == native, (lines["bf16 on cpu"], sorted(flags & {"amx_bf16",
                                                                                              "avx512_bf16"}))
