"""Security (issue 14, e): every path that comes from a file resolves inside its root. A sharded weights index
naming `../../x.safetensors`, an absolute path, or a symlink out of the folder is refused with a CheckpointError
naming the index, the entry and where it points, before anything is read from there; a malformed index is a
CheckpointError too. A PNG's `--from` values that name files are plain strings, and a local path is announced."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from latentdiff.errors import CheckpointError, UsageError
from latentdiff.models.autoencoder_kl import AutoencoderKL
from tests._support.tiny import tiny_kl_config

INDEX = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def sharded(folder: Path, shard_name: str, *, weights_at: Path | None = None) -> tuple[Path, AutoencoderKL]:
    """A tiny autoencoder folder whose weights are one shard, named `shard_name` in the index; the weights file is
    moved to `weights_at` (default: the shard name inside the folder)."""
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_kl_config())
    model.save_pretrained(folder)
    target = weights_at or folder / shard_name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder / WEIGHTS, target)
    weight_map = dict.fromkeys(model.state_dict(), shard_name)
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, model


@pytest.mark.outcome("clear_error", fails_as="security")
def test_index_shard_with_dot_dot_is_refused(tmp_path):
    outside = tmp_path / "private.safetensors"   # another model's weights elsewhere on the machine
    folder, _ = sharded(tmp_path / "a" / "b" / "model", "../../../private.safetensors", weights_at=outside)
    with pytest.raises(CheckpointError) as raised:
        AutoencoderKL.from_pretrained(folder)
    message = str(raised.value)
    assert INDEX in message and "weight_map" in message and str(outside.resolve()) in message
    assert "outside" in message


@pytest.mark.outcome("clear_error", fails_as="security")
def test_index_shard_with_absolute_path_is_refused(tmp_path):
    outside = tmp_path / "elsewhere" / "private.safetensors"
    folder, _ = sharded(tmp_path / "model", str(outside), weights_at=outside)
    with pytest.raises(CheckpointError) as raised:
        AutoencoderKL.from_pretrained(folder)
    assert INDEX in str(raised.value) and str(outside) in str(raised.value) and "weight_map" in str(raised.value)


@pytest.mark.outcome("clear_error", fails_as="security")
def test_index_shard_symlink_out_of_the_folder_is_refused(tmp_path):
    outside = tmp_path / "private.safetensors"
    folder, _ = sharded(tmp_path / "model", "shard-1.safetensors", weights_at=outside)
    (folder / "shard-1.safetensors").symlink_to(outside)   # a plain name, but the link leaves the folder
    with pytest.raises(CheckpointError) as raised:
        AutoencoderKL.from_pretrained(folder)
    assert INDEX in str(raised.value) and str(outside.resolve()) in str(raised.value)


@pytest.mark.outcome("correct", fails_as="security")
def test_index_shards_inside_the_folder_load_also_through_an_inner_symlink(tmp_path):
    folder, model = sharded(tmp_path / "model", "shards/part-1.safetensors")
    (folder / "link.safetensors").symlink_to(folder / "shards" / "part-1.safetensors")   # stays inside: fine
    index = json.loads((folder / INDEX).read_text())
    (folder / INDEX).write_text(json.dumps({"weight_map": dict.fromkeys(index["weight_map"], "link.safetensors")}))
    loaded = AutoencoderKL.from_pretrained(folder)
    for (key, want), got in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(want, got), key


@pytest.mark.outcome("clear_error", fails_as="crash")
@pytest.mark.parametrize("index", [{"weight_map": ["diffusion_pytorch_model-1.safetensors"]}, {"metadata": {}},
                                   {"weight_map": {"encoder.conv_in.weight": 3}}, ["weight_map"], "{not json"])
def test_index_with_a_malformed_weight_map_is_refused(tmp_path, index):
    folder, _ = sharded(tmp_path / "model", "part.safetensors")
    (folder / INDEX).write_text(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(CheckpointError) as raised:
        AutoencoderKL.from_pretrained(folder)
    assert INDEX in str(raised.value)
    assert "weight_map" in str(raised.value) or "unreadable" in str(raised.value)


def png_with(tmp_path: Path, **params) -> Path:
    from PIL import Image

    from latentdiff.utils.images import save_png

    base = {"prompt": "a cat", "seed": 0, "n": 1, "model": "latentdiff/shapes-64"}
    return save_png(Image.new("RGB", (8, 8)), tmp_path / "in.png", params=base | params)


@pytest.mark.outcome("clear_error", fails_as="security")
@pytest.mark.parametrize("value", [["/etc", "passwd"], "models/\x00sd", "", {"path": "x"}])
def test_from_png_model_value_that_is_not_a_plain_path_is_refused(tmp_path, value):
    from latentdiff.cli.generate_settings import read_from_png

    png = png_with(tmp_path, model=value)
    with pytest.raises(UsageError) as raised:
        read_from_png(str(png))
    assert f"{png}: model" in str(raised.value)


@pytest.mark.outcome("correct", fails_as="security")
def test_from_png_naming_a_local_folder_says_so_before_reading_it(tmp_path, capsys):
    import argparse

    from latentdiff.cli.generate_settings import note_from, read_from_png

    folder = tmp_path / "private-model"
    folder.mkdir()
    png = png_with(tmp_path, model=str(folder))
    stored = read_from_png(str(png))
    note_from(str(png), stored, argparse.Namespace(model=None, tokenizer=None))
    assert f"names the local model {folder.resolve()}" in capsys.readouterr().err
    note_from(str(png), stored, argparse.Namespace(model="latentdiff/shapes-64", tokenizer=None))   # a flag chose
    assert "names the local" not in capsys.readouterr().err
