"""`latentdiff generate`'s image inputs, hires fix, performance flags and clip skip (issue 15, cli/generate_inputs.py)
on the tiny stand-in for the built-in model: each flag gives the pixels of the Python API with the same setting,
is recorded where it changes pixels and read back by `--from`; bad input is a one-line error before loading."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.models.autoencoder_kl import AutoencoderKL
from latentdiff.pipelines.denoising import DenoisingPipeline
from latentdiff.pipelines.hires import hires_fix
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.inpaint import InpaintPipeline
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.utils.images import read_png_params
from tests._support.cli import PROMPT, pixels
from tests._support.cli import generate_at_seed_0 as generate

RUN = dict(num_inference_steps=4, guidance_scale=3.0, progress=False)
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def pipe(model):
    return LatentDiffusionPipeline.from_pretrained(model)


@pytest.fixture(autouse=True)
def init_and_mask(offline_builtin):
    """An init image and a mask in the test's folder, beside the offline stand-in (tests/cli/conftest.py)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save("init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 16:56] = 255
    Image.fromarray(mask).save("mask.png")


def seed(value: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(value)]


def api(images) -> np.ndarray:
    return np.asarray(images[0])


# ---- img2img and inpainting ----------------------------------------------------------------------------------
def test_init_image_is_img2img_recorded_and_reproduced(pipe, tmp_path):
    assert generate(PROMPT, "--init-image", "init.png", "--strength", 0.6, "-o", "a.png") == 0
    expected = ImageToImagePipeline.from_pipe(pipe)(PROMPT, Image.open("init.png"), strength=0.6, generator=seed(),
                                                    **RUN).images
    assert np.array_equal(pixels("a.png"), api(expected))
    params = read_png_params("a.png")
    assert params["init_image"] == str(tmp_path / "init.png") and params["strength"] == 0.6
    assert len(params["init_image_sha256"]) == 64 and "mask" not in params
    assert generate("--from", "a.png", "-o", "again.png") == 0
    assert np.array_equal(pixels("again.png"), pixels("a.png"))
    assert read_png_params("again.png") == params


def test_the_default_strength_is_a1111s_and_the_size_the_images(pipe, capsys):
    Image.open("init.png").resize((50, 70)).save("odd.png")
    assert generate(PROMPT, "--init-image", "odd.png", "-o", "odd-out.png") == 0
    assert "generating 48 x 68" in capsys.readouterr().err        # rounded down to the factor 4, with a note
    params = read_png_params("odd-out.png")
    assert (params["strength"], params["width"], params["height"]) == (0.75, 48, 68)
    img2img = ImageToImagePipeline.from_pipe(pipe)
    image = img2img.preprocess_image(Image.open("odd.png").convert("RGB"), size=(68, 48))
    assert np.array_equal(pixels("odd-out.png"), api(img2img(PROMPT, image, strength=0.75, generator=seed(), **RUN)
                                                     .images))


def test_mask_is_inpainting_and_from_reproduces(pipe):
    assert generate(PROMPT, "--init-image", "init.png", "--mask", "mask.png", "--seed", 3, "-o", "in.png") == 0
    expected = InpaintPipeline.from_pipe(pipe)(PROMPT, Image.open("init.png").convert("RGB"),
                                               Image.open("mask.png").convert("L"), strength=0.75, generator=seed(3),
                                               **RUN).images
    assert np.array_equal(pixels("in.png"), api(expected))
    assert read_png_params("in.png")["mask"].endswith("mask.png")
    assert generate("--from", "in.png", "-o", "in-again.png") == 0
    assert np.array_equal(pixels("in-again.png"), pixels("in.png"))


def test_from_warns_when_the_init_image_changed(capsys):
    assert generate(PROMPT, "--init-image", "init.png", "--steps", 2, "-o", "a.png") == 0
    Image.new("RGB", (64, 64), "white").save("init.png")
    capsys.readouterr()
    assert generate("--from", "a.png", "-o", "b.png") == 0
    err = capsys.readouterr().err
    assert "init.png changed since a.png was made" in err and "sha256" in err
    assert not np.array_equal(pixels("a.png"), pixels("b.png"))


# ---- hires fix, tiles, clip skip ------------------------------------------------------------------------------
def test_hires_flags_are_the_hires_fix_of_the_api(pipe):
    flags = ["--hires-scale", 1.5, "--hires-steps", 6, "--hires-strength", 0.5, "--hires-upscaler", "image"]
    assert generate(PROMPT, *flags, "-o", "hires.png") == 0
    expected = hires_fix(pipe, PROMPT, scale=1.5, steps=6, strength=0.5, upscaler="image", generator=seed(),
                         height=64, width=64, **RUN).images
    assert pixels("hires.png").shape == (96, 96, 3)
    assert np.array_equal(pixels("hires.png"), api(expected))
    params = read_png_params("hires.png")
    assert {k: params[k] for k in params if k.startswith("hires")} == {
        "hires_scale": 1.5, "hires_steps": 6, "hires_strength": 0.5, "hires_upscaler": "image"}
    assert generate("--from", "hires.png", "-o", "hires-again.png") == 0
    assert np.array_equal(pixels("hires-again.png"), pixels("hires.png"))


