"""Warnings in the command line's one-line format (`latentdiff: warning: ...`), not Python's with a file path and a
source line (issue 15); `--debug` keeps Python's own format."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
LONG = "a red circle on the left, blue background " * 8


@pytest.mark.parametrize("debug", [False, True])
def test_an_over_length_prompt_warns_in_one_line(tmp_path, debug):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "latentdiff", *(["--debug"] if debug else []), "generate", LONG, "--steps", "2",
            "-o", str(tmp_path / "w.png")]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "truncated" in line]
    assert len(lines) == 1, done.stderr[-2000:]
    if debug:
        assert "UserWarning" in lines[0] and ".py:" in lines[0]
    else:
        assert lines[0].startswith("latentdiff: warning: prompt truncated") and ".py:" not in done.stderr
