"""The real Hub folders: the model_index.json entries stable-diffusion-v1-5 and the SD 2.x repos ship load, the parts
latentdiff does not run are not downloaded, reported once and saved as null; a malformed model_index.json is a
latentdiff error naming the file, the key, what was expected and what was found."""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil

import pytest
import torch

from latentdiff import CheckpointError, ConfigError, LatentDiffusionPipeline, Pipeline
from latentdiff.cli import main
from latentdiff.utils.images import read_png_params
from tests._support.hub_cache import make_hub_cache
from tests._support.hub_folders import IMAGE_ENCODER_ENTRIES, SD2_ENTRIES, SD15_ENTRIES, SIDE_FILES, hub_folder
from tests._support.sd import tiny_diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny SD folder as diffusers saves it (side parts null) and one with SD 1.5's real entries."""
    root = tmp_path_factory.mktemp("hub")
    tiny_diffusers_pipeline(root).save_pretrained(root / "diffusers")
    hub_folder(root / "diffusers", root / "sd15", SD15_ENTRIES)
    return root


@pytest.fixture
def reference_latents(tiny, one_thread):
    return latents_of(LatentDiffusionPipeline.from_pretrained(tiny / "diffusers"))


def latents_of(pipe):
    return pipe(PROMPT, num_inference_steps=2, height=32, width=32, output_type="latent", progress=False,
                generator=torch.Generator().manual_seed(0)).images


def index_with(tiny, tmp_path, **changes):
    """A copy of the SD 1.5 folder whose model_index.json has `changes` (a None value deletes the key)."""
    folder = tmp_path / "changed"
    shutil.copytree(tiny / "sd15", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if v is not None}))
    return folder


def folder_logs(caplog):
    return [r for r in caplog.records if r.name == "latentdiff.pipelines.folder"]


# ---- the real entries load ---------------------------------------------------------------------------------
@pytest.mark.outcome("correct")
def test_sd15_model_index_loads_and_reports_the_unused_parts_once(tiny, reference_latents, caplog):
    with caplog.at_level(logging.INFO, logger="latentdiff"):
        pipe = LatentDiffusionPipeline.from_pretrained(tiny / "sd15")
    [record] = folder_logs(caplog)
    assert record.levelno == logging.INFO
    assert "safety_checker" in record.getMessage() and "feature_extractor" in record.getMessage()
    assert torch.equal(latents_of(pipe), reference_latents)   # the same images as the folder without them


@pytest.mark.outcome("correct")
def test_sd2_model_index_with_a_feature_extractor_loads(tiny, tmp_path, reference_latents, caplog):
    folder = hub_folder(tiny / "diffusers", tmp_path / "sd2", SD2_ENTRIES)
    with caplog.at_level(logging.INFO, logger="latentdiff"):
        pipe = LatentDiffusionPipeline.from_pretrained(folder)
    [record] = folder_logs(caplog)
    assert "feature_extractor" in record.getMessage() and "safety_checker" not in record.getMessage()
    assert torch.equal(latents_of(pipe), reference_latents)


@pytest.mark.outcome("correct")
def test_an_unused_image_encoder_entry_loads(tiny, tmp_path, reference_latents):
    folder = hub_folder(tiny / "diffusers", tmp_path / "ip", SD15_ENTRIES | IMAGE_ENCODER_ENTRIES)
    assert torch.equal(latents_of(LatentDiffusionPipeline.from_pretrained(folder)), reference_latents)


@pytest.mark.outcome("correct")
def test_pipeline_from_pretrained_picks_the_class_of_the_real_folder(tiny):
    assert type(Pipeline.from_pretrained(tiny / "sd15")) is LatentDiffusionPipeline


@pytest.mark.outcome("correct")
def test_save_pretrained_writes_the_unused_parts_as_null(tiny, tmp_path, diffusers):
    LatentDiffusionPipeline.from_pretrained(tiny / "sd15").save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["safety_checker"] == index["feature_extractor"] == index["image_encoder"] == [None, None]
    assert index["requires_safety_checker"] is False
    assert not any((tmp_path / "saved" / key).exists() for key in SIDE_FILES)
    diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "saved")   # diffusers reads it without them


