"""`latentdiff serve`: flags checked before anything loads, loopback unless --api-auth, and the real command
serving the built-in model offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from latentdiff.cli.main import main
from tests._support.server import free_port


@pytest.fixture
def no_server(monkeypatch):
    """uvicorn.run recorded instead of run; the model load skipped."""
    import uvicorn

    from latentdiff.serve import models

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setattr(models.ModelCatalog, "pipeline", lambda self, name, vae=None: None)
    return calls


@pytest.mark.parametrize(("args", "message"), [
    (["--host", "0.0.0.0"], "needs --api-auth"),
    (["--host", "192.168.1.5"], "needs --api-auth"),
    (["--api-auth", "nopassword"], "user:password pairs"),
    (["--port", "70000"], "--port is out of range"),
    (["--max-batch", "0"], "--max-batch is out of range"),
    (["--models-dir", "/no/such/folder"], "no such folder"),
    (["--lora-dir", "/no/such/folder"], "no such folder"),
])
def test_bad_flags_are_one_error_line_before_anything_loads(no_server, capsys, args, message):
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not no_server


@pytest.mark.parametrize(("args", "host"), [
    ([], "127.0.0.1"),
    (["--host", "::1"], "::1"),
    (["--host", "0.0.0.0", "--api-auth", "me:secret"], "0.0.0.0"),
    (["--host", "0.0.0.0", "--insecure-no-auth"], "0.0.0.0"),
])
def test_binds_loopback_unless_told_otherwise_with_auth(no_server, args, host):
    assert main(["serve", "--port", "7999", *args]) == 0
    ((app, options),) = no_server
    assert options["host"] == host and options["port"] == 7999
    assert app.state.settings.api_auth == ((("me", "secret"),) if "--api-auth" in args else ())


def test_the_command_serves_the_built_in_model_offline(tmp_path):
    port = free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "latentdiff", "serve", "--port", str(port), "--max-batch", "1"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/sdapi/v1/sd-models", timeout=5) as response:
                    models = json.load(response)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    output = server.stdout.read() if server.stdout else ""
                    raise AssertionError(f"the server did not start: {output}") from None
                time.sleep(0.3)
        assert any("shapes-64" in m["title"] for m in models)
        body = json.dumps({"prompt": "a red circle", "steps": 4, "seed": 3}).encode()
        post = urllib.request.Request(f"{url}/sdapi/v1/txt2img", data=body,
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=120) as response:
            result = json.load(response)
        assert len(result["images"]) == 1 and json.loads(result["info"])["all_seeds"] == [3]
    finally:
        server.terminate()
        server.wait(timeout=30)
