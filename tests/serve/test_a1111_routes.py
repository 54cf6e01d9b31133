"""The /sdapi/v1 routes: FastAPI's TestClient against create_app, and a real server driven by the `webuiapi` package
(an A1111 client written by others). Served pixels are compared bit for bit with the Python API called directly on
the same seed and settings (max_batch=1: every image is its own call, as the user's)."""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from latentdiff.diffusion.samplers.names import sampler_from_name
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.serve import routes_a1111
from latentdiff.serve.app import create_app
from latentdiff.serve.settings import ServeSettings
from latentdiff.utils.infotext import parse_infotext
from tests._support.lora import kohya, targets
from tests._support.server import running_server

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "latentdiff/shapes-64"
STEPS = 6
PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def pipe():
    return LatentDiffusionPipeline.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, pipe):
    root = tmp_path_factory.mktemp("a1111")
    (root / "loras").mkdir()
    save_file(kohya(targets(pipe.unet), seed=1), root / "loras" / "detail.safetensors")
    pipe.save_pretrained(root / "models" / "copy")     # a second checkpoint: the same weights, another name
    return root


@pytest.fixture(scope="module")
def settings(folders):
    return ServeSettings(max_batch=1, batch_wait_s=0.0, lora_dirs=(folders / "loras",), models_dir=folders / "models",
                         outputs_dir=folders / "outputs", max_body_bytes=1_000_000, max_image_bytes=100_000)


@pytest.fixture(scope="module")
def client(settings):
    torch.set_num_threads(1)
    with TestClient(create_app(settings)) as c:
        yield c


def reference(pipe, prompt, seed, *, sampler=None, lora_dir=None, **kw):
    """The Python API's image for `seed`: what the server must send back, pixel for pixel."""
    base = pipe.sampler
    if sampler is not None:
        pipe.sampler = sampler_from_name(sampler, base=base)
    try:
        call = dict(num_inference_steps=STEPS, guidance_scale=7.0, height=64, width=64, progress=False,
                    generator=[torch.Generator().manual_seed(seed)], lora_dirs=[lora_dir] if lora_dir else None) | kw
        return np.asarray(pipe(prompt, **call).images[0])
    finally:
        pipe.sampler = base


def pixels(encoded):
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


def post(client, path, body, **kw):
    return client.post(f"/sdapi/v1/{path}", json=body, **kw)


