"""The issue-20 switches in the server. `cfg_truncation` through the A1111 routes (latentdiff's key): a served image
is the Python API's image with the same `cfg_truncation`, bit for bit (txt2img and img2img), the PNG records it,
requests that differ in it never share a call, and a value outside [0, 1] (or not a number) is a 422 naming the
key. DeepCache, FreeU and ToMe as start flags (`--deepcache`, `--freeu`, `--tome`): the served image is the Python
API's with the same switches, the PNG records them in `latentdiff generate`'s keys, bad flags are UsageErrors
naming the flag."""
from __future__ import annotations

import argparse
import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from latentdiff.cli.serve import step_switches
from latentdiff.errors import UsageError
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.serve.app import create_app
from latentdiff.serve.requests import ImageRequest
from latentdiff.serve.settings import ServeSettings
from latentdiff.serve.switches import apply_switches, switch_params
from tests._support.tiny_builtin import make_tiny_shapes_model

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "latentdiff/shapes-64"
PROMPT = "a red circle on the left"
STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    return LatentDiffusionPipeline.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def client():
    torch.set_num_threads(1)
    with TestClient(create_app(ServeSettings(max_batch=1, batch_wait_s=0.0))) as c:
        yield c


def served(client, path: str, **body) -> tuple[np.ndarray, dict]:
    answer = client.post(f"/sdapi/v1/{path}", json={"prompt": PROMPT, "steps": STEPS, "seed": 5, "width": 64,
                                                    "height": 64} | body)
    assert answer.status_code == 200, answer.text
    with Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


def direct(pipe, *args, **kw) -> np.ndarray:
    return np.asarray(pipe(PROMPT, *args, num_inference_steps=STEPS, guidance_scale=7.0, progress=False,
                           generator=[torch.Generator().manual_seed(5)], **kw).images[0])


def test_txt2img_with_cfg_truncation_is_the_python_api_s(client, pipe):
    got, text = served(client, "txt2img", cfg_truncation=0.5)
    expected = direct(pipe, height=64, width=64, cfg_truncation=0.5)
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, direct(pipe, height=64, width=64))      # it changes the image
    assert json.loads(text["latentdiff"])["cfg_truncation"] == 0.5
    plain, text = served(client, "txt2img", cfg_truncation=None)          # null: not given
    assert np.array_equal(plain, direct(pipe, height=64, width=64)) and "cfg_truncation" not in text["latentdiff"]


def test_img2img_with_cfg_truncation_is_the_python_api_s(client, pipe):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    got, _ = served(client, "img2img", init_images=[encoded], denoising_strength=0.5, cfg_truncation=0.25)
    img2img = ImageToImagePipeline.from_pipe(pipe)
    expected = direct(img2img, img2img.preprocess_image(init, size=(64, 64)), negative_prompt="", strength=0.5,
                      cfg_truncation=0.25)
    assert np.array_equal(got, expected)


def test_info_reports_cfg_truncation(client):
    """The answer's `info` carries it (the page's "reuse parameters" puts it back from there); null when not given."""
    for value in (0.25, None):
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "width": 64, "height": 64,
                                                        "cfg_truncation": value})
        assert answer.status_code == 200, answer.text
        assert json.loads(answer.json()["info"])["cfg_truncation"] == value


def test_requests_that_differ_in_cfg_truncation_never_share_a_call():
    a, b = (ImageRequest(model=MODEL, prompt=PROMPT, cfg_truncation=value) for value in (None, 0.5))
    assert a.batch_key() != b.batch_key()


@pytest.mark.parametrize("bad", [1.5, -0.1, "half", True, [0.5]])
def test_bad_cfg_truncation_is_a_422_naming_it(client, bad):
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "cfg_truncation": bad})
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "cfg_truncation" and "Traceback" not in answer.text


# ---- the step switches: start flags, on every model the server loads ---------------------------------------------
SWITCHED = dict(deepcache=(2, 0), freeu=(0.9, 0.2, 1.5, 1.6), tome=0.5)


def test_start_switches_give_the_python_apis_switched_image(tmp_path):
    """The tiny stand-in for the built-in model (attention at the latent's full resolution, where tomesd's reach
    merges: the built-in model has none there, test below)."""
    folder = str(make_tiny_shapes_model(tmp_path / "m"))
    settings = ServeSettings(model=folder, max_batch=1, batch_wait_s=0.0, **SWITCHED)
    with TestClient(create_app(settings)) as switched:
        got, text = served(switched, "txt2img")
    own = LatentDiffusionPipeline.from_pretrained(folder)
    plain = direct(own, height=64, width=64)
    own.enable_deepcache(2, 0)
    own.enable_freeu(0.9, 0.2, 1.5, 1.6)
    assert own.enable_tome(0.5) > 0
    assert np.array_equal(got, direct(own, height=64, width=64))
    assert not np.array_equal(got, plain)
    recorded = json.loads(text["latentdiff"])
    assert {k: recorded[k] for k in ("deepcache", "deepcache_branch", "freeu", "tome")} == {
        "deepcache": 2, "deepcache_branch": 0, "freeu": [0.9, 0.2, 1.5, 1.6], "tome": 0.5}


