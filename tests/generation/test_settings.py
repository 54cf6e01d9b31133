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
