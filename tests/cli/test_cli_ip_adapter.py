"""`latentdiff generate --ip-adapter FILE --ip-image IMAGE [--ip-scale S]` on the tiny Stable Diffusion with a tiny
IP-Adapter file (released layout) and its image_encoder/ folder beside it: the pixels of the Python API, recorded in
the PNG so that `--from` reproduces them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import LatentDiffusionPipeline
from latentdiff.diffusion.samplers import switch_sampler
from latentdiff.models.ip_adapter import cross_attentions
from latentdiff.utils.images import read_png_params
from tests._support.cli import generate, pixels
from tests._support.ip_adapter import PLUS_NAME, write_tiny_ip_adapter
from tests._support.sd import tiny_diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle"
RUN = ["--height", 32, "--width", 32, "--steps", 3, "--seed", 0, "--sampler", "ddim"]


def make_inputs(tmp_path, monkeypatch) -> tuple[LatentDiffusionPipeline, Path]:
    """In tmp_path, the working folder: the tiny SD folder (sd/), a tiny IP-Adapter Plus made for its UNet (ip/)
    and an image prompt (style.png); -> the pipeline loaded from sd/ and the adapter's weights file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_diffusers_pipeline(tmp_path / "build").save_pretrained(tmp_path / "sd")
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "sd")
    inner = [layer.to_k.out_features for _, layer in cross_attentions(pipe.unet)]
    write_tiny_ip_adapter(tmp_path / "ip", plus=True, inner=inner, context_dim=32)
    g = torch.Generator().manual_seed(5)
    Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()).save(tmp_path / "style.png")
    return pipe, tmp_path / "ip" / "models" / PLUS_NAME


def with_adapter(pipe: LatentDiffusionPipeline, weights: Path) -> Image.Image:
    """`pipe` set as RUN and the CLI's --ip-adapter / --ip-scale 0.6 set it; -> the image prompt (style.png)."""
    pipe.sampler = switch_sampler(pipe.sampler, "ddim")
    pipe.load_ip_adapter(weights)
    pipe.set_ip_adapter_scale(0.6)
    with Image.open("style.png") as style:
        return style.convert("RGB")


def test_ip_adapter_matches_the_api_and_from_reproduces(tmp_path, monkeypatch):
    pipe, weights = make_inputs(tmp_path, monkeypatch)
    assert generate(PROMPT, "--model", tmp_path / "sd", *RUN, "--ip-adapter", weights, "--ip-image", "style.png",
                    "--ip-scale", 0.6, "-o", "a.png") == 0

    image = with_adapter(pipe, weights)
    expected = np.asarray(pipe(PROMPT, height=32, width=32, num_inference_steps=3, progress=False,
                               generator=[torch.Generator().manual_seed(0)], ip_adapter_image=image).images[0])
    assert np.array_equal(pixels("a.png"), expected)
    assert generate(PROMPT, "--model", tmp_path / "sd", *RUN, "-o", "plain.png") == 0
    assert not np.array_equal(pixels("plain.png"), expected)        # the image prompt acted
    recorded = read_png_params("a.png")["ip_adapter"]
    assert recorded["path"] == str(weights) and recorded["scale"] == 0.6
    assert generate("--from", "a.png", "-o", "again.png") == 0
    assert np.array_equal(pixels("again.png"), expected)


def test_int8_static_with_an_ip_adapter_calibrates_with_the_image_prompt(tmp_path, monkeypatch):
    """--quantize int8-static with --ip-adapter: the calibration calls take the run's IP-Adapter image (its tokens
    enter the UNet's cross-attention) at the run's size: the pixels of the Python API's
    `quantize(..., calibration_options=...)`, and `--from` gives them again."""
    from latentdiff.layers.prepacked import is_int8
    from latentdiff.pipelines.cpu_paths import quantize

    pipe, weights = make_inputs(tmp_path, monkeypatch)
    argv = [PROMPT, "--model", tmp_path / "sd", *RUN, "--ip-adapter", weights, "--ip-image", "style.png",
            "--ip-scale", 0.6, "--dtype", "float32"]
    assert generate(*argv, "--quantize", "int8-static", "-o", "q.png") == 0

    image = with_adapter(pipe, weights)
    quantize(pipe, "int8-static", calibration_options=dict(ip_adapter_image=image, height=32, width=32))
    assert any(is_int8(m) for m in pipe.unet.modules())
    expected = np.asarray(pipe(PROMPT, height=32, width=32, num_inference_steps=3, progress=False,
                               generator=[torch.Generator().manual_seed(0)], ip_adapter_image=image).images[0])
    assert np.array_equal(pixels("q.png"), expected)
    assert read_png_params("q.png")["quantize"] == "int8-static"
    assert generate(*argv, "-o", "plain.png") == 0
    assert not np.array_equal(pixels("plain.png"), expected)        # int8: other pixels
    assert generate("--from", "q.png", "-o", "again.png") == 0
    assert np.array_equal(pixels("again.png"), expected)
