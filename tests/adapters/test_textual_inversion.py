"""Textual inversion (issue 16): the A1111 / kohya / diffusers embedding files, applied as diffusers'
load_textual_inversion applies them (same images on the tiny Stable Diffusion), unloaded back to the original
tokenizer and token-embedding table bit for bit, all or nothing on errors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from latentdiff import CheckpointError, InputError
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests._support.parity import assert_parity
from tests._support.sd import tiny_diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
WIDTH = 32      # the tiny CLIP's hidden size
RUN = dict(num_inference_steps=2, output_type="pt")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, diffusers):
    root = tmp_path_factory.mktemp("ti")
    sd = tiny_diffusers_pipeline(root)
    sd.save_pretrained(root / "sd")
    return sd, LatentDiffusionPipeline.from_pretrained(root / "sd"), root


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(7)
    one, three = torch.randn(WIDTH, generator=g), torch.randn(3, WIDTH, generator=g)
    paths = {"diffusers": tmp_path / "learned_embeds.bin", "a1111_pt": tmp_path / "CatToy.pt",
             "kohya": tmp_path / "easyneg.safetensors", "wide": tmp_path / "wide.safetensors"}
    torch.save({"<cat-toy>": one}, paths["diffusers"])
    torch.save({"string_to_param": {"*": three}, "name": "cattoy", "step": 100}, paths["a1111_pt"])
    save_file({"emb_params": three.clone()}, str(paths["kohya"]))
    save_file({"emb_params": torch.randn(2, WIDTH * 2, generator=g)}, str(paths["wide"]))
    return paths


def images(pipe, prompt, negative=""):
    return pipe(prompt, negative_prompt=negative, progress=False, generator=torch.Generator().manual_seed(0),
                **RUN).images


def reference(sd, prompt, negative=""):
    return sd(prompt, negative_prompt=negative, generator=torch.Generator().manual_seed(0), **RUN).images


@pytest.fixture
def clean(setup):
    sd, pipe, _ = setup
    yield sd, pipe
    sd.unload_textual_inversion()
    pipe.unload_textual_inversion()


@pytest.mark.parametrize(("kind", "token", "prompt"), [
    ("diffusers", None, "a photo of <cat-toy>"),                    # single vector, the file's own token
    ("a1111_pt", "cattoy", "a cattoy dog"),                          # 3 vectors: cattoy cattoy_1 cattoy_2
    ("kohya", "easyneg", "a photo of easyneg, cat"),                 # emb_params safetensors, 3 vectors
])
def test_images_match_diffusers(clean, files, kind, token, prompt):
    sd, pipe = clean
    sd.load_textual_inversion(str(files[kind]), token=token)
    pipe.load_textual_inversion(files[kind], token=token)
    with torch.no_grad():
        expected = reference(sd, prompt, negative=prompt.split()[-1])
    assert_parity(images(pipe, prompt, negative=prompt.split()[-1]), expected, 1e-4)


def test_default_tokens_and_negative_prompt(clean, files):
    sd, pipe = clean
    base = images(pipe, "a photo of a cat", "dog")
    pipe.load_textual_inversion([files["a1111_pt"], files["diffusers"]])        # the stem; the file's key
    assert pipe.text_encoder.tokenizer.get_vocab().keys() >= {"CatToy", "CatToy_1", "CatToy_2", "<cat-toy>"}
    assert pipe.text_encoder.expand_tokens(["a CatToy b"]) == ["a CatToy CatToy_1 CatToy_2 b"]
    with_negative = images(pipe, "a photo of a cat", "dog CatToy")
    assert not torch.equal(with_negative, base)
    assert torch.equal(images(pipe, "a photo of a cat", "dog"), base)           # unused tokens change nothing


def test_unload_restores_exactly(clean, files):
    _, pipe = clean
    encoder = pipe.text_encoder
    tokenizer, weight = encoder.tokenizer, encoder.model.embeddings.token_embedding.weight
    saved = weight.detach().clone()
    base = images(pipe, "a photo of a cat")
    pipe.load_textual_inversion(files["diffusers"])
    pipe.load_textual_inversion(files["kohya"])
    rows = encoder.model.embeddings.token_embedding.weight
    assert rows.shape[0] == saved.shape[0] + 4 and torch.equal(rows[: saved.shape[0]], saved)
    pipe.unload_textual_inversion("<cat-toy>")                                  # one of two
    assert "<cat-toy>" not in encoder.tokenizer.get_vocab() and "easyneg_2" in encoder.tokenizer.get_vocab()
    assert encoder.model.embeddings.token_embedding.weight.shape[0] == saved.shape[0] + 3
    pipe.unload_textual_inversion()
    assert encoder.tokenizer is tokenizer and encoder.model.embeddings.token_embedding.weight is weight
    assert torch.equal(weight, saved) and torch.equal(images(pipe, "a photo of a cat"), base)


def test_errors_change_nothing(clean, files):
    _, pipe = clean
    encoder = pipe.text_encoder
    pipe.load_textual_inversion(files["diffusers"])
    tokenizer, weight = encoder.tokenizer, encoder.model.embeddings.token_embedding.weight
    with pytest.raises(CheckpointError, match="width") as error:
        pipe.load_textual_inversion([files["kohya"], files["wide"]])            # the second fails: neither loads
    assert "wide.safetensors: emb_params" in str(error.value) and str(WIDTH) in str(error.value)
    with pytest.raises(InputError, match="already in the tokenizer"):
        pipe.load_textual_inversion(files["kohya"], token="cat</w>")
    with pytest.raises(InputError, match="already"):
        pipe.load_textual_inversion(files["diffusers"])                         # loaded already
    with pytest.raises(InputError, match="no embedding is loaded"):
        pipe.unload_textual_inversion("nope")
    assert encoder.tokenizer is tokenizer and encoder.model.embeddings.token_embedding.weight is weight
    assert encoder.token_expansions == {}


def test_sdxl_embedding_is_refused(clean, tmp_path):
    _, pipe = clean
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(path))
    with pytest.raises(CheckpointError, match="SDXL") as error:
        pipe.load_textual_inversion(path)
    assert "xl.safetensors" in str(error.value)


def test_a_hub_repo_a_folder_and_a_state_dict(clean, files, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from tests._support.hub_cache import make_hub_cache

    _, pipe = clean
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "learned_embeds.bin").write_bytes(files["diffusers"].read_bytes())
    make_hub_cache(tmp_path / "cache", "sd-concepts-library/cat-toy", repo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputError, match="unknown option") as error:
        pipe.load_textual_inversion("sd-concepts-library/cat-toy", proxies={})
    assert "proxies" in str(error.value) and "hf_token" in str(error.value)
    pipe.load_textual_inversion("sd-concepts-library/cat-toy", local_files_only=True)
    from_hub = images(pipe, "a photo of <cat-toy>")
    pipe.unload_textual_inversion()
    pipe.load_textual_inversion(repo, token="<cat-toy>")                        # the folder's learned_embeds.bin
    assert torch.equal(images(pipe, "a photo of <cat-toy>"), from_hub)
    pipe.unload_textual_inversion()
    pipe.load_textual_inversion(torch.load(files["diffusers"], weights_only=True))   # {"<cat-toy>": tensor}
    assert torch.equal(images(pipe, "a photo of <cat-toy>"), from_hub)


def test_saving_with_embeddings_loaded_is_refused_before_writing(clean, files, tmp_path):
    from latentdiff.errors import UsageError

    _, pipe = clean
    pipe.load_textual_inversion(files["diffusers"])
    with pytest.raises(UsageError, match="unload_textual_inversion") as error:
        pipe.save_pretrained(tmp_path / "saved")
    assert "<cat-toy>" in str(error.value) and not (tmp_path / "saved").exists()