def test_tome_where_tomesd_s_reach_merges_nothing_is_a_logged_no_op(caplog):
    """The built-in model's first attention level is downsampled twice: --tome warns, as `generate --tome` does,
    and the PNG records no tome."""
    own = LatentDiffusionPipeline.from_pretrained(MODEL)
    with caplog.at_level("WARNING", logger="latentdiff.serve"):
        apply_switches(own, ServeSettings(tome=0.5, deepcache=(3, 0)))
    assert "nothing is merged" in caplog.text
    assert switch_params(own) == {"deepcache": 3, "deepcache_branch": 0}


@pytest.mark.parametrize("flags, where", [
    (dict(deepcache=0), "--deepcache"), (dict(deepcache_branch=1), "--deepcache-branch"),
    (dict(deepcache=2, deepcache_branch=-1), "--deepcache-branch"), (dict(freeu="0.9,0.2,1.5"), "--freeu"),
    (dict(freeu="0.9,0.2,0,1.6"), "--freeu"), (dict(freeu="a,b,c,d"), "--freeu"), (dict(tome=1.0), "--tome"),
    (dict(tome=-0.1), "--tome")])
def test_bad_switch_flags_are_usage_errors_naming_the_flag(flags, where):
    args = argparse.Namespace(**({"deepcache": None, "deepcache_branch": None, "freeu": None, "tome": None} | flags))
    with pytest.raises(UsageError) as error:
        step_switches(args)
    assert error.value.where == where


def test_a_branch_the_model_lacks_is_refused_when_it_loads():
    with pytest.raises(UsageError) as error:
        apply_switches(LatentDiffusionPipeline.from_pretrained(MODEL), ServeSettings(deepcache=(2, 99)))
    assert error.value.where == "--deepcache-branch"


def test_the_flags_reach_the_settings():
    from latentdiff.cli.main import build_parser
    from latentdiff.cli.serve import settings_from

    args = build_parser().parse_args(["serve", "--deepcache", "3", "--deepcache-branch", "1", "--freeu",
                                      "0.6,0.4,1.1,1.2", "--tome", "0.3"])
    settings = settings_from(args)
    assert (settings.deepcache, settings.freeu, settings.tome) == ((3, 1), (0.6, 0.4, 1.1, 1.2), 0.3)
    plain = settings_from(build_parser().parse_args(["serve"]))
    assert (plain.deepcache, plain.freeu, plain.tome) == (None, None, None)


