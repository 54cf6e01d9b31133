"""Cases found by probing the merged hardening work by hand (issue 14): a folder given where a single file is
expected, and the floating-point dtypes a checkpoint may legitimately hold (cast, not refused)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentdiff import AutoencoderKL
from latentdiff.builtin import builtin_path
from latentdiff.errors import CheckpointError
from latentdiff.pipelines.base import Pipeline


@pytest.mark.outcome("clear_error", fails_as="unclear")
def test_a_folder_given_as_a_single_file_says_so(tmp_path):
    with pytest.raises(CheckpointError) as info:
        Pipeline.from_single_file(tmp_path)
    assert info.value.where == str(tmp_path) and "folder" in str(info.value) and "from_pretrained" in str(info.value)


def first_stage_copy(dest: Path) -> Path:
    folder = builtin_path("latentdiff/shapes-64")
    assert folder is not None
    return Path(shutil.copytree(folder / "vqvae", dest / "vqvae"))


@pytest.mark.outcome("correct")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float8_e4m3fn])
def test_real_floating_weights_of_another_precision_are_cast(tmp_path, dtype):
    """A checkpoint stored in another floating-point precision loads, cast to the requested dtype, and matches the
    original weights as closely as that precision allows (the refusal of int / bool / complex weights must not
    catch these)."""
    folder = first_stage_copy(tmp_path)
    weights = next(folder.glob("*.safetensors"))
    original = load_file(weights)
    save_file({k: v.to(dtype) for k, v in original.items()}, weights)
    model = AutoencoderKL.from_pretrained(folder)
    state = model.state_dict()
    for key, value in original.items():
        expected = value.to(dtype).float()
        assert state[key].dtype == torch.float32 and torch.equal(state[key], expected), key
