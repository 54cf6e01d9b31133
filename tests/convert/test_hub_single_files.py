"""Single files named on the Hub (`hub_files.local_file`): a Hub file URL (".../blob/main/file") and the
"owner/repo/file" shorthand load the file of the local Hub cache, offline, as the local path does; one not in the
cache is a CheckpointError naming it; local paths are untouched."""
from __future__ import annotations

import pytest
import torch

from latentdiff import ControlNet, ControlNetConfig
from latentdiff.errors import CheckpointError
from latentdiff.hub_files import hub_file, local_file
from tests._support.hub_cache import make_hub_cache

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = "someone/controlnets"


@pytest.fixture
def cached(tmp_path, monkeypatch):
    import huggingface_hub.constants

    torch.manual_seed(0)
    model = ControlNet(ControlNetConfig(channels=(16, 32), attention_levels=(True, False), layers_per_level=1,
                                        cross_attention_dim=8, attention_heads=2, norm_num_groups=8,
                                        conditioning_embedding_out_channels=(8, 16)))
    (tmp_path / "repo").mkdir()
    model.save_single_file(tmp_path / "repo" / "control_tiny.safetensors")
    cache = tmp_path / "hub"
    make_hub_cache(cache, REPO, tmp_path / "repo")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return model, tmp_path / "repo" / "control_tiny.safetensors"


@pytest.mark.parametrize("name", [f"https://huggingface.co/{REPO}/blob/main/control_tiny.safetensors",
                                  f"https://huggingface.co/{REPO}/resolve/main/control_tiny.safetensors?download=1",
                                  f"{REPO}/control_tiny.safetensors"])
def test_hub_file_names_load_the_cached_file_offline(cached, name):
    model, local = cached
    loaded = ControlNet.from_single_file(name)
    expected = ControlNet.from_single_file(local)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], expected.state_dict()[k]) for k in expected.state_dict())


def test_a_file_not_in_the_cache_is_named(cached):
    with pytest.raises(CheckpointError, match="not in the local Hub cache") as info:
        ControlNet.from_single_file(f"{REPO}/control_other.safetensors")
    assert info.value.where == f"{REPO}/control_other.safetensors"


def test_local_paths_and_other_names_are_left_alone(tmp_path):
    assert local_file(tmp_path) == tmp_path
    assert hub_file("weights/model.safetensors") is None          # two parts: a relative path, not a repo file
    assert hub_file("./a/b/c.safetensors") is None and hub_file("a/b/notes.txt") is None
    assert hub_file("https://huggingface.co/a/b/blob/v1.0/sub/c.pth") == ("a/b", "v1.0", "sub/c.pth")
    assert local_file("missing/dir/x.txt") == "missing/dir/x.txt"
