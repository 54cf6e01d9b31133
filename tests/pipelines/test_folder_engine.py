"""The house issue, part E: the pipelines' one folder engine, the first-stage runner, and `hub.HubLocation`."""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from latentdiff import hub
from latentdiff.errors import ConfigError
from latentdiff.models.identity import IdentityFirstStage, IdentityFirstStageConfig
from latentdiff.models.unet2d import UNet2D, UNet2DConfig
from latentdiff.pipelines import first_stage
from latentdiff.pipelines.folder import MODEL_INDEX, FolderPart, load_folder, open_folder
from latentdiff.pipelines.latent_diffusion import LDM_LAYOUT, SD_LAYOUT, LatentDiffusionPipeline
from latentdiff.pipelines.unconditional import UnconditionalPipeline


def tiny_pixel_pipeline() -> UnconditionalPipeline:
    """Pixel-space diffusion (identity first stage) with a one-level UNet: saves in a blink."""
    vae = IdentityFirstStage(IdentityFirstStageConfig(channels=3))
    unet = UNet2D(UNet2DConfig(in_channels=3, out_channels=3, channels=(8,), attention_levels=(False,),
                               layers_per_level=1, norm_num_groups=4, attention_head_dim=None, mid_block=False,
                               sample_size=8))
    return UnconditionalPipeline(vae=vae, unet=unet)


# ---- hub.HubLocation ------------------------------------------------------------------------------------
def test_hub_location_is_frozen_and_takes_the_four_keywords_from_a_call():
    location = hub.HubLocation.from_kwargs({"revision": "main", "token": False, "torch_dtype": torch.float16})
    assert location == hub.HubLocation(revision="main", token=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        location.revision = "other"  # type: ignore[misc]


def test_hub_location_resolves_through_hub_resolve(monkeypatch, tmp_path):
    seen = []

    def fake_resolve(path_or_id, **kwargs):
        seen.append((path_or_id, kwargs))
        return tmp_path

    monkeypatch.setattr(hub, "resolve", fake_resolve)   # tests (and users) patch the one function
    location = hub.HubLocation(revision="v1", cache_dir=tmp_path, local_files_only=True)
    assert location.resolve("someone/model", allow_patterns=["a.json"]) == tmp_path
    assert seen == [("someone/model", dict(allow_patterns=["a.json"], revision="v1", cache_dir=tmp_path,
                                           token=None, local_files_only=True))]


# ---- the folder engine -------------------------------------------------------------------------------------
def test_the_engine_loads_what_was_not_given_and_keeps_what_was(tmp_path):
    pipe = tiny_pixel_pipeline()
    folder = pipe.save_pretrained(tmp_path / "pipe")
    root, index, source = open_folder(folder, location=hub.HubLocation())
    assert root == folder and index["_class_name"] == "LDMPipeline" and source.endswith(MODEL_INDEX)
    arguments = load_folder(UnconditionalPipeline, folder, given={"unet": pipe.unet}, variant=None,
                            torch_dtype=None, device=None, location=hub.HubLocation())
    assert arguments["unet"] is pipe.unet
    assert isinstance(arguments["vae"], IdentityFirstStage)
    assert set(arguments) == {"vae", "unet", "noise_scheduler", "sampler"}
    loaded = UnconditionalPipeline.from_pretrained(folder)
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], value)


def test_a_missing_part_is_named(tmp_path):
    folder = tiny_pixel_pipeline().save_pretrained(tmp_path / "pipe")
    index = json.loads((folder / MODEL_INDEX).read_text())
    del index["unet"]
    (folder / MODEL_INDEX).write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"lacks a component.*no entry for \['unet'\]"):
        UnconditionalPipeline.from_pretrained(folder)


def test_text_to_image_layouts_are_folder_parts():
    for layout in (SD_LAYOUT, LDM_LAYOUT):
        parts = layout.parts()
        # the optional control parts last (absent from plain folders)
        assert [p.key for p in parts] == ["unet", layout.vae, layout.text_encoder, "tokenizer", "controlnet",
                                          "adapter"]
        assert all(p.optional for p in parts[4:])
        tokenizer = parts[3]
        assert tokenizer.argument == "text_encoder" and set(tokenizer.classes.values()) == {None}
        assert dict(parts[2].load_options) == {"tokenizer_subfolder": "tokenizer"}
    chosen = LatentDiffusionPipeline.folder_layout({"_class_name": "LDMTextToImagePipeline"})
    assert [p.key for p in chosen] == ["unet", "vqvae", "bert", "tokenizer", "controlnet", "adapter"]
    assert LatentDiffusionPipeline.folder_layout({}) == SD_LAYOUT.parts()
    assert all(isinstance(p, FolderPart) for p in UnconditionalPipeline.folder_parts)


# ---- the first-stage runner -------------------------------------------------------------------------------
def test_the_runner_decodes_and_refuses_switches_a_first_stage_lacks():
    pipe = tiny_pixel_pipeline()
    z = torch.randn(1, 3, 8, 8)
    assert torch.equal(first_stage.decode(pipe.vae, z), pipe.decode(z))
    with pytest.raises(ConfigError, match="no enable_tiling"):
        pipe.enable_vae_tiling()
    with pytest.raises(ConfigError, match="no disable_slicing"):
        first_stage.disable_slicing(pipe.vae)


def test_the_fallback_warning_points_at_the_pipelines_caller(monkeypatch):
    pipe = tiny_pixel_pipeline()

    def out_of_memory(z):
        if z.shape[0] > 1 or z.shape[-1] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return z

    monkeypatch.setattr(pipe.vae, "decode_latents", out_of_memory)
    pipe.fallback_tiling = first_stage.TileSettings(tile_sample_size=4, overlap=0.25)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.decode_first_stage(torch.zeros(2, 3, 8, 8))
    assert [w.filename for w in caught] == [__file__]
