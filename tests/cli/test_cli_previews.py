"""`latentdiff generate --preview-every / --fast-decode` on the tiny stand-in of the built-in model, with a random
tiny autoencoder: previews are written and leave the images alone; --fast-decode is the pipeline with the tiny
autoencoder as its vae (checked against a direct call), recorded so --from reproduces it; bad flags are usage
errors before the model loads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff.models.autoencoder_tiny import AutoencoderTiny, AutoencoderTinyConfig
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.utils.images import read_png_params
from tests._support.cli import PROMPT, generate, pixels

pytestmark = pytest.mark.usefixtures("offline_builtin")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    tiny = AutoencoderTiny(AutoencoderTinyConfig(encoder_channels=(8, 8, 8), decoder_channels=(8, 8, 8),
                                                 encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1, 1)))
    return tiny.save_pretrained(tmp_path_factory.mktemp("tiny") / "tiny")


def test_previews_are_written_and_change_nothing(tiny_dir, capsys):
    assert generate(PROMPT, "-o", "plain.png", "--seed", 0) == 0
    assert generate(PROMPT, "-o", "out.png", "--seed", 0, "--preview-every", 2, "--preview-vae", tiny_dir,
                    "--preview-dir", "pv") == 0
    assert "latentdiff: preview pv/0000-step-002.png" in capsys.readouterr().err
    assert sorted(p.name for p in Path("pv").iterdir()) == ["0000-step-002.png",
                                                     "0000-step-004.png"]
    assert np.array_equal(pixels("out.png"), pixels("plain.png"))
    assert read_png_params("out.png") == read_png_params("plain.png")


def test_fast_decode_is_the_tiny_vae_and_is_recorded(model, tiny_dir):
    assert generate(PROMPT, "-o", "fast.png", "--seed", 3, "--fast-decode", "--tiny-vae", tiny_dir) == 0
    params = read_png_params("fast.png")
    assert params["vae"] == str(tiny_dir.resolve())
    pipe = LatentDiffusionPipeline.from_pretrained(model, vae=AutoencoderTiny.from_pretrained(tiny_dir))
    expected = pipe(PROMPT, num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(3),
                    progress=False).images[0]
    assert np.array_equal(pixels("fast.png"), np.asarray(expected))
    assert generate("--from", "fast.png", "-o", "again.png") == 0
    assert np.array_equal(pixels("again.png"), pixels("fast.png"))


@pytest.mark.parametrize(("flags", "message"), [
    (["--preview-every", 0, "--preview-vae", "x"], "--preview-every"),
    (["--preview-vae", "x"], "--preview-vae needs --preview-every"),
    (["--tiny-vae", "x"], "--tiny-vae"),
    (["--fast-decode", "--vae", "x"], "--fast-decode"),
    (["--fast-decode", "--tiny-vae", "no/such/folder/x"], "no such tiny autoencoder"),
    (["--fast-decode", "--tiny-vae", "."], "not a tiny autoencoder"),
])
def test_bad_flags_are_usage_errors(flags, message, capsys):
    assert generate(PROMPT, "-o", "bad.png", *flags) == 2
    assert message in capsys.readouterr().err


def test_fast_decode_needs_a_tiny_vae_for_other_models(model, capsys):
    assert generate(PROMPT, "--model", model, "-o", "bad.png", "--fast-decode") == 2
    assert "--tiny-vae" in capsys.readouterr().err
