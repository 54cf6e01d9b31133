"""ControlNet through `latentdiff serve` as sd-webui-controlnet exposes it (serve/controlnet.py, controlnet_units.py,
routes_controlnet.py), driven by the real `webuiapi` client and plain HTTP on a tiny Stable Diffusion with tiny
random ControlNets in --controlnet-dir: the served pixels are the Python API's with the same hint, scale, step
range and seed; the extension's routes answer in its shapes; what is wrong is a 422 naming the field."""
from __future__ import annotations

import base64
import hashlib
import io
import json

import numpy as np
import pytest
import requests
import torch
import webuiapi
from PIL import Image

from latentdiff import ControlNet, LatentDiffusionPipeline, control
from latentdiff.diffusion.samplers import switch_sampler
from latentdiff.serve.settings import ServeSettings
from tests._support.parity import randomize_
from tests._support.sd import tiny_diffusers_pipeline
from tests._support.server import running_server

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle"
SIZE = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("serve-cn")
    sd = tiny_diffusers_pipeline(root / "build")
    sd.save_pretrained(root / "sd")
    for seed, name in ((0, "cn_edges"), (1, "cn_file")):
        torch.manual_seed(seed)
        cn = randomize_(diffusers.ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(16, 32)))
        cn.save_pretrained(root / "controlnets" / name)
    one = ControlNet.from_pretrained(root / "controlnets" / "cn_file")   # an original single file too
    one.save_single_file(root / "controlnets" / "cn_file.safetensors")
    import shutil

    shutil.rmtree(root / "controlnets" / "cn_file")
    other = diffusers.ControlNetModel(block_out_channels=(32, 64), down_block_types=(
        "CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=24, norm_num_groups=8,
        conditioning_embedding_out_channels=(16, 32), attention_head_dim=2)
    other.save_pretrained(root / "controlnets" / "cn_other_base")
    photo = Image.fromarray((torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(5)) * 255).byte().numpy())
    return root, photo


@pytest.fixture(scope="module")
def server(models):
    root, _ = models
    settings = ServeSettings(model=str(root / "sd"), controlnet_dirs=(root / "controlnets",), max_batch=1,
                             batch_wait_s=0.0)
    with running_server(settings) as url:
        yield url


def api(root, nets, *, init=None, **call):
    """The Python API's image for the same settings as the requests below (DDIM, 3 steps, seed 3, cfg 7)."""
    cns = [ControlNet.from_pretrained(root / "controlnets" / n) if (root / "controlnets" / n).is_dir()
           else ControlNet.from_single_file(root / "controlnets" / n) for n in nets]
    pipe = LatentDiffusionPipeline.from_pretrained(root / "sd", controlnet=cns[0] if len(cns) == 1 else cns)
    pipe.sampler = switch_sampler(pipe.sampler, "ddim")
    common = dict(num_inference_steps=3, guidance_scale=7.0, generator=[torch.Generator().manual_seed(3)],
                  progress=False, negative_prompt="")
    if init is not None:
        from latentdiff.pipelines.image_to_image import ImageToImagePipeline

        img2img = ImageToImagePipeline.from_pipe(pipe)
        tensor = img2img.preprocess_image(init, size=(SIZE, SIZE))
        return np.asarray(img2img(PROMPT, tensor, strength=0.75, **common, **call).images[0])
    return np.asarray(pipe(PROMPT, height=SIZE, width=SIZE, **common, **call).images[0])


