"""Pipeline.from_pretrained(path) returns the pipeline class a folder's model_index.json names, passes every
option through, and refuses a class latentdiff lacks with a ConfigError listing the supported ones."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from latentdiff import CheckpointError, ConfigError, DDPMSampler, LatentDiffusionPipeline, RegistryError
from latentdiff.models.ldm_bert import LDMBertTextEncoder
from latentdiff.pipelines.base import Pipeline, pipeline_classes
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.inpaint import InpaintPipeline
from latentdiff.registry import PIPELINES
from tests._support.hub_cache import make_hub_cache
from tests._support.sd import tiny_diffusers_pipeline, tiny_ldm_text2im_pipeline

EXPECTED = {
    "StableDiffusionPipeline": LatentDiffusionPipeline,
    "StableDiffusionImg2ImgPipeline": ImageToImagePipeline,
    "StableDiffusionInpaintPipeline": InpaintPipeline,
    "LDMTextToImagePipeline": LatentDiffusionPipeline,
}


def with_class_name(src, dest, class_name):
    shutil.copytree(src, dest)
    index = json.loads((dest / "model_index.json").read_text())
    (dest / "model_index.json").write_text(json.dumps(index | {"_class_name": class_name}))
    return dest


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dispatch")
    tiny_diffusers_pipeline(root / "parts").save_pretrained(root / "sd")
    tiny_ldm_text2im_pipeline(root / "ldm_parts").save_pretrained(root / "LDMTextToImagePipeline")
    out = {"StableDiffusionPipeline": root / "sd", "LDMTextToImagePipeline": root / "LDMTextToImagePipeline"}
    for name in ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline", "StableDiffusion3Pipeline"):
        out[name] = with_class_name(root / "sd", root / name, name)
    return out


@pytest.mark.parametrize("class_name", sorted(EXPECTED))
def test_folder_loads_as_the_class_it_names(folders, class_name):
    pipe = Pipeline.from_pretrained(folders[class_name])
    assert type(pipe) is EXPECTED[class_name]
    assert isinstance(pipe.text_encoder, LDMBertTextEncoder) == (class_name == "LDMTextToImagePipeline")


def test_options_and_parts_pass_through(folders):
    sampler = DDPMSampler()
    pipe = Pipeline.from_pretrained(folders["StableDiffusionImg2ImgPipeline"], sampler=sampler,
                                    torch_dtype=torch.float64)
    assert type(pipe) is ImageToImagePipeline and pipe.sampler is sampler
    assert pipe.unet.dtype == pipe.vae.dtype == torch.float64
    again = Pipeline.from_pretrained(folders["StableDiffusionPipeline"], unet=pipe.unet, vae=pipe.vae)
    assert again.unet is pipe.unet and again.vae is pipe.vae
    with pytest.raises(TypeError):
        Pipeline.from_pretrained(folders["StableDiffusionPipeline"], bogus_option=1)


def test_an_explicit_class_loads_any_compatible_folder(folders):
    # As in diffusers: StableDiffusionImg2ImgPipeline.from_pretrained(<an SD text-to-image repo>).
    assert type(InpaintPipeline.from_pretrained(folders["StableDiffusionPipeline"])) is InpaintPipeline
    assert type(LatentDiffusionPipeline.from_pretrained(folders["StableDiffusionImg2ImgPipeline"])) \
        is LatentDiffusionPipeline


def test_unknown_class_is_a_config_error_listing_the_supported(folders):
    with pytest.raises(ConfigError, match="StableDiffusion3Pipeline") as info:
        Pipeline.from_pretrained(folders["StableDiffusion3Pipeline"])
    assert info.value.where.endswith("model_index.json: _class_name")
    assert set(EXPECTED) <= set(info.value.expected)


def test_not_a_pipeline_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(CheckpointError, match="model_index.json"):
        Pipeline.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError):
        Pipeline.from_pretrained(tmp_path / "absent" / "deeper" / "still")


@pytest.mark.parametrize("cls", [LatentDiffusionPipeline, ImageToImagePipeline, InpaintPipeline])
def test_saved_folder_loads_back_as_the_same_class(folders, cls, tmp_path):
    pipe = cls.from_pretrained(folders["StableDiffusionPipeline"])
    pipe.save_pretrained(tmp_path / "saved")
    assert type(Pipeline.from_pretrained(tmp_path / "saved")) is cls


def test_hub_id_dispatches_offline(folders, tmp_path, monkeypatch):
    make_hub_cache(tmp_path / "cache", "someone/tiny-inpaint", folders["StableDiffusionInpaintPipeline"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = Pipeline.from_pretrained("someone/tiny-inpaint", cache_dir=tmp_path / "cache")
    assert type(pipe) is InpaintPipeline


def test_registry_every_class_name_has_one_pipeline(monkeypatch):
    table = pipeline_classes()
    assert {name: table[name] for name in EXPECTED} == EXPECTED
    assert {"text-to-image", "image-to-image", "inpainting"} <= set(PIPELINES.names())
    for name in PIPELINES.names():
        assert PIPELINES.get(name).diffusers_class_names, name

    class Impostor(Pipeline):
        diffusers_class_names = ("StableDiffusionPipeline",)

    monkeypatch.setitem(PIPELINES._entries, "impostor", Impostor)
    with pytest.raises(RegistryError, match="StableDiffusionPipeline"):
        pipeline_classes()
