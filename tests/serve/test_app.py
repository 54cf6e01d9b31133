"""What every route shares: basic auth, the body bound, errors as JSON (never a traceback)."""
from __future__ import annotations

import base64

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from latentdiff.errors import InputError
from latentdiff.serve.app import BasicAuth, BodyLimit, error_body
from latentdiff.serve.requests import RequestError


def tiny_app(*, limit=1000, auth=()):
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.get("/ping")
    def ping() -> dict:
        return {"ok": True}

    app.add_middleware(BodyLimit, limit=limit)
    if auth:
        app.add_middleware(BasicAuth, credentials=auth)
    return app


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_a_body_past_the_bound_is_413_by_its_length_or_as_it_streams():
    client = TestClient(tiny_app(limit=1000))
    assert client.post("/echo", content=b"x" * 1000).json() == {"size": 1000}
    declared = client.post("/echo", content=b"x" * 1001)
    assert declared.status_code == 413 and "at most 1000 bytes" in declared.json()["detail"]

    def chunks():                      # no Content-Length: counted while it arrives
        for _ in range(20):
            yield b"x" * 100

    streamed = client.post("/echo", content=chunks())
    assert streamed.status_code == 413 and streamed.json()["field"] == "body"


@pytest.mark.parametrize("headers", [
    {}, basic("me", "wrong"), basic("other", "secret"), {"Authorization": "Basic !!!notbase64"},
    {"Authorization": "Bearer token"}, basic("me", "secret:extra"),
])
def test_auth_refuses_everything_else_with_401(headers):
    client = TestClient(tiny_app(auth=(("me", "secret"), ("you", "pw"))))
    response = client.get("/ping", headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Basic"


def test_auth_admits_each_pair():
    client = TestClient(tiny_app(auth=(("me", "secret"), ("you", "pw:with:colons"))))
    assert client.get("/ping", headers=basic("me", "secret")).json() == {"ok": True}
    assert client.get("/ping", headers=basic("you", "pw:with:colons")).json() == {"ok": True}
    assert client.post("/echo", content=b"x", headers=basic("you", "pw:with:colons")).status_code == 200


def test_an_error_body_names_field_expected_and_found():
    body = error_body(RequestError("steps is out of range", field="steps", expected="1 <= steps <= 150", found=400))
    assert body["field"] == "steps" and body["expected"] == "1 <= steps <= 150" and body["found"] == "400"
    assert "steps is out of range" in body["detail"]
    assert error_body(InputError("bad", where="prompt"))["where"] == "prompt"


def test_errors_name_the_flag_of_a_server_folder_never_its_path(tmp_path):
    from latentdiff.serve.settings import ServeSettings

    loras = tmp_path / "secret" / "loras"
    settings = ServeSettings(lora_dirs=(loras,), models_dir=tmp_path / "models")
    error = InputError("a <lora:...> tag names no file", where="<lora:x>", expected=f"a file in {[str(loras)]}",
                       found=f"{tmp_path / 'models' / 'x.safetensors'}")
    body = error_body(error, settings)
    assert str(tmp_path) not in str(body)
    assert "<--lora-dir>" in body["expected"] and "<--models-dir>/x.safetensors" in body["found"]