def test_hires_defaults_are_a1111s():
    assert generate(PROMPT, "--hires-scale", 1.25, "--steps", 2, "-o", "h.png") == 0
    params = read_png_params("h.png")
    assert (params["hires_strength"], params["hires_upscaler"], params.get("hires_steps")) == (0.7, "latent", None)
    assert pixels("h.png").shape == (80, 80, 3)


def test_a_tile_size_off_the_factor_names_the_flag(capsys):
    assert generate(PROMPT, "--tile-size", 30, "-o", "t.png") == 2
    err = capsys.readouterr().err
    assert "where: --tile-size" in err and "multiples of 4" in err


def test_tile_size_is_tiled_sampling(pipe):
    assert generate(PROMPT, "--tile-size", 32, "--width", 96, "-o", "tiles.png") == 0
    expected = pipe(PROMPT, height=64, width=96, tile_size=32, generator=seed(), **RUN).images
    assert np.array_equal(pixels("tiles.png"), api(expected))
    assert read_png_params("tiles.png")["tile_size"] == 32


def test_clip_skip_counts_as_a1111(tmp_path, diffusers, capsys):
    """--clip-skip 2 (A1111) is clip_skip=1 (diffusers) on a CLIP model; 1 is no skip; LDMBert has none."""
    from tests._support.sd import tiny_diffusers_pipeline

    tiny_diffusers_pipeline(tmp_path / "build", clip_layers=3).save_pretrained(tmp_path / "sd")
    sd = LatentDiffusionPipeline.from_pretrained(tmp_path / "sd")
    run = ["--model", tmp_path / "sd", "--height", 32, "--width", 32, "--steps", 1]
    assert generate(PROMPT, *run, "--clip-skip", 2, "-o", "skip2.png") == 0
    assert generate(PROMPT, *run, "--clip-skip", 1, "-o", "skip1.png") == 0
    for name, clip_skip in (("skip2.png", 1), ("skip1.png", None)):
        expected = sd(PROMPT, height=32, width=32, num_inference_steps=1, clip_skip=clip_skip, generator=seed(),
                      progress=False).images
        assert np.array_equal(pixels(name), api(expected)), name
    assert (read_png_params("skip2.png")["clip_skip"], read_png_params("skip1.png")["clip_skip"]) == (2, 1)
    capsys.readouterr()
    assert generate(PROMPT, "--clip-skip", 2, "-o", "bert.png") == 2
    err = capsys.readouterr().err
    assert "no layers to skip" in err and "--clip-skip" in err


# ---- the autoencoder and the speed switches -------------------------------------------------------------------
def test_vae_folder_and_single_file_replace_the_autoencoder(model, tmp_path):
    vae = AutoencoderKL.from_pretrained(model, subfolder="vqvae")
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.mul_(1.1)
    vae.save_pretrained(tmp_path / "my-vae")
    vae.save_single_file(tmp_path / "my-vae.safetensors")
    expected = LatentDiffusionPipeline.from_pretrained(model, vae=vae)(PROMPT, generator=seed(), **RUN).images
    plain = LatentDiffusionPipeline.from_pretrained(model)(PROMPT, generator=seed(), **RUN).images
    assert not np.array_equal(api(expected), api(plain))
    for flag, name in (("my-vae", "v1.png"), ("my-vae.safetensors", "v2.png"), (model, "v3.png")):
        assert generate(PROMPT, "--vae", flag, "-o", name) == 0
    assert np.array_equal(pixels("v1.png"), api(expected)) and np.array_equal(pixels("v2.png"), api(expected))
    assert np.array_equal(pixels("v3.png"), api(plain))          # a pipeline folder: its vqvae/
    assert read_png_params("v1.png")["vae"] == str(tmp_path / "my-vae")
    assert generate("--from", "v2.png", "-o", "v2-again.png") == 0
    assert np.array_equal(pixels("v2-again.png"), pixels("v2.png"))


def test_speed_flags_reach_the_pipeline(monkeypatch, capsys):
    calls = []
    for name in ("enable_attention_slicing", "enable_vae_tiling"):
        original = getattr(DenoisingPipeline, name)
        monkeypatch.setattr(DenoisingPipeline, name, lambda self, *a, _o=original, _n=name, **k:
                            (calls.append(_n), _o(self, *a, **k))[1])
    assert generate(PROMPT, "--steps", 1, "-o", "plain.png") == 0
    assert calls == []
    flags = ["--threads", 2, "--attention-slicing", "--vae-tiling", "--offload", "model"]
    assert generate(PROMPT, "--steps", 1, *flags, "-o", "fast.png") == 0
    assert sorted(calls) == ["enable_attention_slicing", "enable_vae_tiling"]
    assert torch.get_num_threads() == 2
    assert "--offload model is for CUDA; ignored" in capsys.readouterr().err
    # 64 px: one VAE tile; two threads may round the sums differently
    assert np.abs(pixels("fast.png").astype(int) - pixels("plain.png")).max() <= 2
    params = read_png_params("fast.png")
    assert params["vae_tiling"] is True and not {"threads", "offload", "attention_slicing"} & set(params)