@pytest.mark.outcome("correct", fails_as="crash")
def test_hub_snapshot_never_asks_for_the_unused_parts(tiny, tmp_path, monkeypatch, reference_latents):
    import huggingface_hub

    make_hub_cache(tmp_path / "cache", "someone/sd15", tiny / "sd15")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked: list[list[str]] = []
    real = huggingface_hub.snapshot_download

    def spy(*args, allow_patterns=None, **kwargs):
        asked.append(list(allow_patterns or ["*"]))
        return real(*args, allow_patterns=allow_patterns, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    pipe = LatentDiffusionPipeline.from_pretrained("someone/sd15", cache_dir=tmp_path / "cache")
    assert torch.equal(latents_of(pipe), reference_latents)
    side = [f"{key}/{name}" for key, (name, _) in SIDE_FILES.items()] + ["safety_checker/model.safetensors"]
    assert asked and not [(p, f) for patterns in asked for p in patterns for f in side if fnmatch.fnmatch(f, p)]


@pytest.mark.outcome("correct")
def test_cli_generate_on_the_real_folder_layout(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", PROMPT, "-o", "out.png", "--model", str(tiny / "sd15"), "--steps", "1",
                 "--height", "32", "--width", "32"]) == 0
    assert read_png_params("out.png")["model"] == str(tiny / "sd15")


# ---- what changes the images stays strict ------------------------------------------------------------------
@pytest.mark.outcome("clear_error")
def test_an_unknown_class_under_a_known_side_part_is_refused(tiny, tmp_path):
    folder = index_with(tiny, tmp_path, safety_checker=["my_lib", "MyFilter"])
    with pytest.raises(ConfigError, match="safety_checker") as info:
        LatentDiffusionPipeline.from_pretrained(folder)
    assert "model_index.json" in str(info.value) and "MyFilter" in str(info.value)


@pytest.mark.outcome("clear_error")
def test_an_unknown_component_is_refused(tiny, tmp_path):
    # (controlnet and adapter are parts since issue 19: an AnimateDiff motion adapter is still unknown)
    folder = index_with(tiny, tmp_path, motion_adapter=["diffusers", "MotionAdapter"])
    with pytest.raises(ConfigError, match="motion_adapter") as info:
        LatentDiffusionPipeline.from_pretrained(folder)
    assert "model_index.json" in str(info.value) and "MotionAdapter" in str(info.value)


# ---- the structure of model_index.json ------------------------------------------------------------------------
@pytest.mark.outcome("clear_error", fails_as="crash")
@pytest.mark.parametrize("load", [Pipeline.from_pretrained, LatentDiffusionPipeline.from_pretrained])
def test_class_name_a_list(tiny, tmp_path, load):
    folder = index_with(tiny, tmp_path, _class_name=["StableDiffusionPipeline"])
    with pytest.raises(ConfigError, match="_class_name") as info:
        load(folder)
    assert "model_index.json" in str(info.value) and "expected: a string" in str(info.value)
    assert "found: a list" in str(info.value)


@pytest.mark.outcome("clear_error", fails_as="crash")
@pytest.mark.parametrize("key,value", [("unet", "UNet2DConditionModel"), ("scheduler", 5),
                                       ("vae", ["diffusers", "AutoencoderKL", "extra"]),
                                       ("safety_checker", "StableDiffusionSafetyChecker")])
def test_a_component_entry_that_is_not_a_pair(tiny, tmp_path, key, value):
    folder = index_with(tiny, tmp_path, **{key: value})
    with pytest.raises(ConfigError, match=key) as info:
        LatentDiffusionPipeline.from_pretrained(folder)
    message = str(info.value)
    assert f"model_index.json: {key}" in message and "[library, class]" in message and "found:" in message


@pytest.mark.outcome("clear_error", fails_as="security")
@pytest.mark.parametrize("key", ["../unet", "sub/unet", ".."])
def test_a_component_key_that_is_a_path(tiny, tmp_path, key):
    folder = index_with(tiny, tmp_path, **{key: ["diffusers", "UNet2DConditionModel"]})
    with pytest.raises(CheckpointError, match="plain name") as info:
        Pipeline.from_pretrained(folder)
    assert "model_index.json" in str(info.value) and key in str(info.value)


@pytest.mark.outcome("clear_error", fails_as="security")
def test_a_component_subfolder_linked_outside(tiny, tmp_path):
    folder = index_with(tiny, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.move(folder / "unet", outside)
    os.symlink(outside, folder / "unet")
    with pytest.raises(CheckpointError, match="outside") as info:
        LatentDiffusionPipeline.from_pretrained(folder)
    assert "model_index.json: unet" in str(info.value) and str(outside) in str(info.value)
