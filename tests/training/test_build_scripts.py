"""examples/train/build_shapes_64*.py, the scripts that built the shipped models, around their shared skeleton
(examples/train/shapes_build.py): each still parses its flags (the shared ones and its own), a folder goes into the
package atomically, and one build runs end to end at a toy size (the tiny autoencoder's: data, `latentdiff train`,
install) as its docstring says."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests._support import ROOT
from tests._support.training import EXAMPLES

SCRIPTS = sorted(path.name for path in EXAMPLES.glob("build_shapes_64*.py"))
OWN_FLAGS = {"build_shapes_64.py": ["--gpu", "--finetune-decoder", "--fit-seconds"],
             "build_shapes_64_lcm.py": ["--grid", "--evaluate", "--report", "--set"],
             "build_shapes_64_silhouette.py": ["--grid", "--set"],
             "build_shapes_64_tiny_autoencoder.py": ["--figure", "--set"]}


def script(name: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_four_scripts_are_there():
    assert set(OWN_FLAGS) == set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_parses_the_shared_and_its_own_flags(name):
    done = script(name, "--help")
    assert done.returncode == 0, done.stderr
    for flag in ["--images", "--install", "--eval-count", *OWN_FLAGS[name]]:
        assert flag in done.stdout, (name, flag)


def test_install_folder_replaces_the_target_whole(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from shapes_build import install_folder

    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (tmp_path / "model.tmp").mkdir()                    # left over from an interrupted install
    (tmp_path / "model.tmp" / "stale.txt").write_text("stale")

    def write(tmp):
        assert not tmp.exists()
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")

    install_folder(target, write)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and not (tmp_path / "model.tmp").exists()


@pytest.mark.slow   # ~8 s: two processes that import torch, two training steps
def test_the_tiny_autoencoder_build_runs_end_to_end_at_a_toy_size(tmp_path):
    installed = tmp_path / "installed"
    done = script("build_shapes_64_tiny_autoencoder.py", "--images", "48", "--eval-count", "0", "--install",
                  str(installed), "--set", "train.max_steps=2", "--set", "data.validation_split=16", "--set",
                  "sample.every_n_steps=0", "--set", "checkpoint.every_n_steps=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "latentdiff train tiny-autoencoder" in done.stdout and f"installed {installed}" in done.stdout
    assert (tmp_path / "runs" / "shapes-64-tiny-autoencoder" / "data").is_dir()
    assert sorted(p.name for p in installed.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