def b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(encoded: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
        return np.asarray(image.convert("RGB"))


BODY = {"prompt": PROMPT, "width": SIZE, "height": SIZE, "steps": 3, "seed": 3, "cfg_scale": 7,
        "sampler_name": "DDIM"}


def test_webuiapi_unit_is_the_python_apis_image(server, models):
    root, photo = models
    client = webuiapi.WebUIApi(baseurl=f"{server}/sdapi/v1")
    listed = client.controlnet_model_list()
    assert sorted(n.split(" [")[0] for n in listed) == ["cn_edges", "cn_file", "cn_other_base"]   # folders: whole
    data = (root / "controlnets" / "cn_file.safetensors").read_bytes()   # A1111's short hash: 64 KiB at 1 MiB
    assert f"cn_file [{hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}]" in listed
    unit = webuiapi.ControlNetUnit(image=photo, module="canny", model="cn_edges", weight=0.8, threshold_a=100,
                                   threshold_b=200, guidance_start=0.0, guidance_end=0.5, resize_mode="Just Resize")
    # webuiapi's default eta is 1; its default alwayson_scripts dict is shared by every call: pass a fresh one
    result = client.txt2img(**BODY, eta=0.0, controlnet_units=[unit], alwayson_scripts={})
    hint = control.canny(control.fit(photo, (SIZE, SIZE), mode=0), low=100, high=200, grayscale=False)
    expected = api(root, ["cn_edges"], control_image=hint, controlnet_conditioning_scale=0.8,
                   control_guidance_end=0.5)
    assert np.array_equal(np.asarray(result.image.convert("RGB")), expected)
    assert len(result.images) == 2          # the unit's hint follows, as the extension appends its detected map
    assert np.array_equal(np.asarray(result.images[1].convert("RGB")), np.asarray(hint))
    recorded = json.loads(result.image.info["latentdiff"])["controlnet"]
    assert recorded == [{"model": "cn_edges", "module": "canny", "weight": 0.8, "guidance_start": 0.0,
                         "guidance_end": 0.5, "guess_mode": False, "resize_mode": 0}]
    assert "alwayson_scripts.ControlNet.args[0].processor_res" in result.info["ignored"]
    plain = requests.post(f"{server}/sdapi/v1/txt2img", json=BODY, timeout=60).json()
    assert not np.array_equal(pixels(plain["images"][0]), expected)      # the ControlNet acted


def test_two_units_guess_mode_hash_names_and_dict_images(server, models):
    root, photo = models
    names = requests.get(f"{server}/controlnet/model_list", timeout=10).json()["model_list"]
    titled = next(n for n in names if n.startswith("cn_file ["))
    units = [{"enabled": True, "image": {"image": b64(photo), "mask": None}, "module": "threshold",
              "threshold_a": 100, "model": "cn_edges", "resize_mode": "Crop and Resize",
              "control_mode": "ControlNet is more important"},
             {"enabled": False, "image": "not even an image", "model": "nothing"},        # disabled: skipped
             {"enabled": True, "image": b64(photo), "model": titled, "weight": 0.5, "guidance_start": 0.2,
              "resize_mode": 2, "control_mode": 2, "save_detected_map": False}]
    response = requests.post(f"{server}/sdapi/v1/txt2img", timeout=60,
                             json=BODY | {"alwayson_scripts": {"controlnet": {"args": units}}})
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert len(images) == 2                  # the second unit's hint is not sent (save_detected_map false)
    rgb = np.asarray(control.fit(photo, (SIZE, SIZE), mode=1))
    binary = Image.fromarray(np.repeat(((rgb.min(axis=2) > 100) * np.uint8(255))[:, :, None], 3, axis=2))
    expected = api(root, ["cn_edges", "cn_file.safetensors"],
                   control_image=[binary, control.fit(photo, (SIZE, SIZE), mode=2)],
                   controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.2],
                   control_guidance_end=[1.0, 1.0], guess_mode=True)
    assert np.array_equal(pixels(images[0]), expected)
    assert np.array_equal(pixels(images[1]), np.asarray(binary))


