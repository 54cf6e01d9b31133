"""`latentdiff generate --lora FILE[:W]` (issue 16, cli/generate_adapters.py) on the tiny Stable Diffusion: the
pixels of the Python API with the same adapters and weights, recorded in the PNG as path + weight + sha256, and
`--from` reproduces; a missing file or a bad weight is a one-line error naming the flag."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.utils.images import read_image_params, read_png_params
from tests._support.cli import generate, pixels
from tests._support.lora import kohya, targets
from tests._support.sd import tiny_diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle"


@pytest.fixture
def setup(tmp_path, diffusers, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_diffusers_pipeline(tmp_path / "build").save_pretrained(tmp_path / "sd")
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "sd")
    found = targets(pipe.unet, pipe.text_encoder.model)
    save_file(kohya(found, seed=1), tmp_path / "one.safetensors")
    save_file(kohya(found, seed=2), tmp_path / "two.safetensors")
    return tmp_path, pipe


def test_lora_flags_match_the_api_and_from_reproduces(setup, capsys):
    root, pipe = setup
    run = ["--model", root / "sd", "--height", 32, "--width", 32, "--steps", 2, "--seed", 0]
    assert generate(PROMPT, *run, "--lora", "one.safetensors:0.8", "--lora", root / "two.safetensors",
                    "-o", "a.png") == 0
    pipe.load_lora_weights(root / "one.safetensors")
    pipe.load_lora_weights(root / "two.safetensors")
    pipe.set_adapters(["one", "two"], adapter_weights=[0.8, 1.0])
    expected = pipe(PROMPT, height=32, width=32, num_inference_steps=2,
                    generator=[torch.Generator().manual_seed(0)], progress=False).images[0]
    assert np.array_equal(pixels("a.png"), np.asarray(expected))
    recorded = read_png_params("a.png")["lora"]
    assert [(r["path"], r["weight"]) for r in recorded] == [(str(root / "one.safetensors"), 0.8),
                                                            (str(root / "two.safetensors"), 1.0)]
    assert all(len(r["sha256"]) == 64 for r in recorded)
    infotext = read_image_params("a.png")[1]     # A1111's text: tags in the prompt, "Lora hashes"
    assert infotext.startswith(f"{PROMPT} <lora:one:0.8> <lora:two:1>\n")
    assert f'Lora hashes: "one: {recorded[0]["sha256"][:12]}, two: {recorded[1]["sha256"][:12]}"' in infotext
    assert generate("--from", "a.png", "-o", "b.png") == 0
    assert np.array_equal(pixels("b.png"), pixels("a.png"))
    capsys.readouterr()
    assert generate(PROMPT, *run, "--lora", "missing.safetensors", "-o", "c.png") == 2
    err = capsys.readouterr().err
    assert "--lora" in err and "missing.safetensors" in err
