"""OpenAI's images API, driven by the real `openai` package against a running server: the images are the ones the
Python API gives for the same seed and settings (bit-identical pixels, max_batch=1), the url format serves them,
models.list lists the catalog, and errors arrive as the package's typed exceptions."""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from latentdiff.serve.settings import ServeSettings
from tests._support.server import running_server

MODEL = "latentdiff/shapes-64"
PROMPT = "a red circle on the left, blue background"
NEGATIVE = "a green square"
STEPS, GUIDANCE = 5, 2.0


@pytest.fixture(scope="module")
def loras(tmp_path_factory, pipe):
    from safetensors.torch import save_file

    from tests._support.lora import kohya, targets

    folder = tmp_path_factory.mktemp("loras")
    save_file(kohya(targets(pipe.unet), seed=1), folder / "detail.safetensors")
    return folder


@pytest.fixture(scope="module")
def url(loras):
    with running_server(ServeSettings(max_batch=1, max_steps=30, lora_dirs=(loras,))) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pipe():
    from latentdiff import LatentDiffusionPipeline

    return LatentDiffusionPipeline.from_pretrained(MODEL)


def reference(pipe, seed, *, sampler=None, prompt=PROMPT, lora_dirs=None, **call):
    """The image the Python API gives for `seed` (the server's settings, one image per call); `call`: more keywords
    of the call (cfg_truncation)."""
    from latentdiff.diffusion.samplers.names import sampler_from_name

    base = pipe.sampler
    if sampler is not None:
        pipe.sampler = sampler_from_name(sampler, base=base)
    try:
        image = pipe(prompt, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=STEPS,
                     guidance_scale=GUIDANCE, generator=[torch.Generator().manual_seed(seed)],
                     lora_dirs=lora_dirs, **call).images[0]
    finally:
        pipe.sampler = base
    return np.asarray(image.convert("RGB"))


def pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def extras(seed, **more):
    return {"seed": seed, "steps": STEPS, "guidance_scale": GUIDANCE, "negative_prompt": NEGATIVE, **more}


def test_b64_json_images_are_the_python_api_images(client, pipe):
    response = client.images.generate(model=MODEL, prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
                                      quality="hd", style="vivid", extra_body=extras(11))
    assert len(response.data) == 2 and response.created > 0
    for i, item in enumerate(response.data):
        assert item.url is None and item.revised_prompt == PROMPT
        png = base64.b64decode(item.b64_json)
        np.testing.assert_array_equal(pixels(png), reference(pipe, 11 + i))
        text = Image.open(io.BytesIO(png)).text
        assert f"Seed: {11 + i}" in text["parameters"] and PROMPT in text["parameters"]
        assert "/root" not in png.decode("latin-1") and "/tmp" not in png.decode("latin-1")
    extra = response.model_extra["latentdiff"]
    assert extra["seeds"] == [11, 12] and extra["ignored"] == ["quality", "style"] and extra["model"] == MODEL


def test_a1111_sampler_name_and_the_default_model(client, pipe):
    """`sampler` takes A1111's names; OpenAI's own model names mean the server's current model."""
    response = client.images.generate(model="dall-e-3", prompt=PROMPT, size="64x64",
                                      extra_body=extras(5, sampler="Euler a"))
    np.testing.assert_array_equal(pixels(base64.b64decode(response.data[0].b64_json)),
                                  reference(pipe, 5, sampler="Euler a"))
    assert "Sampler: Euler a" in Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).text[
        "parameters"]


def test_a_lora_tag_in_the_prompt(client, pipe, loras):
    """`<lora:NAME:W>` as A1111 clients write it: the Python API's image with that LoRA; no server path in the PNG."""
    prompt = f"{PROMPT} <lora:detail:0.8>"
    png = base64.b64decode(client.images.generate(prompt=prompt, size="64x64", extra_body=extras(9)).data[0].b64_json)
    expected = reference(pipe, 9, prompt=prompt, lora_dirs=[loras])
    np.testing.assert_array_equal(pixels(png), expected)
    assert not np.array_equal(expected, reference(pipe, 9))   # the LoRA changes the image
    assert str(loras) not in png.decode("latin-1") and "detail" in Image.open(io.BytesIO(png)).text["parameters"]


def test_cfg_truncation_is_the_python_api_s(client, pipe):
    """`cfg_truncation` in extra_body, as the A1111 routes take it: the Python API's image with it, in the PNG."""
    png = base64.b64decode(client.images.generate(prompt=PROMPT, size="64x64",
                                                  extra_body=extras(4, cfg_truncation=0.4)).data[0].b64_json)
    expected = reference(pipe, 4, cfg_truncation=0.4)
    np.testing.assert_array_equal(pixels(png), expected)
    assert not np.array_equal(expected, reference(pipe, 4))   # the truncation changes the image
    assert json.loads(Image.open(io.BytesIO(png)).text["latentdiff"])["cfg_truncation"] == 0.4


