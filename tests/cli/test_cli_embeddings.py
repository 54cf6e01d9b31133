"""`latentdiff generate --embedding FILE[:TOKEN]` (issue 16, cli/generate_embeddings.py) on the tiny stand-in for
the built-in model: the pixels of `pipe.load_textual_inversion` with the same file, recorded in the PNG (path,
token, sha256) and loaded again by `--from`; bad files are a one-line error naming the flag before any image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.utils.images import read_image_params, read_png_params, save_png
from tests._support.cli import BUILTIN, PROMPT, pixels
from tests._support.cli import generate_at_seed_0 as generate

RUN = dict(num_inference_steps=4, guidance_scale=3.0, progress=False)
WIDTH = 32     # the stand-in's LDMBert width


@pytest.fixture(autouse=True)
def embedding_files(offline_builtin):
    """Three embedding files in the test's folder, beside the offline stand-in (tests/cli/conftest.py)."""
    g = torch.Generator().manual_seed(5)
    save_file({"emb_params": torch.randn(2, WIDTH, generator=g) * 3}, "Sparkle.safetensors")
    torch.save({"<star>": torch.randn(WIDTH, generator=g) * 3}, "learned_embeds.bin")
    save_file({"emb_params": torch.randn(1, WIDTH * 2, generator=g)}, "wide.safetensors")


def test_embedding_flags_are_the_api_recorded_and_reproduced(model, tmp_path):
    prompt = f"{PROMPT} sparkle <star>"
    assert generate(prompt, "--negative", "Sparkle", "--embedding", "Sparkle.safetensors:sparkle",
                    "--embedding", "learned_embeds.bin", "-o", "a.png") == 0
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    base = np.asarray(pipe(prompt, negative_prompt="Sparkle", generator=torch.Generator().manual_seed(0),
                           **RUN).images[0])
    pipe.load_textual_inversion([tmp_path / "Sparkle.safetensors", tmp_path / "learned_embeds.bin"],
                                token=["sparkle", None])
    expected = np.asarray(pipe(prompt, negative_prompt="Sparkle", generator=torch.Generator().manual_seed(0),
                               **RUN).images[0])
    assert np.array_equal(pixels("a.png"), expected) and not np.array_equal(expected, base)
    recorded = read_png_params("a.png")["embedding"]
    assert [(e["path"], e["token"]) for e in recorded] == [(str(tmp_path / "Sparkle.safetensors"), "sparkle"),
                                                           (str(tmp_path / "learned_embeds.bin"), "<star>")]
    assert all(len(e["sha256"]) == 64 for e in recorded)
    short = [e["sha256"][:10] for e in recorded]
    assert f'TI hashes: "sparkle: {short[0]}, <star>: {short[1]}"' in read_image_params("a.png")[1]   # as A1111
    assert generate("--from", "a.png", "-o", "again.png") == 0
    assert np.array_equal(pixels("again.png"), pixels("a.png"))
    assert read_png_params("again.png")["embedding"] == recorded
    assert "embedding" not in read_png_params(_plain())


def _plain() -> str:
    assert generate(PROMPT, "--steps", 2, "-o", "plain.png") == 0
    return "plain.png"


@pytest.mark.parametrize(("flag", "words"), [
    ("wide.safetensors", ["--embedding", "width", "64", "32"]),
    ("missing.pt", ["--embedding", "missing.pt"]),
    ("Sparkle.safetensors:red", ["--embedding", "already"]),             # a word of the vocabulary
])
def test_bad_embeddings_name_the_flag(capsys, flag, words):
    assert generate(PROMPT, "--embedding", flag, "--steps", 2, "-o", "bad.png") == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("value", ["Sparkle.safetensors", [{"path": "x\x00.pt"}], [{"token": "t"}], [{}] * 65])
def test_a_png_with_a_bad_embedding_record_names_the_key(capsys, value):
    params = {"prompt": PROMPT, "seed": 0, "n": 1, "model": BUILTIN, "steps": 2, "embedding": value}
    save_png(Image.new("RGB", (64, 64)), "tampered.png", params=params)
    assert generate("--from", "tampered.png", "-o", "out.png") == 2
    err = capsys.readouterr().err
    assert "tampered.png: embedding" in err, err
