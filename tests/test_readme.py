"""The README's Python examples run (on a tiny local model standing in for the Hub id, at a tiny size)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests._support.sd import tiny_diffusers_pipeline

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    ref = tiny_diffusers_pipeline(tmp_path)
    ref.save_pretrained(tmp_path / "sd")
    code = python_blocks()[index]
    assert HUB_ID in code or "from latentdiff" in code
    code = code.replace(HUB_ID, str(tmp_path / "sd"))
    code = re.sub(r"\b512\b", "32", code)                       # tiny model, tiny images
    code = re.sub(r"num_inference_steps=\d+", "num_inference_steps=2", code)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md block {index}", "exec"), {})
    assert (tmp_path / "church.png").exists() or (tmp_path / "my-model" / "model_index.json").exists()
