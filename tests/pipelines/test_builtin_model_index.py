"""Which pipeline class an LDM-layout folder claims (issue 15): the built-in model's folder no longer claims
diffusers' LDMTextToImagePipeline, which loaded it and then crashed at the first call (16 text positions;
diffusers pads to 77). latentdiff's own class name, "LatentDiffusionPipeline", with the LDM layout read from
its parts; diffusers refuses it at load. A folder diffusers can run (77 positions) still claims diffusers' class.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from latentdiff import LatentDiffusionPipeline, Pipeline
from latentdiff.builtin import builtin_path
from latentdiff.models.ldm_bert import LDMBertTextEncoder
from latentdiff.pipelines.latent_diffusion import LDM_LAYOUT, SD_LAYOUT
from tests._support.parity import assert_parity
from tests._support.sd import tiny_ldm_text2im_pipeline
from tests._support.tiny_builtin import make_tiny_shapes_model

PROMPT = "a red circle on the left, blue background"


def index_of(folder):
    return json.loads((folder / "model_index.json").read_text())


def images(pipe, **kw):
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                output_type="pt", progress=False, **kw).images


@pytest.fixture(scope="module")
def builtin():
    folder = builtin_path("latentdiff/shapes-64")
    assert folder is not None
    return folder


def test_the_builtin_folder_claims_latentdiffs_class_and_loads_as_before(builtin, tmp_path):
    """The index names latentdiff's class (LDM parts: bert, vqvae); the folder loads as the same LDMBert pipeline,
    and a copy with the old spelling (LDMTextToImagePipeline) still loads and draws the same images."""
    index = index_of(builtin)
    assert index["_class_name"] == "LatentDiffusionPipeline"
    assert index["bert"] == ["latent_diffusion", "LDMBertModel"] and index["vqvae"] == ["diffusers", "AutoencoderKL"]
    old = tmp_path / "old"
    shutil.copytree(builtin, old)
    (old / "model_index.json").write_text(json.dumps(index | {"_class_name": "LDMTextToImagePipeline"}))
    new_pipe, old_pipe = Pipeline.from_pretrained(builtin), Pipeline.from_pretrained(old)
    for pipe in (new_pipe, old_pipe):
        assert type(pipe) is LatentDiffusionPipeline and isinstance(pipe.text_encoder, LDMBertTextEncoder)
    assert not new_pipe.text_encoder.runs_in_diffusers()
    assert torch.equal(images(new_pipe, height=32, width=32), images(old_pipe, height=32, width=32))


def test_diffusers_refuses_the_builtin_folder_at_load(builtin, diffusers):
    """diffusers has no class of latentdiff's name: from_pretrained fails there, naming it, before any weight is
    read, rather than loading and crashing at the first call."""
    with pytest.raises(AttributeError, match="LatentDiffusionPipeline"):
        diffusers.DiffusionPipeline.from_pretrained(builtin)


def test_latentdiffs_class_name_reads_the_layout_from_the_parts():
    chosen = LatentDiffusionPipeline.folder_layout
    assert chosen({"_class_name": "LatentDiffusionPipeline", "bert": ["latent_diffusion", "LDMBertModel"],
                   "vqvae": ["diffusers", "AutoencoderKL"]}) == LDM_LAYOUT.parts()
    assert chosen({"_class_name": "LatentDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
                   "text_encoder": ["transformers", "CLIPTextModel"]}) == SD_LAYOUT.parts()
    assert chosen({"_class_name": "LDMTextToImagePipeline"}) == LDM_LAYOUT.parts()


def test_save_claims_diffusers_class_only_where_diffusers_runs_the_text_encoder(tmp_path):
    """16 positions (the built-in model's shape) -> latentdiff's class; 77 positions tokenized to 77 -> diffusers'.
    Both reload in latentdiff."""
    short = LatentDiffusionPipeline.from_pretrained(make_tiny_shapes_model(tmp_path / "short"))
    short.save_pretrained(tmp_path / "short-saved")
    assert index_of(tmp_path / "short-saved")["_class_name"] == "LatentDiffusionPipeline"
    assert (tmp_path / "short-saved" / "bert").is_dir() and not (tmp_path / "short-saved" / "text_encoder").exists()
    again = Pipeline.from_pretrained(tmp_path / "short-saved")
    assert torch.equal(images(again, height=32, width=32), images(short, height=32, width=32))

    tiny_ldm_text2im_pipeline(tmp_path / "parts").save_pretrained(tmp_path / "ldm")
    long = LatentDiffusionPipeline.from_pretrained(tmp_path / "ldm")
    assert long.text_encoder.runs_in_diffusers()
    long.save_pretrained(tmp_path / "long-saved")
    assert index_of(tmp_path / "long-saved")["_class_name"] == "LDMTextToImagePipeline"


def test_a_77_position_ldm_bert_folder_round_trips_to_diffusers(tmp_path, diffusers):
    """diffusers -> latentdiff -> save -> diffusers' generic DiffusionPipeline: its LDMTextToImagePipeline runs it
    and draws what latentdiff draws."""
    tiny_ldm_text2im_pipeline(tmp_path / "parts").save_pretrained(tmp_path / "ldm")
    ours = LatentDiffusionPipeline.from_pretrained(tmp_path / "ldm")
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ours")
    assert type(back).__name__ == "LDMTextToImagePipeline"
    back.set_progress_bar_config(disable=True)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = back(PROMPT, guidance_scale=3.0, latents=latents, num_inference_steps=2, output_type="np").images
    got = ours(PROMPT, guidance_scale=3.0, latents=latents, num_inference_steps=2, output_type="np",
               progress=False).images
    assert_parity(torch.from_numpy(got), torch.from_numpy(expected))
