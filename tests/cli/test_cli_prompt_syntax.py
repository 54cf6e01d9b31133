"""`latentdiff generate --prompt-syntax a1111|plain` (issue 16, cli/generate_prompts.py) on the tiny Stable Diffusion
folder: the pixels of the Python API with the same prompt_syntax, recorded in the PNG and read back by `--from`;
a bad value is a one-line error naming the flag."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdiff.cli import main
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.utils.images import read_png_params
from tests._support.cli import pixels
from tests._support.sd import tiny_diffusers_pipeline

PROMPT = "a (photo:1.3) of a [cat:dog:0.5]"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, diffusers):
    root = tmp_path_factory.mktemp("cli_prompts")
    tiny_diffusers_pipeline(root / "build").save_pretrained(root / "sd")
    return root / "sd"


def generate(*argv) -> int:
    return main(["generate", *map(str, argv), "--seed", "0"])


def test_prompt_syntax_flag_is_the_api_recorded_and_reproduced(sd_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipe = LatentDiffusionPipeline.from_pretrained(sd_folder)
    run = ["--model", sd_folder, "--height", 32, "--width", 32, "--steps", 2]
    assert generate(PROMPT, *run, "-o", "a1111.png") == 0
    assert generate(PROMPT, *run, "--prompt-syntax", "plain", "-o", "plain.png") == 0
    for name, syntax in (("a1111.png", "a1111"), ("plain.png", "plain")):
        expected = pipe(PROMPT, height=32, width=32, num_inference_steps=2, prompt_syntax=syntax, progress=False,
                        generator=[torch.Generator().manual_seed(0)]).images
        assert np.array_equal(pixels(name), np.asarray(expected[0])), name
    assert not np.array_equal(pixels("a1111.png"), pixels("plain.png"))
    assert read_png_params("plain.png")["prompt_syntax"] == "plain"
    assert "prompt_syntax" not in read_png_params("a1111.png")          # the default: recorded only when set
    assert generate("--from", "plain.png", "-o", "again.png") == 0
    assert np.array_equal(pixels("again.png"), pixels("plain.png"))


def test_bad_prompt_syntax_is_a_usage_error(sd_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert generate("a cat", "--model", sd_folder, "--prompt-syntax", "comfy", "-o", "x.png") == 2
    err = capsys.readouterr().err
    assert "--prompt-syntax" in err and "comfy" in err and "a1111" in err
