"""`cfg_truncation` through the A1111 routes (latentdiff's key): a served image is the Python API's image with the
same `cfg_truncation`, bit for bit (txt2img and img2img), the PNG records it, requests that differ in it never
share a call, and a value outside [0, 1] (or not a number) is a 422 naming the key."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.serve.app import create_app
from latentdiff.serve.requests import ImageRequest
from latentdiff.serve.settings import ServeSettings

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


def test_requests_that_differ_in_cfg_truncation_never_share_a_call():
    a, b = (ImageRequest(model=MODEL, prompt=PROMPT, cfg_truncation=value) for value in (None, 0.5))
    assert a.batch_key() != b.batch_key()


@pytest.mark.parametrize("bad", [1.5, -0.1, "half", True, [0.5]])
def test_bad_cfg_truncation_is_a_422_naming_it(client, bad):
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "cfg_truncation": bad})
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "cfg_truncation" and "Traceback" not in answer.text