# ---- bad input: one line and a hint, before the model loads ---------------------------------------------------
def bad_cases(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("L", (32, 32)).save(tmp_path / "small-mask.png")
    return {
        "missing init image": (["--init-image", "gone.png"], ["no such image file", "--init-image", "gone.png"]),
        "not an image": (["--init-image", "notes.txt"], ["cannot read this image", "--init-image"]),
        "mask without init image": (["--mask", "mask.png"], ["--mask needs --init-image"]),
        "mask size": (["--init-image", "init.png", "--mask", "small-mask.png"],
                      ["--mask", "64 x 64", "32 x 32"]),
        "strength without init image": (["--strength", "0.5"], ["--strength needs --init-image"]),
        "strength 0": (["--init-image", "init.png", "--strength", "0"], ["--strength", "(0, 1]"]),
        "strength nan": (["--init-image", "init.png", "--strength", "nan"], ["--strength", "(0, 1]"]),
        "hires steps alone": (["--hires-steps", "4"], ["--hires-steps needs --hires-scale"]),
        "hires with init image": (["--init-image", "init.png", "--hires-scale", "2"], ["--hires-scale", "text-to"]),
        "tiles with init image": (["--init-image", "init.png", "--tile-size", "32"], ["--tile-size"]),
        "hires scale": (["--hires-scale", "0.5"], ["--hires-scale", "[1, 8]"]),
        "hires upscaler": (["--hires-scale", "2", "--hires-upscaler", "esrgan"], ["--hires-upscaler", "latent"]),
        "hires pixels": (["--hires-scale", "8", "--height", "4096", "--width", "4096"],
                         ["--hires-scale", "32768 x 32768 x 1", "67108864"]),
        "init image pixels": (["--init-image", "init.png", "--height", "16384", "-n", "300"],
                              ["--height", "-n", "16384 x 64 x 300"]),
        "missing vae": (["--vae", "./no/vae"], ["no such VAE", "--vae"]),
        "missing vae file": (["--vae", "vae.safetensors"], ["no such VAE", "vae.safetensors"]),
        "threads": (["--threads", "0"], ["--threads", "[1, 4096]"]),
        "clip skip 0": (["--clip-skip", "0"], ["--clip-skip", "A1111"]),
    }


CASES = ["missing init image", "not an image", "mask without init image", "mask size", "strength without init image",
         "strength 0", "strength nan", "hires steps alone", "hires with init image", "tiles with init image",
         "hires scale", "hires upscaler", "hires pixels", "init image pixels", "missing vae", "missing vae file",
         "threads", "clip skip 0"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_before_any_loading(case, tmp_path, monkeypatch, capsys):
    argv, words = bad_cases(tmp_path)[case]

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", never)
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", never)
    before = sorted(tmp_path.iterdir())
    assert generate(PROMPT, *argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("latentdiff: error: ") and err[1].startswith("hint: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert sorted(tmp_path.iterdir()) == before


def test_a_png_naming_a_missing_init_image_is_a_clear_error(capsys):
    assert generate(PROMPT, "--init-image", "init.png", "--steps", 2, "-o", "a.png") == 0
    os.remove("init.png")
    capsys.readouterr()
    assert generate("--from", "a.png", "-o", "b.png") == 2
    err = capsys.readouterr().err
    assert "no such image file" in err and "a.png: init_image" in err


# ---- the entry point -----------------------------------------------------------------------------------------
def cli_env(tmp_path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def test_python_m_latentdiff_runs_img2img_and_from(tmp_path):
    """The real built-in model through `python -m latentdiff`: img2img, then --from gives the same bytes."""
    run = [sys.executable, "-m", "latentdiff", "generate"]
    first = subprocess.run([*run, "a blue square", "--init-image", "init.png", "--strength", "0.5", "--steps", "2",
                            "--mask", "mask.png", "-o", "cli.png"], capture_output=True, text=True,
                           env=cli_env(tmp_path), timeout=120)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([*run, "--from", "cli.png", "-o", "cli-again.png"], capture_output=True, text=True,
                           env=cli_env(tmp_path), timeout=120)
    assert again.returncode == 0, again.stderr
    assert Path("cli.png").stat().st_size > 0 and np.array_equal(pixels("cli.png"), pixels("cli-again.png"))


def test_the_installed_console_script_records_a_plain_run_as_before(tmp_path):
    """The `latentdiff` on PATH (the installed package in CI): a plain run records no input / hires settings."""
    script = shutil.which("latentdiff")
    assert script is not None, "the latentdiff console script is not installed"
    out = subprocess.run([script, "generate", "a red circle", "--steps", "2", "--seed", "0", "-o", "plain.png"],
                         capture_output=True, text=True, env=cli_env(tmp_path) | {"PYTHONPATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    params = read_png_params("plain.png")
    assert params["steps"] == 2 and not {"init_image", "strength", "hires_scale", "clip_skip", "vae"} & set(params)
