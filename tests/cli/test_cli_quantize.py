"""`latentdiff generate --quantize {int8,int8-static}` (cli/generate_quantize.py) on the tiny stand-in for the built-in
model: the flag gives the pixels of the Python API's `cpu_paths.quantize` (the UNet's layers are int8), one line on
stderr says what was quantized, the PNG records it and `--from` makes the same bytes again; after --optimize-cpu
when both are given; with a ControlNet, int8-static calibrates with the run's hint; an SDXL --refiner is quantized
too (int8-static: calibrated behind its base); dynamic int8 on a bfloat16 model, or a bad recorded value, is a
one-line error before the model loads; off the CPU it is ignored with a warning and not recorded."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from latentdiff.cli import generate_quantize
from latentdiff.generation import quantize as generation_quantize
from latentdiff.layers.prepacked import is_int8, is_prepacked
from latentdiff.pipelines import cpu_paths
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.utils.images import read_png_params
from tests._support.cli import PROMPT, pixels
from tests._support.cli import generate_at_seed_0 as generate

pytestmark = pytest.mark.usefixtures("offline_builtin")
RUN = dict(num_inference_steps=4, guidance_scale=3.0, progress=False)


def test_the_choices_are_the_librarys():
    assert generate_quantize.QUANTIZATIONS == generation_quantize.QUANTIZATIONS == cpu_paths.QUANTIZATIONS


def int8_layers(pipe) -> int:
    return sum(is_int8(m) for m in pipe.unet.modules())


@pytest.mark.parametrize("method", ["int8-static", "int8"])
def test_quantize_flag_is_the_api_and_from_reproduces_it(method, model, monkeypatch, capsys):
    quantized = []
    quantize = cpu_paths.quantize
    monkeypatch.setattr(cpu_paths, "quantize", lambda pipe, m: quantized.append(pipe) or quantize(pipe, m))
    assert generate(PROMPT, "--quantize", method, "--dtype", "float32", "-o", "q.png") == 0
    err = capsys.readouterr().err
    assert len(quantized) == 1
    if method == "int8-static":
        assert int8_layers(quantized[0]) > 0 and "calibrated in" in err
        layers = int8_layers(quantized[0])
        assert f"--quantize int8-static: {layers} convolutions and linear layers of the UNet in int8" in err
    else:
        count = cpu_paths.quantized_linears(quantized[0].unet)
        assert count > 0 and f"--quantize int8: {count} linear layers of the UNet in int8" in err
    pipe = quantize(LatentDiffusionPipeline.from_pretrained(model), method)
    expected = pipe(PROMPT, generator=[torch.Generator().manual_seed(0)], **RUN).images[0]
    assert np.array_equal(pixels("q.png"), np.asarray(expected))
    assert read_png_params("q.png")["quantize"] == method
    assert generate(PROMPT, "-o", "plain.png") == 0
    assert "quantize" not in read_png_params("plain.png")
    assert not np.array_equal(pixels("plain.png"), pixels("q.png"))     # it is lossy: other pixels
    assert generate("--from", "q.png", "-o", "again.png") == 0
    assert read_png_params("again.png")["quantize"] == method
    assert Path("again.png").read_bytes() == Path("q.png").read_bytes()


def test_int8_static_on_bfloat16_and_after_optimize_cpu(model, monkeypatch):
    order = []
    optimize, quantize = cpu_paths.optimize_for_cpu, cpu_paths.quantize
    monkeypatch.setattr(cpu_paths, "optimize_for_cpu",
                        lambda pipe, **kw: order.append("optimize") or optimize(pipe, **kw))
    monkeypatch.setattr(cpu_paths, "quantize", lambda pipe, m: order.append("quantize") or quantize(pipe, m))
    assert generate(PROMPT, "--quantize", "int8-static", "--optimize-cpu", "--dtype", "bfloat16", "-o", "b.png") == 0
    assert order == ["optimize", "quantize"]
    pipe = LatentDiffusionPipeline.from_pretrained(model, torch_dtype=torch.bfloat16)
    quantize(optimize(pipe), "int8-static")
    assert int8_layers(pipe) > 0 and any(is_prepacked(m) for m in pipe.unet.modules())
    expected = pipe(PROMPT, generator=[torch.Generator().manual_seed(0)], **RUN).images[0]
    assert np.array_equal(pixels("b.png"), np.asarray(expected))
    params = read_png_params("b.png")
    assert (params["quantize"], params["dtype"]) == ("int8-static", "bfloat16")


def test_dynamic_int8_on_a_bfloat16_model_is_refused_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    assert generate(PROMPT, "--quantize", "int8", "--dtype", "bfloat16", "-o", "x.png") == 2
    err = capsys.readouterr().err
    assert "int8 dynamic quantization needs a float32 model; where: --quantize; expected: --dtype float32, or " \
           "--quantize int8-static" in err
    assert not Path("x.png").exists()


def test_a_bad_recorded_value_is_refused(capsys):
    assert generate(PROMPT, "--steps", 2, "-o", "a.png") == 0
    with Image.open("a.png") as image:
        params = json.loads(image.text["latentdiff"]) | {"quantize": "int4"}
        info = PngInfo()
        info.add_text("latentdiff", json.dumps(params))
        image.save("bad.png", pnginfo=info)
    capsys.readouterr()
    assert generate("--from", "bad.png", "-o", "x.png") == 2
    err = capsys.readouterr().err
    assert "bad value for quantize; where: bad.png: quantize; expected: one of int8, int8-static; found: 'int4'" in err


def test_a_bad_flag_value_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        generate(PROMPT, "--quantize", "int4")
    assert "--quantize" in capsys.readouterr().err


def test_off_the_cpu_it_is_ignored_with_a_warning_and_not_recorded(monkeypatch, capsys):
    from argparse import Namespace

    from latentdiff.cli.generate_settings import GenerateSettings

    class OnGPU:
        device = torch.device("cuda")

    settings = GenerateSettings(prompt="a", negative=None, seed=0, steps=1, guidance=1.0, sampler=None, eta=None,
                                height=None, width=None, n=1, model="m", dtype="float16", tokenizer=None,
                                quantize="int8")
    monkeypatch.setattr(cpu_paths, "quantize", lambda *a: pytest.fail("quantized"))
    args = Namespace(quantize="int8", from_png=None)
    assert generate_quantize.apply_quantize(OnGPU(), settings, args).quantize is None
    assert "--quantize int8 is for the CPU; ignored on cuda (not recorded)" in capsys.readouterr().err
    generate_quantize.check_quantize(settings, args, torch.device("cuda"))   # no error: ignored there


def test_the_command_line_starts_without_torch():
    code = ("import sys\nfrom latentdiff.cli.main import build_parser\n"
            "args = build_parser().parse_args(['generate', 'a', '--quantize', 'int8-static'])\n"
            "assert args.quantize == 'int8-static'\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_int8_static_with_a_controlnet_calibrates_with_the_hint_and_from_reproduces(model, capsys):
    """--controlnet with --quantize int8-static: the calibration runs take the run's control arguments (the hint
    at the run's size), so the image is the Python API's `quantize(..., calibration_options=...)`, and --from
    (the hint recorded) makes the same bytes again."""
    from latentdiff import ControlNet
    from tests._support.parity import randomize_

    pipe = LatentDiffusionPipeline.from_pretrained(model)
    torch.manual_seed(0)     # a ControlNet that acts (the shipped stand-in's zero convolutions add nothing)
    randomize_(ControlNet.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32, 96))).save_pretrained(
        "net")
    Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy()).save(
        "hint.png")
    argv = ["--controlnet", "net", "--control", "image:hint.png:0.8", "--dtype", "float32"]
    assert generate(PROMPT, *argv, "--quantize", "int8-static", "-o", "q.png") == 0
    assert "prompts with the run's control images)" in capsys.readouterr().err
    with Image.open("hint.png") as image:
        hint = image.convert("RGB")
    control = dict(control_image=hint, control_resize_mode=0, controlnet_conditioning_scale=0.8,
                   control_guidance_start=0.0, control_guidance_end=1.0, guess_mode=False)
    api = LatentDiffusionPipeline.from_pretrained(model, controlnet=ControlNet.from_pretrained("net"))
    cpu_paths.quantize(api, "int8-static", calibration_options=control | dict(height=64, width=64))
    assert int8_layers(api) > 0
    expected = api(PROMPT, generator=[torch.Generator().manual_seed(0)], **RUN, **control).images[0]
    assert np.array_equal(pixels("q.png"), np.asarray(expected))
    assert read_png_params("q.png")["quantize"] == "int8-static"
    assert generate(PROMPT, *argv, "-o", "plain.png") == 0
    assert not np.array_equal(pixels("plain.png"), pixels("q.png"))     # lossy: other pixels
    assert generate("--from", "q.png", "-o", "again.png") == 0
    assert Path("again.png").read_bytes() == Path("q.png").read_bytes()


@pytest.mark.parametrize("method", ["int8-static", "int8"])
def test_sdxl_refiner_is_quantized_too_behind_its_base_and_from_reproduces(method, tmp_path_factory, monkeypatch,
                                                                          capsys):
    """--refiner with --quantize: the refiner's UNet is quantized after the base's (int8-static: calibrated on the
    prompts run through the quantized base and the refiner, `cpu_paths.refiner_calibration` at the run's switch),
    the image is the Python API's, the PNG records it and --from gives the same bytes."""
    from latentdiff.pipelines.sdxl import StableDiffusionXLPipeline
    from latentdiff.pipelines.sdxl_image import StableDiffusionXLImg2ImgPipeline
    from tests._support.sdxl_native import write_tiny_sdxl

    root = tmp_path_factory.mktemp("sdxl")
    base, refiner = write_tiny_sdxl(root / "base"), write_tiny_sdxl(root / "refiner", kind="refiner", seed=5)
    quantized = []
    quantize = cpu_paths.quantize
    monkeypatch.setattr(cpu_paths, "quantize", lambda pipe, m, **kw: quantized.append(pipe) or quantize(pipe, m, **kw))
    argv = ["--model", base, "--refiner", refiner, "--refiner-switch", 0.5, "--steps", 3, "--dtype", "float32"]
    assert generate("a red church", *argv, "--quantize", method, "-o", "q.png") == 0
    assert [type(pipe) for pipe in quantized] == [StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline]
    count = int8_layers if method == "int8-static" else (lambda pipe: cpu_paths.quantized_linears(pipe.unet))
    assert count(quantized[0]) > 0 and count(quantized[1]) > 0
    err = capsys.readouterr().err
    assert f"--quantize {method}: refiner: {count(quantized[1])} " in err and "of the refiner's UNet in int8" in err
    api_base = quantize(StableDiffusionXLPipeline.from_pretrained(base), method)
    api_refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner)
    calibration = cpu_paths.refiner_calibration(api_base, switch=0.5) if method == "int8-static" else None
    quantize(api_refiner, method, calibration=calibration)
    common = dict(num_inference_steps=3, generator=[torch.Generator().manual_seed(0)], progress=False)
    latents = api_base(["a red church"], denoising_end=0.5, output_type="latent", **common).images
    expected = api_refiner(["a red church"], image=latents, denoising_start=0.5, **common).images[0]
    assert np.array_equal(pixels("q.png"), np.asarray(expected.convert("RGB")))
    assert read_png_params("q.png")["quantize"] == method
    assert generate("--from", "q.png", "-o", "again.png") == 0
    assert Path("again.png").read_bytes() == Path("q.png").read_bytes()