# ---- TestClient ---------------------------------------------------------------------------------------------------
def test_txt2img_gives_the_python_apis_images_with_their_parameters(client, pipe, folders):
    body = {"prompt": PROMPT, "steps": STEPS, "seed": 21, "n_iter": 2, "width": 64, "height": 64,
            "restore_faces": True, "alwayson_scripts": {}}
    answer = post(client, "txt2img", body)
    assert answer.status_code == 200, answer.text
    out = answer.json()
    info = json.loads(out["info"])
    assert info["all_seeds"] == [21, 22] and info["ignored"] == ["alwayson_scripts", "restore_faces"]
    assert info["sampler_name"] == "DDIM" and info["sd_model_name"] == "latentdiff_shapes-64"   # the model's own
    for i, encoded in enumerate(out["images"]):
        got, text = pixels(encoded)
        assert np.array_equal(got, reference(pipe, PROMPT, 21 + i))
        parsed = parse_infotext(text["parameters"], where="test")
        assert parsed.prompt == PROMPT and text["parameters"] == info["infotexts"][i]
        assert {k: parsed.fields[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model")} == {
            "Steps": "6", "Sampler": "DDIM", "CFG scale": "7", "Seed": str(21 + i), "Size": "64x64", "Model": MODEL}
        assert str(folders) not in text["parameters"] + text["latentdiff"]
    assert out["parameters"]["restore_faces"] is True and out["parameters"]["sampler_index"] == "Euler"
    png = post(client, "png-info", {"image": "data:image/png;base64," + out["images"][0]}).json()
    assert (png["info"], png["parameters"]["Seed"], png["parameters"]["Size-1"]) == (info["infotexts"][0], "21", "64")


def test_txt2img_with_unipc(client, pipe):
    """A1111's "UniPC" sampler (latentdiff's uni_pc: bh1, third order) gives the Python API's image."""
    body = {"prompt": PROMPT, "steps": STEPS, "seed": 4, "width": 64, "height": 64, "sampler_name": "UniPC"}
    answer = post(client, "txt2img", body)
    assert answer.status_code == 200, answer.text
    got, text = pixels(answer.json()["images"][0])
    assert np.array_equal(got, reference(pipe, PROMPT, 4, sampler="UniPC"))
    assert parse_infotext(text["parameters"], where="test").fields["Sampler"] == "UniPC"


def test_hires_fix_and_inpainting_give_the_python_apis_images(client, pipe):
    from latentdiff.pipelines.hires import hires_fix
    from latentdiff.pipelines.inpaint import InpaintPipeline

    body = {"prompt": PROMPT, "steps": STEPS, "seed": 31, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent",
            "hr_second_pass_steps": 3, "denoising_strength": 0.5}
    answer = post(client, "txt2img", body)
    assert answer.status_code == 200, answer.text
    got, text = pixels(answer.json()["images"][0])
    want = hires_fix(pipe, PROMPT, scale=1.5, steps=3, strength=0.5, upscaler="latent", height=64, width=64,
                     num_inference_steps=STEPS, guidance_scale=7.0, generator=[torch.Generator().manual_seed(31)],
                     progress=False).images[0]
    assert got.shape == (96, 96, 3) and np.array_equal(got, np.asarray(want))
    fields = parse_infotext(text["parameters"], where="hires").fields
    assert (fields["Hires upscale"], fields["Hires steps"], fields["Denoising strength"]) == ("1.5", "3", "0.5")

    init = Image.fromarray(reference(pipe, PROMPT, 1))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    encode = {k: base64.b64encode(_png(v)).decode() for k, v in (("init", init), ("mask", mask))}
    answer = post(client, "img2img", {"prompt": PROMPT, "steps": STEPS, "seed": 9, "init_images": [encode["init"]],
                                      "mask": encode["mask"], "mask_blur": 0, "denoising_strength": 0.8})
    assert answer.status_code == 200, answer.text
    want = InpaintPipeline.from_pipe(pipe)(PROMPT, init, mask, height=64, width=64, strength=0.8,
                                           num_inference_steps=STEPS, guidance_scale=7.0, progress=False,
                                           generator=[torch.Generator().manual_seed(9)]).images[0]
    assert np.array_equal(pixels(answer.json()["images"][0])[0], np.asarray(want))


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_options_are_echoed_and_switch_the_model(client, pipe):
    options = client.get("/sdapi/v1/options").json()
    assert (options["sd_model_checkpoint"], options["CLIP_stop_at_last_layers"], options["sd_vae"]) == (
        MODEL, 1, "Automatic")
    assert post(client, "options", {"CLIP_stop_at_last_layers": 2, "my_ui_setting": [1, 2],
                                    "sd_model_checkpoint": "copy"}).status_code == 200
    options = client.get("/sdapi/v1/options").json()
    assert (options["sd_model_checkpoint"], options["CLIP_stop_at_last_layers"], options["my_ui_setting"]) == (
        "copy", 2, [1, 2])
    info = json.loads(post(client, "txt2img", {"prompt": PROMPT, "steps": STEPS, "seed": 3}).json()["info"])
    # the built-in model's LDMBert has no layers to skip: the server-wide option does not apply to it
    assert (info["sd_model_name"], info["clip_skip"], info["width"]) == ("copy", 1, 64)
    assert info["ignored"] == ["options.CLIP_stop_at_last_layers"] and "Clip skip" not in info["infotexts"][0]
    refused = post(client, "txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert (refused.status_code, refused.json()["field"]) == (422, "override_settings.CLIP_stop_at_last_layers")
    refused = post(client, "options", {"sd_model_checkpoint": "../../etc/passwd", "CLIP_stop_at_last_layers": 1})
    assert refused.status_code == 422 and refused.json()["field"] == "sd_model_checkpoint"
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2   # nothing applied
    assert post(client, "options", {"CLIP_stop_at_last_layers": 1, "sd_model_checkpoint": MODEL}).status_code == 200
    answer = post(client, "txt2img", {"prompt": PROMPT, "steps": STEPS, "seed": 4,
                                      "override_settings": {"sd_model_checkpoint": "copy"}}).json()
    assert json.loads(answer["info"])["sd_model_name"] == "copy"
    assert np.array_equal(pixels(answer["images"][0])[0], reference(pipe, PROMPT, 4))   # the same weights
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == MODEL        # for that request only


@pytest.mark.parametrize("path, body, status, field", [
    ("txt2img", b"{not json", 422, "body"), ("txt2img", b"\xff\xfe{}", 422, "body"),
    ("txt2img", b"[" * 5000 + b"]" * 5000, 422, None),
    ("txt2img", b'{"seed": 1' + b"0" * 5000 + b"}", 422, "body"), ("txt2img", b"x" * 1_100_000, 413, "body"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, 422,
     "override_settings.sd_model_checkpoint"),
    ("txt2img", {"prompt": "x <lora:../../etc/passwd:0.8>"}, 422, "prompt"),
    ("txt2img", {"sampler_name": "Nope"}, 422, "sampler_name"), ("txt2img", {"width": 4096}, 422, "width"),
    ("txt2img", {"batch_size": 2}, 422, "batch_size"), ("txt2img", {"cfg_scale": "NaN"}, 422, "cfg_scale"),
    ("img2img", {"init_images": ["@@@"]}, 422, "init_images[0]"),
    ("img2img", {"init_images": [base64.b64encode(b"GIF89a broken").decode()]}, 422, "init_images[0]"),
    ("img2img", {"init_images": ["A" * 200_000]}, 413, "init_images[0]"),
    ("png-info", {"image": "not an image"}, 422, "image"), ("options", {"sd_vae": "../vae.pt"}, 422, "sd_vae"),
    ("options", {"CLIP_stop_at_last_layers": "2"}, 422, "CLIP_stop_at_last_layers"),
])
def test_bad_requests_are_json_errors_naming_the_field(client, path, body, status, field):
    answer = (client.post(f"/sdapi/v1/{path}", content=body, headers={"content-type": "application/json"})
              if isinstance(body, bytes) else post(client, path, body))
    assert answer.status_code == status, answer.text
    assert "Traceback" not in answer.text and "detail" in answer.json()
    if field is not None:
        assert answer.json()["field"] == field


def test_stored_options_are_bounded(client):
    assert post(client, "options", {f"a{i}": "v" * 1000 for i in range(600)}).status_code == 200
    answer = post(client, "options", {f"b{i}": "v" * 1000 for i in range(600)})
    assert (answer.status_code, answer.json()["field"]) == (422, "body")
    assert "b0" not in client.get("/sdapi/v1/options").json()
    assert post(client, "options", {f"a{i}": None for i in range(600)}).status_code == 200


def test_nan_in_the_json_is_refused(client):
    answer = client.post("/sdapi/v1/txt2img", content=b'{"cfg_scale": NaN}',
                         headers={"content-type": "application/json"})
    assert (answer.status_code, answer.json()["field"]) == (422, "cfg_scale")


def test_the_lists_and_the_connect_time_routes(client, folders):
    get = {path: client.get(f"/sdapi/v1/{path}") for path in (
        "samplers", "schedulers", "upscalers", "latent-upscale-modes", "sd-models", "sd-vae", "loras", "embeddings",
        "progress", "cmd-flags", "memory", "prompt-styles", "face-restorers", "hypernetworks", "scripts")}
    assert {path: r.status_code for path, r in get.items()} == dict.fromkeys(get, 200)
    assert "DPM++ 2M Karras" in [s["name"] for s in get["samplers"].json()]
    assert {"automatic", "karras"} <= {s["name"] for s in get["schedulers"].json()}
    assert [m["title"] for m in get["sd-models"].json()] == [MODEL, "copy"]
    assert [(x["name"], x["path"]) for x in get["loras"].json()] == [("detail", "detail.safetensors")]
    assert get["progress"].json()["state"]["job_count"] == 0 and get["progress"].json()["progress"] == 0
    assert get["prompt-styles"].json() == [] and get["scripts"].json() == {"txt2img": [], "img2img": []}
    assert str(folders) not in "".join(r.text for r in get.values())
    for path in ("refresh-checkpoints", "refresh-loras", "interrupt", "skip"):
        assert client.post(f"/sdapi/v1/{path}").status_code == 200


def test_save_images_writes_numbered_pngs_without_server_paths(client, settings, folders):
    answer = post(client, "txt2img", {"prompt": PROMPT, "steps": STEPS, "seed": 77, "save_images": True,
                                      "send_images": False}).json()
    assert answer["images"] == [] and json.loads(answer["info"])["ignored"] == []
    files = sorted(settings.outputs_dir.glob("*.png"))
    assert [f.name for f in files][-1].endswith("-77.png")
    with Image.open(files[-1]) as png:
        assert parse_infotext(png.text["parameters"], where="file").fields["Seed"] == "77"
        assert str(folders) not in png.text["parameters"] + png.text["latentdiff"]


def test_every_route_needs_the_credentials_when_api_auth_is_set(settings):
    import dataclasses

    app = create_app(dataclasses.replace(settings, api_auth=(("user", "secret"),)))
    paths = sorted({route.path for route in routes_a1111.router.routes}) + ["/", "/docs", "/openapi.json",
                                                                            "/v1/models", "/no/such/route"]
    assert len(paths) > 30
    with TestClient(app) as client:
        for path in paths:
            for method in ("GET", "POST"):
                answer = client.request(method, path, json={})
                assert answer.status_code == 401, (method, path)
                assert answer.json()["detail"] and answer.headers["www-authenticate"] == "Basic"
        assert client.get("/sdapi/v1/samplers", auth=("user", "wrong")).status_code == 401
        assert client.get("/sdapi/v1/samplers", auth=("user", "secret")).status_code == 200
        assert client.get("/sdapi/v1/options", auth=("user", "secret")).status_code == 200


# ---- a real server and the webuiapi package -----------------------------------------------------------------------
def test_webuiapi_drives_a_real_server(settings, pipe, folders):
    import webuiapi

    prompt = f"{PROMPT} <lora:detail:0.8>"
    with running_server(settings) as url:
        api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler="DPM++ 2M Karras", steps=STEPS)
        result = api.txt2img(prompt=prompt, seed=5, width=64, height=64, cfg_scale=7.0)
        expected = reference(pipe, prompt, 5, sampler="DPM++ 2M Karras", lora_dir=folders / "loras")
        assert np.array_equal(np.asarray(result.image.convert("RGB")), expected)
        assert not np.array_equal(expected, reference(pipe, PROMPT, 5, sampler="DPM++ 2M Karras"))  # the LoRA acts
        parsed = parse_infotext(result.image.info["parameters"], where="webuiapi")
        assert parsed.prompt == prompt and (parsed.fields["Sampler"], parsed.fields["Schedule type"]) == (
            "DPM++ 2M", "Karras")
        assert result.info["all_seeds"] == [5] and "eta" in result.info["ignored"]   # webuiapi sends eta 1
        assert api.png_info(result.image).info == result.image.info["parameters"]

        init = Image.fromarray(expected)
        again = api.img2img(images=[init], prompt=PROMPT, seed=8, width=64, height=64, denoising_strength=0.6,
                            sampler_name="Euler a", cfg_scale=7.0)
        img2img = ImageToImagePipeline.from_pipe(pipe)
        img2img.sampler = sampler_from_name("Euler a", base=pipe.sampler)
        want = img2img(PROMPT, img2img.preprocess_image(init, size=(64, 64)), strength=0.6, num_inference_steps=STEPS,
                       guidance_scale=7.0, generator=[torch.Generator().manual_seed(8)], progress=False).images[0]
        assert np.array_equal(np.asarray(again.image.convert("RGB")), np.asarray(want))

        api.set_options({"CLIP_stop_at_last_layers": 2})
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        api.set_options({"CLIP_stop_at_last_layers": 1})
        assert "DPM++ 2M Karras" in api.util_get_sampler_names() and api.util_get_model_names() == sorted(
            [MODEL, "copy"])
        _interrupt_a_running_job(api)


def _interrupt_a_running_job(api):
    """A long job, interrupted once /progress shows it sampling: it answers early with the one image it had."""
    answer: dict = {}
    worker = threading.Thread(target=lambda: answer.update(r=api.txt2img(prompt=PROMPT, seed=1, width=64, height=64,
                                                                           steps=150, n_iter=8, cfg_scale=7.0)))
    started = time.monotonic()
    worker.start()
    seen = None
    while time.monotonic() - started < 60:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] > 0 and progress["current_image"]:
            seen = progress
            break
        time.sleep(0.02)
    assert seen is not None and seen["state"]["job_count"] >= 1 and 0 < seen["progress"] < 1
    with Image.open(io.BytesIO(base64.b64decode(seen["current_image"]))) as preview:   # the live preview
        assert preview.format == "PNG" and min(preview.size) > 0
    api.interrupt()
    worker.join(timeout=60)
    result = answer["r"]
    assert result.info["interrupted"] is True and len(result.images) < 8
    assert api.get_progress()["state"]["job_count"] == 0
