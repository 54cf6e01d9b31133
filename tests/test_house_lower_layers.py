"""The house (issue 13), lower layers: the generic model config, one spelling per small idea, typed key rules."""
from __future__ import annotations

import typing

import pytest
import torch

from latentdiff.config import is_int, is_real
from latentdiff.convert.keymap import Merge, Rename, Reshape, Split, apply_keymap
from latentdiff.errors import CheckpointError, InputError, describe
from latentdiff.layers import embeddings
from latentdiff.layers.attention import set_attention_chunking
from latentdiff.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from latentdiff.models.autoencoder_parts import FirstStage
from latentdiff.models.base import ModelMixin
from latentdiff.models.clip_text import check_input_ids
from latentdiff.models.conditioners import ClassEmbedder, ClassEmbedderConfig
from latentdiff.models.identity import IdentityFirstStage, IdentityFirstStageConfig
from latentdiff.models.unet import DownLevel, UpLevel, check_timestep
from latentdiff.models.unet2d import ResnetDownLevel, ResnetUpLevel
from latentdiff.models.vae_tiling import TileSettings


def test_models_name_their_config_type():
    # ModelMixin[ConfigT]: the subclass's config type is recorded (what mypy checks `self.config.x` against)
    def config_type(cls: type) -> type:
        for base in getattr(cls, "__orig_bases__", ()):
            if typing.get_origin(base) in (ModelMixin, FirstStage):
                return typing.get_args(base)[0]
        raise AssertionError(cls)

    assert config_type(AutoencoderKL) is AutoencoderKLConfig
    assert config_type(IdentityFirstStage) is IdentityFirstStageConfig
    assert config_type(ClassEmbedder) is ClassEmbedderConfig
    model = IdentityFirstStage(IdentityFirstStageConfig(channels=2))
    assert isinstance(model.config, IdentityFirstStageConfig) and model.downsample_factor == 1


def test_conditioner_file_config_ignores_metadata_keys():
    # the conditioners use ModelMixin.from_file_config: `_class_name` and other `_` keys are metadata
    config = ClassEmbedder.from_file_config({"_class_name": "ClassEmbedder", "_latentdiff_version": "0",
                                             "num_classes": 3, "embed_dim": 4})
    assert config == ClassEmbedderConfig(num_classes=3, embed_dim=4)


def test_identity_write_files_takes_the_base_signature(tmp_path):
    model = IdentityFirstStage(IdentityFirstStageConfig())
    model.write_files(tmp_path / "a", state_dict={})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json"]
    with pytest.raises(CheckpointError, match="has no weights"):
        model.write_files(tmp_path / "b", state_dict={"w": torch.zeros(1)})


def test_one_dtype_cast_in_layers():
    assert not hasattr(embeddings, "cast")
    x = torch.zeros(2)
    assert embeddings.to_dtype(x, torch.float32) is x
    assert embeddings.to_dtype(x, torch.float16).dtype == torch.float16


def test_level_classes_share_one_forward():
    # UNet2D's resnet-resampling levels differ from the UNet's only in how the resampler is called
    assert ResnetDownLevel.forward is DownLevel.forward and ResnetUpLevel.forward is UpLevel.forward
    assert ResnetDownLevel.resnet_resampler and ResnetUpLevel.resnet_resampler
    assert not DownLevel.resnet_resampler and not UpLevel.resnet_resampler


def test_found_is_described():
    with pytest.raises(InputError) as info:
        check_input_ids([1, 2], 77)
    assert info.value.found == describe([1, 2]) == "a list of [int, int]"
    with pytest.raises(InputError) as info:
        check_timestep("1", 2)
    assert info.value.found == "str"


def test_int_checks_refuse_bools():
    assert is_int(3) and not is_int(True) and is_real(0.5) and not is_real(False)
    with pytest.raises(InputError):
        set_attention_chunking(torch.nn.Linear(1, 1), chunk_size=True)
    with pytest.raises(InputError):
        TileSettings(tile_sample_size=True).check(1)
    with pytest.raises(InputError):
        TileSettings(overlap=False).check(8)
    TileSettings(tile_sample_size=64, overlap=0).check(8)


def test_rules_compare_by_their_fields_only():
    assert Rename("a.{x}", "b.{x}") == Rename("a.{x}", "b.{x}")
    assert hash(Reshape("a", "b")) == hash(Reshape("a", "b"))
    assert repr(Rename("a", "b")) == "Rename(src='a', dst='b')"
    with pytest.raises(TypeError):
        Rename("a", "b", Rename("c", "d")._s)  # the compiled templates are no constructor arguments
    table = (Split("qkv", into=("q", "k", "v")),)
    state = {"qkv": torch.arange(6.0)}
    out = apply_keymap(state, table, source="t")
    assert {k: v.tolist() for k, v in out.items()} == {"q": [0.0, 1.0], "k": [2.0, 3.0], "v": [4.0, 5.0]}
    back = apply_keymap(out, (Merge(("q", "k", "v"), "qkv"),), source="t")
    assert torch.equal(back["qkv"], state["qkv"])
