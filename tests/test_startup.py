"""Start-up: the first load freezes the objects alive at that moment out of the cyclic garbage collector
(latentdiff.utils.startup.freeze_startup_objects), once per process, only after torch is imported, and not
with LATENTDIFF_GC_FREEZE=0. Each case runs in a fresh interpreter: freezing is process-wide."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests._support.tiny_builtin import make_tiny_shapes_model

CHILD = """
import gc, json, sys
import latentdiff.hub as hub
before = gc.get_freeze_count()
hub.resolve(sys.argv[1])                          # a path: torch not imported yet, so nothing is frozen
no_torch = gc.get_freeze_count()
torch_loaded_early = "torch" in sys.modules
from latentdiff import LatentDiffusionPipeline
pipe = LatentDiffusionPipeline.from_pretrained(sys.argv[1])
first = gc.get_freeze_count()
garbage = []
garbage.append(garbage)                           # a cycle made after the freeze: still collected
del garbage
collected = gc.collect()
LatentDiffusionPipeline.from_pretrained(sys.argv[1])
print(json.dumps(dict(before=before, no_torch=no_torch, torch_loaded_early=torch_loaded_early, first=first,
                      second=gc.get_freeze_count(), collected=collected)))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_shapes_model(tmp_path_factory.mktemp("startup") / "shapes-64")


def child(folder, **env):
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_first_load_freezes_once_after_torch(folder):
    got = child(folder, LATENTDIFF_GC_FREEZE="1")
    assert got["before"] == 0
    assert not got["torch_loaded_early"] and got["no_torch"] == 0
    assert got["first"] > 10_000                   # torch's objects and ours
    assert got["second"] == got["first"]           # once per process: a second load freezes nothing new
    assert got["collected"] >= 1


def test_freeze_can_be_turned_off(folder):
    got = child(folder, LATENTDIFF_GC_FREEZE="0")
    assert got["first"] == 0 and got["second"] == 0