def test_optimize_cpu_packs_every_loaded_model_and_keeps_its_image(tmp_path):
    from latentdiff.cli.main import build_parser
    from latentdiff.cli.serve import settings_from
    from latentdiff.layers.prepacked import is_prepacked

    assert settings_from(build_parser().parse_args(["serve", "--optimize-cpu"])).optimize_cpu
    assert not settings_from(build_parser().parse_args(["serve"])).optimize_cpu
    folder = str(make_tiny_shapes_model(tmp_path / "m"))
    own = LatentDiffusionPipeline.from_pretrained(folder)
    apply_switches(own, ServeSettings(optimize_cpu=True))
    assert all(is_prepacked(m) for m in own.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert switch_params(own) == {}      # speed and memory only: nothing to record
    settings = ServeSettings(model=folder, max_batch=1, batch_wait_s=0.0, optimize_cpu=True)
    with TestClient(create_app(settings)) as client:
        got, _ = served(client, "txt2img")
    plain = direct(LatentDiffusionPipeline.from_pretrained(folder), height=64, width=64)
    assert np.abs(got.astype(int) - plain.astype(int)).max() <= 1   # fp32, rounding order only


# ---- --quantize: every CPU model's UNet in int8, recorded ------------------------------------------------------------
@pytest.mark.parametrize("method", ["int8-static", "int8"])
def test_quantize_quantizes_every_loaded_model_and_records_it(method, tmp_path, caplog):
    from latentdiff.cli.main import build_parser
    from latentdiff.cli.serve import settings_from
    from latentdiff.layers.prepacked import is_int8
    from latentdiff.pipelines.cpu_paths import quantize, quantized_linears

    assert settings_from(build_parser().parse_args(["serve", "--quantize", method])).quantize == method
    assert settings_from(build_parser().parse_args(["serve"])).quantize is None
    folder = str(make_tiny_shapes_model(tmp_path / "m"))
    own = LatentDiffusionPipeline.from_pretrained(folder)
    with caplog.at_level("WARNING", logger="latentdiff.serve"):
        apply_switches(own, ServeSettings(quantize=method))
    int8 = quantized_linears(own.unet) if method == "int8" else sum(is_int8(m) for m in own.unet.modules())
    assert int8 > 0 and f"--quantize {method}: LatentDiffusionPipeline: {int8} " in caplog.text
    assert switch_params(own) == {"quantize": method}
    settings = ServeSettings(model=folder, max_batch=1, batch_wait_s=0.0, quantize=method)
    with TestClient(create_app(settings)) as client:
        got, text = served(client, "txt2img")
    plain = LatentDiffusionPipeline.from_pretrained(folder)
    assert not np.array_equal(got, direct(plain, height=64, width=64))    # lossy: another image
    assert np.array_equal(got, direct(quantize(plain, method), height=64, width=64))
    assert json.loads(text["latentdiff"])["quantize"] == method


def test_quantize_int8_needs_float32_and_is_ignored_off_the_cpu(caplog):
    from latentdiff.cli.main import build_parser
    from latentdiff.cli.serve import settings_from

    with pytest.raises(UsageError) as error:
        settings_from(build_parser().parse_args(["serve", "--quantize", "int8", "--dtype", "bfloat16",
                                                 "--device", "cpu"]))
    assert (error.value.where, error.value.expected) == (
        "--quantize", "--dtype float32, or --quantize int8-static (float32 or bfloat16)")
    assert settings_from(build_parser().parse_args(["serve", "--quantize", "int8-static", "--dtype", "bfloat16",
                                                    "--device", "cpu"])).quantize == "int8-static"

    class OnGPU:
        device = torch.device("cuda")

    with caplog.at_level("WARNING", logger="latentdiff.serve"):
        apply_switches(OnGPU(), ServeSettings(quantize="int8"))     # nothing is touched: it has no UNet
    assert "--quantize int8 is for the CPU; ignored for OnGPU on cuda" in caplog.text


def test_a_model_the_calibration_cannot_run_is_logged_and_left_as_it_is(caplog):
    """An SDXL refiner (no first text encoder) cannot run the calibration prompts: it stays unquantized."""
    own = LatentDiffusionPipeline.from_pretrained(MODEL)
    own.text_encoder = None
    with caplog.at_level("WARNING", logger="latentdiff.serve"):
        apply_switches(own, ServeSettings(quantize="int8-static"))
    assert "--quantize int8-static: LatentDiffusionPipeline is left unquantized: a pipeline without a text " \
           "encoder needs a calibration function" in caplog.text
    assert switch_params(own) == {}


def test_int8_static_with_controlnets_is_refused_at_start(tmp_path, monkeypatch, capsys):
    """int8-static calibrates a model's UNet when it loads; --controlnet-dir lets requests add hints later that the
    calibration never saw (`latentdiff generate` has its hint first and calibrates with it): `latentdiff serve`
    refuses the pair before loading anything, naming the model and the flags; dynamic int8 (no calibration) is
    accepted."""
    import uvicorn

    from latentdiff.cli.main import build_parser, main
    from latentdiff.cli.serve import settings_from
    from latentdiff.serve import models

    argv = ["serve", "--controlnet-dir", str(tmp_path), "--device", "cpu", "--model", MODEL]
    with pytest.raises(UsageError) as error:
        settings_from(build_parser().parse_args([*argv, "--quantize", "int8-static"]))
    assert str(error.value) == (
        f"int8-static calibrates the UNet of {MODEL} when it loads, on prompts alone, and never sees the control "
        "images requests bring later; where: --quantize; expected: --quantize int8 (with --dtype float32), no "
        "--quantize, or no --controlnet-dir; found: --quantize int8-static with --controlnet-dir")
    assert settings_from(build_parser().parse_args([*argv, "--quantize", "int8"])).quantize == "int8"
    assert settings_from(build_parser().parse_args(argv)).quantize is None
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: pytest.fail("served"))
    monkeypatch.setattr(models, "load_checkpoint", lambda *a, **k: pytest.fail("loaded"))
    assert main([*argv, "--quantize", "int8-static"]) == 2
    assert "where: --quantize" in capsys.readouterr().err
    # the same check where the server loads a model (ServeSettings built in Python): before its UNet is touched
    own = LatentDiffusionPipeline.from_pretrained(MODEL)
    with pytest.raises(UsageError, match=r"the UNet of m\.safetensors when it loads.*with --controlnet-dir"):
        apply_switches(own, ServeSettings(quantize="int8-static", controlnet_dirs=(tmp_path,)), name="m.safetensors")
    assert switch_params(own) == {}
