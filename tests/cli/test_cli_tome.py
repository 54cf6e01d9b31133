"""`latentdiff generate --tome RATIO --cfg-truncation F` (cli/generate_tome.py) on the tiny stand-in for the built-in
model: each flag gives the pixels of the Python API with the same setting, is recorded in the PNG and read back by
`--from`; a bad value is a one-line error before the model loads."""
from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.cli import main
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.utils.images import read_png_params
from tests._support.tiny_builtin import make_tiny_shapes_model, use_as_builtin

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle on the left, blue background"
RUN = dict(num_inference_steps=4, guidance_scale=3.0, progress=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_shapes_model(tmp_path_factory.mktemp("builtin") / "shapes-64")


@pytest.fixture(autouse=True)
def offline_builtin(monkeypatch, tmp_path, model):
    use_as_builtin(monkeypatch, model, "latentdiff/shapes-64")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)


def generate(*argv) -> int:
    return main(["generate", *map(str, argv), "--seed", "0"])


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_tome_and_cfg_truncation_flags_are_the_api(model):
    assert generate(PROMPT, "--tome", 0.5, "--cfg-truncation", 0.5, "-o", "a.png") == 0
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    pipe.enable_tome(0.5)
    expected = pipe(PROMPT, generator=[torch.Generator().manual_seed(0)], cfg_truncation=0.5, **RUN).images[0]
    assert np.array_equal(pixels("a.png"), np.asarray(expected))
    params = read_png_params("a.png")
    assert (params["tome"], params["cfg_truncation"]) == (0.5, 0.5)
    assert main(["generate", "--from", "a.png", "-o", "again.png"]) == 0
    assert np.array_equal(pixels("again.png"), pixels("a.png"))
    assert generate(PROMPT, "-o", "plain.png") == 0
    assert "tome" not in read_png_params("plain.png") and not np.array_equal(pixels("plain.png"), pixels("a.png"))


@pytest.mark.parametrize("flag, value", [("--tome", 1.0), ("--tome", -0.5), ("--cfg-truncation", 1.5)])
def test_bad_values_are_refused_before_loading(flag, value, capsys):
    assert generate(PROMPT, flag, value, "-o", "x.png") != 0
    assert flag in capsys.readouterr().err and not Path("x.png").exists()
