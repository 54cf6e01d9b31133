"""A Hub look-up that fails for lack of network says so, not "(offline mode)" when HF_HUB_OFFLINE is not set
(issue 15); with HF_HUB_OFFLINE=1 it names offline mode. Run in a subprocess: huggingface_hub reads its endpoint
at import time, and the endpoint here is a closed local port (no network is used)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CODE = """
import tempfile
from latentdiff import hub
from latentdiff.errors import CheckpointError
try:
    hub.resolve("someone/some-model", cache_dir=tempfile.mkdtemp())
except CheckpointError as e:
    print(e)
"""


@pytest.mark.parametrize("offline", [False, True])
def test_a_failed_hub_lookup_names_its_cause(offline):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")])
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=120)
    message = out.stdout.strip()
    assert "where: someone/some-model" in message, out.stderr[-2000:]
    if offline:
        assert "(offline mode)" in message and "no network" not in message
    else:
        assert "no network" in message and "offline mode" not in message
