"""`latentdiff convert` on LDM-layout folders (a `vqvae/` that holds an AutoencoderKL, as the built-in model's
does: a 156-key error before) and on built-in names; the round trip folder -> file -> folder -> file from the
command line gives the same tensors (issue 15)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from latentdiff.builtin import builtin_path
from latentdiff.convert.checkpoints import convert_checkpoint

SRC = Path(__file__).resolve().parents[2] / "src"


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "latentdiff", "convert", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_builtin_name_round_trips_through_the_command_line(tmp_path):
    folder = builtin_path("latentdiff/shapes-64")
    assert folder is not None
    first, back, again = tmp_path / "a.safetensors", tmp_path / "folder", tmp_path / "b.safetensors"
    done = cli("latentdiff/shapes-64", str(first))
    assert done.returncode == 0, done.stderr[-2000:]
    done = cli(str(first), str(back), "--tokenizer", str(folder / "tokenizer"))
    assert done.returncode == 0, done.stderr[-2000:]
    done = cli(str(back), str(again))
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_file(first), load_file(again)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the autoencoder in vqvae/ is a KL one: it lands under first_stage_model as a KL autoencoder's keys
    assert any(k.startswith("first_stage_model.quant_conv") for k in a)
    assert not any(k.startswith("first_stage_model.quantize") for k in a)


def test_an_ldm_folder_converts_by_its_parts_classes(tmp_path):
    folder = builtin_path("latentdiff/shapes-64")
    assert folder is not None
    out = convert_checkpoint(folder, tmp_path / "c.safetensors", progress=False)
    state = load_file(out)
    vae = load_file(next((folder / "vqvae").glob("*.safetensors")))
    assert sum(k.startswith("first_stage_model.") for k in state) == len(vae)


def test_a_long_list_of_unmatched_keys_is_cut_to_the_first_few_with_a_count():
    import pytest

    from latentdiff.convert.keymap import Rename, apply_keymap
    from latentdiff.errors import CheckpointError

    state = {f"vqvae/encoder.block.{i}.weight": torch.ones(1) for i in range(156)}
    with pytest.raises(CheckpointError) as err:
        apply_keymap(state, (Rename("a.{p}", "b.{p}"),), source="to_single_file")
    assert "156 key(s)" in str(err.value) and "and 148 more" in str(err.value)
    assert len(str(err.value)) < 1000
