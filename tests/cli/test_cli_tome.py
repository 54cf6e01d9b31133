"""`latentdiff generate --tome RATIO --cfg-truncation F` (cli/generate_tome.py) on the tiny stand-in for the built-in
model: each flag gives the pixels of the Python API with the same setting, is recorded in the PNG and read back by
`--from`; a bad value is a one-line error before the model loads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff.cli import main
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.utils.images import read_png_params
from tests._support.cli import PROMPT, pixels
from tests._support.cli import generate_at_seed_0 as generate

pytestmark = pytest.mark.usefixtures("offline_builtin")
RUN = dict(num_inference_steps=4, guidance_scale=3.0, progress=False)


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
