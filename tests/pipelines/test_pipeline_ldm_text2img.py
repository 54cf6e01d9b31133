"""LDM's text-to-image model (CompVis/ldm-text2im-large-256 layout: vqvae/ + bert/ LDMBert + BERT tokenizer) in
LatentDiffusionPipeline: parity with diffusers' LDMTextToImagePipeline on tiny random weights and fixed latents,
folders both ways, and a Hub repo whose bert/ holds only pytorch_model.bin."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff import ConfigError, LatentDiffusionPipeline
from latentdiff.models.ldm_bert import LDMBertTextEncoder
from tests._support.parity import assert_parity
from tests._support.sd import tiny_ldm_text2im_pipeline

PROMPT = "a painting of a squirrel eating a burger"
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm_text2im")
    ref = tiny_ldm_text2im_pipeline(root)
    ref.save_pretrained(root / "ldm")
    return ref, LatentDiffusionPipeline.from_pretrained(root / "ldm"), root


def fixed_latents(batch=1, seed=0):
    return torch.randn((batch, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_loads_the_ldm_layout(setup):
    _, pipe, _ = setup
    assert isinstance(pipe.text_encoder, LDMBertTextEncoder)
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.cross_attention_dim == 32


def test_parity_with_diffusers_guided(setup):
    ref, pipe, _ = setup
    kw = dict(guidance_scale=6.0, latents=fixed_latents(), num_inference_steps=STEPS)
    with torch.no_grad():
        expected = ref(PROMPT, output_type="pt", **kw).images
    ours = pipe(PROMPT, output_type="pt", progress=False, **kw).images
    assert ours.shape == expected.shape == (1, 3, 64, 64)
    assert_parity(ours, expected)


def test_parity_with_diffusers_batch_unguided_with_eta(setup):
    """guidance 1 (diffusers' LDM default), a batch of prompts, DDIM eta > 0: diffusers draws the step noise from
    the global RNG (it passes no generator to the scheduler), so both runs start from the same global seed."""
    ref, pipe, _ = setup
    kw = dict(guidance_scale=1.0, eta=0.7, latents=fixed_latents(2, seed=1), num_inference_steps=STEPS)
    torch.manual_seed(11)
    with torch.no_grad():
        expected = ref([PROMPT, "the red cat"], output_type="np", **kw).images
    torch.manual_seed(11)
    ours = pipe([PROMPT, "the red cat"], output_type="np", progress=False, **kw).images
    assert_parity(torch.from_numpy(ours), torch.from_numpy(expected))


def test_saved_folder_has_the_ldm_layout_and_loads_in_diffusers(setup, tmp_path):
    import diffusers

    _, pipe, _ = setup
    pipe.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "LDMTextToImagePipeline"
    assert index["bert"] == ["latent_diffusion", "LDMBertModel"] and index["vqvae"] == ["diffusers", "AutoencoderKL"]
    assert "safety_checker" not in index and not (tmp_path / "ours" / "vae").exists()
    back = diffusers.LDMTextToImagePipeline.from_pretrained(tmp_path / "ours")
    back.set_progress_bar_config(disable=True)
    kw = dict(guidance_scale=3.0, latents=fixed_latents(seed=2), num_inference_steps=STEPS)
    with torch.no_grad():
        expected = back(PROMPT, output_type="np", **kw).images
    ours = pipe(PROMPT, output_type="np", progress=False, **kw).images
    assert_parity(torch.from_numpy(ours), torch.from_numpy(expected))


def test_variant_save_names_the_bert_weights_too(setup, tmp_path):
    _, pipe, _ = setup
    pipe.save_pretrained(tmp_path / "ours", variant="fp16")
    assert (tmp_path / "ours" / "bert" / "model.fp16.safetensors").is_file()
    assert not (tmp_path / "ours" / "bert" / "model.safetensors").exists()
    back = LatentDiffusionPipeline.from_pretrained(tmp_path / "ours", variant="fp16")
    kw = dict(guidance_scale=3.0, latents=fixed_latents(seed=2), num_inference_steps=STEPS, output_type="np",
              progress=False)
    assert np.array_equal(back(PROMPT, **kw).images, pipe(PROMPT, **kw).images)


def test_hub_repo_with_pickled_bert_weights_loads(setup, tmp_path, monkeypatch):
    """The real repo's bert/ may hold only pytorch_model.bin: the pipeline asks the Hub for it (and for no other
    pickle), and loads it weights-only to the same model."""
    from safetensors.torch import load_file

    from latentdiff import hub

    _, pipe, root = setup
    remote = tmp_path / "remote"
    shutil.copytree(root / "ldm", remote)
    weights = remote / "bert" / "model.safetensors"
    torch.save(load_file(weights), remote / "bert" / "pytorch_model.bin")
    weights.unlink()
    for folder in ("unet", "vqvae"):  # pickles next to safetensors must not be fetched
        torch.save({"unused": torch.zeros(1)}, remote / folder / "diffusion_pytorch_model.bin")
    requested, snapshot = [], tmp_path / "snapshot"
    real_resolve = hub.resolve

    def fake_resolve(path_or_id, *, allow_patterns=None, **kwargs):
        if Path(path_or_id).is_dir():
            return real_resolve(path_or_id, allow_patterns=allow_patterns, **kwargs)
        requested.extend(allow_patterns)
        for file in remote.rglob("*"):  # a download of the matching files, as snapshot_download makes it
            name = file.relative_to(remote).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, snapshot / name)
        return snapshot

    monkeypatch.setattr(hub, "resolve", fake_resolve)
    loaded = LatentDiffusionPipeline.from_pretrained("CompVis/ldm-text2im-tiny")
    assert [p for p in requested if p.endswith(".bin")] == ["bert/*.bin"]
    assert not list(snapshot.rglob("diffusion_pytorch_model.bin"))
    kw = dict(guidance_scale=6.0, latents=fixed_latents(), num_inference_steps=2, output_type="latent",
              progress=False)
    assert torch.equal(loaded(PROMPT, **kw).images, pipe(PROMPT, **kw).images)


def test_parts_that_do_not_fit_are_a_config_error(setup):
    _, pipe, _ = setup
    from latentdiff.models.unet import UNet2DConditional

    wide = UNet2DConditional(dataclasses.replace(pipe.unet.config, cross_attention_dim=48))
    with pytest.raises(ConfigError, match="cross-attention") as info:
        LatentDiffusionPipeline(vae=pipe.vae, unet=wide, text_encoder=pipe.text_encoder)
    assert info.value.where == "unet.config.cross_attention_dim" and info.value.found == 48
    nine = UNet2DConditional(dataclasses.replace(pipe.unet.config, in_channels=9))
    with pytest.raises(ConfigError, match="in_channels"):
        LatentDiffusionPipeline(vae=pipe.vae, unet=nine, text_encoder=pipe.text_encoder)
