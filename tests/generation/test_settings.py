"""latentdiff.generation: what the command line and the server share, below both. The command line's modules
re-export each name as the very object (so the server and `latentdiff generate` load and run models alike), and
the model's family is read from its files without loading."""
from __future__ import annotations

import dataclasses
import importlib
import json

import pytest

from latentdiff.generation import sdxl, settings
from latentdiff.model_source import locate_model

MOVED = {  # where a name was defined before it moved -> the generation module that defines it now
    "cli.generate_settings": (settings, ["DTYPES", "RECORDED", "OPTIONAL", "FLAGS", "GenerateSettings"]),
    "cli.generate": (settings, ["load_pipeline", "load_vae", "model_family", "inpainting_folder", "with_schedule"]),
    "cli.generate_inputs": (settings, ["load_vae", "vae_source"]),
    "cli.generate_a1111": (settings, ["with_schedule"]),
    "cli.generate_sdxl": (sdxl, ["a1111_clip_layers", "a1111_clip_skip", "call_sdxl", "init_tensor", "is_sdxl",
                                 "micro_conditioning", "parse_pair", "refiner_sampler", "sdxl_hires_fix",
                                 "CONTROL_ARGUMENTS"]),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_the_command_line_reexports_the_same_objects(old):
    module = importlib.import_module(f"latentdiff.{old}")
    new, names = MOVED[old]
    for name in names:
        assert getattr(module, name) is getattr(new, name), f"latentdiff.{old}.{name}"
    for name in ("SDXL_CLASS_NAMES", "SDXL_FILE_PREFIX", "inpainting_folder", "model_family"):
        assert getattr(importlib.import_module("latentdiff.cli.generate_sdxl"), name) is getattr(settings, name)


def test_the_settings_record_the_optional_ones_only_when_set():
    fields = [f.name for f in dataclasses.fields(settings.GenerateSettings)]
    assert tuple(fields) == settings.RECORDED     # the order every PNG records
    run = settings.GenerateSettings(prompt="a", negative=None, seed=0, steps=None, guidance=None, sampler=None,
                                    eta=None, height=None, width=None, n=1, model="m", dtype="float32",
                                    tokenizer=None)
    assert set(run.params()) == set(settings.RECORDED[:settings.RECORDED.index("clip_skip")])
    assert dataclasses.replace(run, clip_skip=2).params()["clip_skip"] == 2


@pytest.mark.parametrize("class_name,family,inpainting", [
    ("StableDiffusionXLPipeline", "sdxl", False), ("StableDiffusionXLImg2ImgPipeline", "sdxl", False),
    ("StableDiffusionXLInpaintPipeline", "sdxl", True), ("StableDiffusionPipeline", "sd", False),
    ("LDMTextToImagePipeline", "sd", False)])
def test_the_family_is_read_from_the_folder_index(tmp_path, class_name, family, inpainting):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    source = locate_model(str(tmp_path))
    assert settings.model_family(source) == family
    assert settings.inpainting_folder(source) is inpainting


def test_an_unreadable_index_leaves_the_family_to_the_load(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    source = locate_model(str(tmp_path))
    assert settings.model_family(source) is None and settings.inpainting_folder(source) is False


# ---- error messages name what the caller calls a setting ---------------------------------------------------------
def run_settings(**changes):
    return dataclasses.replace(
        settings.GenerateSettings(prompt="a", negative=None, seed=0, steps=None, guidance=None, sampler=None, eta=None,
                                  height=None, width=None, n=1, model="m", dtype="float32", tokenizer=None),
        **changes)


@pytest.fixture(scope="module")
def ddim_folder(tmp_path_factory):
    """A model folder whose own sampler (DDIM, no sigma schedule) is known only once it loads (no sampler in its
    latentdiff_generate.json)."""
    from tests._support.tiny_builtin import make_tiny_shapes_model

    return make_tiny_shapes_model(tmp_path_factory.mktemp("m") / "ddim", settings={"num_inference_steps": 2})


@pytest.mark.parametrize("caller, schedule_name, sampler_name", [
    ("neutral", "schedule", "sampler"),               # no names given: the settings' own
    ("command line", "--schedule", "--sampler"),      # cli.generate passes FLAGS
    ("server", "scheduler", "sampler_name"),          # serve.models passes its request keys
])
def test_a_schedule_the_loaded_sampler_lacks_names_the_caller_s_keys(ddim_folder, caller, schedule_name,
                                                                      sampler_name):
    from latentdiff.errors import UsageError
    from latentdiff.serve.models import SETTING_KEYS

    names = {"neutral": None, "command line": settings.FLAGS, "server": SETTING_KEYS}[caller]
    with pytest.raises(UsageError) as caught:
        settings.load_pipeline(locate_model(str(ddim_folder)), run_settings(schedule="karras"), device="cpu",
                               names=names)
    error = caught.value
    assert error.where == schedule_name and f"no {schedule_name}, or {sampler_name} with a schedule" in str(error)
    if caller != "command line":
        assert "--" not in str(error)


@pytest.mark.parametrize("caller, key", [(None, "original_size"), ("command line", "--original-size")])
def test_micro_conditioning_names_the_caller_s_key(caller, key):
    from latentdiff.errors import UsageError

    names = settings.FLAGS if caller else None
    with pytest.raises(UsageError) as caught:
        sdxl.micro_conditioning(run_settings(original_size="1024 by 1024"), names=names)
    assert caught.value.where == key and caught.value.expected == "WIDTHxHEIGHT"
    assert sdxl.micro_conditioning(run_settings(original_size="1024x768", crop_top_left="0,8"), names=names) == {
        "original_size": (768, 1024), "crops_coords_top_left": (0, 8)}


def test_the_server_loads_with_its_request_keys(monkeypatch):
    """serve.models hands its request keys to load_pipeline (its requests name the sampler and schedule so)."""
    from latentdiff.serve import models

    seen = {}
    monkeypatch.setattr(models, "load_pipeline", lambda source, run, *, device, names=None: seen.update(names=names))
    models.load_checkpoint(models.Entry("latentdiff/shapes-64", None, "latentdiff/shapes-64"), None, dtype="float32",
                           device="cpu")
    assert seen["names"] is models.SETTING_KEYS
    assert {key: models.SETTING_KEYS[key] for key in ("sampler", "schedule")} == {"sampler": "sampler_name",
                                                                                  "schedule": "scheduler"}