def test_url_format_serves_the_png(client, url, pipe):
    response = client.images.generate(prompt=PROMPT, size="auto", response_format="url", extra_body=extras(3))
    link = response.data[0].url
    assert response.data[0].b64_json is None and link.startswith(url + "/v1/images/files/") and link.endswith(".png")
    fetched = httpx.get(link)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(pixels(fetched.content), reference(pipe, 3))   # "auto": the model's 64 x 64
    file_id = link.rsplit("/", 1)[1].removesuffix(".png")
    for wrong in (file_id[:-1] + ("A" if file_id[-1] != "A" else "B") + ".png", file_id + ".txt", "..png"):
        missing = httpx.get(f"{url}/v1/images/files/{wrong}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{url}/v1/images/files/..%2F..%2Fetc%2Fpasswd").status_code == 404   # no route: ids only


def test_models_list(client):
    models = client.models.list()
    assert MODEL in [m.id for m in models.data]
    entry = next(m for m in models.data if m.id == MODEL)
    assert entry.object == "model" and entry.owned_by == "latentdiff" and entry.created > 0
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize("arguments, param, code", [
    (dict(extra_body={"frobnicate": 1}), "frobnicate", "unknown_parameter"),
    (dict(size="64 by 64"), "size", "invalid_value"),
    (dict(model="../../etc/passwd"), "model", "invalid_value"),
    (dict(response_format="jpeg"), "response_format", "invalid_value"),
    (dict(extra_body={"steps": 31}), "steps", "invalid_value"),
    (dict(extra_body={"sampler": "Euler b"}), "sampler", "invalid_value"),
    (dict(extra_body={"seed": "seven"}), "seed", "invalid_value"),
    (dict(n=11), "n", "invalid_value"),
    (dict(extra_body={"cfg_truncation": 1.5}), "cfg_truncation", "invalid_value"),
    (dict(extra_body={"cfg_truncation": -0.1}), "cfg_truncation", "invalid_value"),
    (dict(extra_body={"cfg_truncation": "half"}), "cfg_truncation", "invalid_value"),
    (dict(extra_body={"cfg_truncation": True}), "cfg_truncation", "invalid_value"),
    (dict(prompt="a red circle <lora:../../etc/passwd:1>"), "prompt", "invalid_value"),
    (dict(size="63x64", extra_body={"steps": STEPS}), "width", "invalid_value"),
], ids=["unknown-key", "size", "traversal", "format", "max-steps", "sampler", "seed", "n", "cfg-truncation-above",
        "cfg-truncation-below", "cfg-truncation-text", "cfg-truncation-bool", "lora-traversal", "size-multiple"])
def test_errors_are_openai_errors(client, arguments, param, code):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**{"prompt": PROMPT, "size": "64x64", **arguments})
    error = caught.value
    assert error.status_code == 400 and error.param == param and error.code == code
    assert error.type == "invalid_request_error" and param in error.message


def test_error_messages_name_server_folders_by_their_flag(tmp_path):
    import json

    from latentdiff.errors import InputError
    from latentdiff.serve.openai_api import error_response
    from latentdiff.serve.requests import RequestError

    settings = ServeSettings(models_dir=tmp_path / "models", lora_dirs=(tmp_path / "loras",))
    for exc in (RequestError(f"cannot read {tmp_path}/models/a.safetensors", field="model"),
                InputError("no such file", where=f"{tmp_path}/loras/b.safetensors")):
        body = json.loads(error_response(exc, settings).body)["error"]
        assert str(tmp_path) not in json.dumps(body)
        assert "<--models-dir>/a.safetensors" in body["message"] or body["param"] == "<--lora-dir>/b.safetensors"


def test_malformed_json_is_a_400(url):
    answer = httpx.post(url + "/v1/images/generations", content=b"{not json",
                        headers={"content-type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"
    answer = httpx.post(url + "/v1/images/generations", json=["a list"])
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "body"


def test_auth_applies_to_the_openai_routes_and_a_full_queue_is_a_503():
    with running_server(ServeSettings(api_auth=(("user", "secret"),), max_queue=0)) as base:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0).models.list()
        token = base64.b64encode(b"user:secret").decode()
        allowed = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0,
                                default_headers={"Authorization": f"Basic {token}"})
        assert MODEL in [m.id for m in allowed.models.list().data]
        with pytest.raises(openai.InternalServerError) as caught:   # the package's class for 5xx
            allowed.images.generate(prompt=PROMPT, size="64x64")
        assert caught.value.status_code == 503 and caught.value.code == "server_busy"
        assert caught.value.type == "server_error" and caught.value.param == "queue"