def test_img2img_unit_without_an_image_uses_the_init_image(server, models):
    root, photo = models
    unit = {"enabled": True, "model": "cn_edges", "module": "none", "resize_mode": "Just Resize"}
    response = requests.post(f"{server}/sdapi/v1/img2img", timeout=60, json=BODY | {
        "init_images": [b64(photo)], "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    assert response.status_code == 200, response.text
    init = control.fit(photo, (SIZE, SIZE), mode=0)
    expected = api(root, ["cn_edges"], init=init, control_image=init, controlnet_conditioning_scale=1.0)
    assert np.array_equal(pixels(response.json()["images"][0]), expected)


def test_the_extensions_routes(server, models):
    _, photo = models
    client = webuiapi.WebUIApi(baseurl=f"{server}/sdapi/v1")
    assert client.controlnet_version() == 3
    assert {"none", "canny", "threshold", "invert"} <= set(client.controlnet_module_list())
    detail = requests.get(f"{server}/controlnet/module_list", timeout=10).json()["module_detail"]
    assert [s["name"] for s in detail["canny"]["sliders"]] == ["Resolution", "Low Threshold", "High Threshold"]
    detected = client.controlnet_detect([photo], module="canny", threshold_a=50, threshold_b=150)
    assert detected.info == "Success" or detected.json.get("info") == "Success"
    edges = np.asarray(detected.images[0].convert("RGB"))
    assert np.array_equal(edges, np.asarray(control.canny(photo, low=50, high=150, grayscale=False)))
    inverted = requests.post(f"{server}/controlnet/detect", timeout=10, json={
        "controlnet_module": "invert", "controlnet_input_images": [b64(photo)]}).json()
    assert np.array_equal(pixels(inverted["images"][0]), 255 - np.asarray(photo))


@pytest.mark.parametrize("unit, field, words", [
    ({"model": "no_such_model"}, "model", "unknown ControlNet model"),
    ({"model": "cn_file [00000000]"}, "model", "hash"),
    ({"model": "../sd"}, "model", "path"),
    ({"module": "openpose_full"}, "module", "unknown ControlNet module"),
    ({"image": "bm90IGFuIGltYWdl"}, "image", "not"),
    ({"guidance_start": 0.6, "guidance_end": 0.6}, "guidance_end", "guidance_start"),
    ({"control_mode": "My prompt is more important"}, "control_mode", "not reproduced"),
    ({"resize_mode": "Stretch"}, "resize_mode", "bad value"),
    ({"weight": 3}, "weight", "bad value"),
    ({"model": "cn_other_base"}, "model", "cross_attention_dim"),
])
def test_bad_units_are_422s_naming_the_field(server, models, unit, field, words):
    _, photo = models
    body = {"enabled": True, "image": b64(photo), "model": "cn_edges"} | unit
    response = requests.post(f"{server}/sdapi/v1/txt2img", timeout=60,
                             json=BODY | {"alwayson_scripts": {"controlnet": {"args": [body]}}})
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["field"] == f"alwayson_scripts.controlnet.args[0].{field}", error
    assert words in error["detail"], error
    assert "Traceback" not in response.text and "/tmp" not in response.text


def test_detect_refuses_an_unknown_module(server):
    response = requests.post(f"{server}/controlnet/detect", timeout=10,
                             json={"controlnet_module": "depth_midas", "controlnet_input_images": []})
    assert response.status_code == 422 and response.json()["field"] == "controlnet_module"


def test_inpainting_takes_units_and_scripts_lists_controlnet(server, models):
    _, photo = models
    mask = Image.new("L", photo.size)
    mask.paste(255, (8, 8, 30, 30))
    unit = {"enabled": True, "image": b64(photo), "model": "cn_edges", "module": "canny"}
    response = requests.post(f"{server}/sdapi/v1/img2img", timeout=60, json=BODY | {
        "init_images": [b64(photo)], "mask": b64(mask), "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 2
    assert requests.get(f"{server}/sdapi/v1/scripts", timeout=10).json() == {"txt2img": ["controlnet"],
                                                                           "img2img": ["controlnet"]}


def test_the_flag_sets_the_folders(monkeypatch, tmp_path, capsys):
    import uvicorn

    from latentdiff.cli.main import main
    from latentdiff.serve import models

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.setattr(models.ModelCatalog, "pipeline", lambda self, name, vae=None: None)
    (tmp_path / "b").mkdir()
    assert main(["serve", "--controlnet-dir", str(tmp_path), "--controlnet-dir", str(tmp_path / "b")]) == 0
    assert apps[0].state.settings.controlnet_dirs == (tmp_path.resolve(), (tmp_path / "b").resolve())
    assert main(["serve", "--controlnet-dir", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err and len(apps) == 1


def test_an_interrupt_of_the_served_pipeline_reaches_its_controlled_copy():
    from latentdiff.serve.controlnet_units import ControlRequest
    from latentdiff.serve.render import with_control
    from latentdiff.serve.requests import ImageRequest

    class Pipe:
        _interrupt = True           # left over from an earlier interrupted call: reset before this one

        @classmethod
        def from_pipe(cls, pipe, **changes):
            copy = cls()
            copy.changes, copy._interrupt = changes, False
            return copy

    base = Pipe()
    unit = ControlRequest("cn", "none", Image.new("RGB", (8, 8)), 0.5, 0.0, 0.8, guess_mode=True, resize_mode=0)
    request = ImageRequest(model="m", prompt="p", control=(unit,))
    runner, args = with_control(base, Pipe, request, ["net"], {"callback": None})
    assert runner.changes == {"controlnet": "net"} and not base._interrupt
    assert (args["controlnet_conditioning_scale"], args["control_guidance_end"], args["guess_mode"]) == (0.5, 0.8, True)
    args["callback"](0, 1.0, None)
    assert not runner._interrupt
    base._interrupt = True          # what the engine's step callback does on /interrupt
    args["callback"](1, 0.5, None)
    assert runner._interrupt


def test_sdxl_units_are_the_sdxl_pipelines_image(tmp_path):
    import diffusers
    from fastapi.testclient import TestClient

    from latentdiff import StableDiffusionXLPipeline
    from latentdiff.serve.app import create_app
    from tests._support.sdxl import tiny_sdxl

    base = tiny_sdxl(tmp_path / "xl")
    torch.manual_seed(2)
    cn = randomize_(diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32)))
    cn.save_pretrained(tmp_path / "controlnets" / "xl_edges")
    hint = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    unit = {"enabled": True, "image": b64(hint), "model": "xl_edges", "weight": 0.7, "guidance_end": 0.75}
    settings = ServeSettings(model=str(tmp_path / "xl"), controlnet_dirs=(tmp_path / "controlnets",), max_batch=1,
                             batch_wait_s=0.0)
    with TestClient(create_app(settings)) as client:
        response = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 4, "steps": 3, "cfg_scale": 5,
                                                          "width": SIZE, "height": SIZE,
                                                          "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert response.status_code == 200, response.text
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl",
                                                     controlnet=ControlNet.from_pretrained(tmp_path / "controlnets"
                                                                                           / "xl_edges"))
    expected = pipe(PROMPT, height=SIZE, width=SIZE, negative_prompt="", num_inference_steps=3, guidance_scale=5.0,
                    generator=[torch.Generator().manual_seed(4)], progress=False, control_image=hint,
                    controlnet_conditioning_scale=0.7, control_guidance_end=0.75).images[0]
    assert np.array_equal(pixels(response.json()["images"][0]), np.asarray(expected))
