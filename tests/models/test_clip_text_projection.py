"""SDXL's text-encoder half: latentdiff's CLIPTextModelWithProjection (models/clip_text.py) against transformers'
on the same weights and folders, and TextEncoder.encode_with_pooled (the penultimate hidden states, the pooled
projected embedding, SDXL's clip_skip numbering) against what diffusers' StableDiffusionXLPipeline.encode_prompt
reads from transformers' outputs."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentdiff.errors import CheckpointError, ConfigError, InputError
from latentdiff.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from latentdiff.models.text_encoder import TextEncoder, TextEncoderConfig, load_text_model, load_tokenizer
from tests._support.parity import assert_parity
from tests._support.tiny_clip import (
    TINY_VOCAB_SIZE,
    random_clip_text_model,
    run_without_transformers,
    tiny_clip_config,
    write_tiny_clip_tokenizer,
)

PROJECTION_DIM = 24  # != hidden_size, so a transposed projection cannot pass
# (hidden_act, eos rule): bigG is gelu with a modern eos id; transformers' pre-fix configs say eos_token_id 2.
VARIANTS = [("gelu", "modern"), ("quick_gelu", "legacy"), ("gelu", "legacy"), ("quick_gelu", "modern")]
PROMPTS = ["a photo of a cat", "the dog", ""]


def ref_config(hidden_act: str, eos: str, *, layers: int = 3):
    config = tiny_clip_config(hidden_act=hidden_act, num_hidden_layers=layers,
                              vocab_size=TINY_VOCAB_SIZE + 8)  # ids above the end token: the two rules differ
    config.projection_dim = PROJECTION_DIM
    if eos == "legacy":
        config.eos_token_id = 2
    return config


def token_ids(config) -> torch.Tensor:
    """(3, 77) ids where the legacy rule (highest id) and the modern one (first end token) pick other positions."""
    ids = torch.randint(0, TINY_VOCAB_SIZE - 2, (3, 77), generator=torch.Generator().manual_seed(0))
    end = TINY_VOCAB_SIZE - 1
    ids[:, 20] = ids[:, 50] = end          # the modern rule: position 20 (the first)
    ids[:, 35] = TINY_VOCAB_SIZE + 7       # the legacy rule: position 35 (the highest id)
    assert config.eos_token_id in (2, end)
    return ids


def write_folders(root, hidden_act: str, eos: str):
    """transformers' folders of both classes (as transformers 5 writes them) over one config."""
    config = ref_config(hidden_act, eos)
    for architecture in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        random_clip_text_model(config, seed=3, architecture=architecture).save_pretrained(root / architecture)
    return root


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def folders(request, tmp_path_factory):
    return write_folders(tmp_path_factory.mktemp("sdxl_text"), *request.param)


@pytest.fixture(scope="module")
def bigg(tmp_path_factory):
    """The bigG-like variant alone, for the tests of files and errors."""
    return write_folders(tmp_path_factory.mktemp("bigg"), "gelu", "modern")


@pytest.mark.parametrize("architecture", ["CLIPTextModelWithProjection", "CLIPTextModel"])
def test_parity_with_transformers(folders, architecture):
    import transformers

    ours = load_text_model(folders / architecture)
    ref = getattr(transformers, architecture).from_pretrained(folders / architecture).eval()
    assert type(ours).__name__ == architecture and type(ours).__module__.startswith("latentdiff")
    ids = token_ids(ours.config)
    mask = torch.ones_like(ids)
    mask[1, 60:] = 0
    with torch.no_grad():
        for attention_mask in (None, mask):
            a = ours(ids, attention_mask=attention_mask, output_hidden_states=True)
            b = ref(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
            pooled = "text_embeds" if architecture == "CLIPTextModelWithProjection" else "pooler_output"
            assert_parity(getattr(a, pooled), getattr(b, pooled))
            assert_parity(a.last_hidden_state, b.last_hidden_state)
            assert len(a.hidden_states) == len(b.hidden_states) == 4
            for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
                assert_parity(x, y)
            assert a[0].shape == b[0].shape  # diffusers takes the pooled embedding as out[0] when it is 2-D
    assert tuple(a[0].shape) == ((3, PROJECTION_DIM) if pooled == "text_embeds" else (3, 77, 32))


def test_the_two_end_token_rules_pick_different_positions(folders):
    """The ids above make the pooled output depend on the rule, so the parity test checks the right one."""
    model = load_text_model(folders / "CLIPTextModel")
    ids = token_ids(model.config)
    with torch.no_grad():
        out = model(ids)
    position = 35 if model.config.eos_token_id == 2 else 20
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, position])
    assert not torch.allclose(out.last_hidden_state[:, 35], out.last_hidden_state[:, 20])


def diffusers_reads(model, ids: torch.Tensor, clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """What StableDiffusionXLPipeline.encode_prompt takes from a transformers encoder's output: hidden_states[-2]
    (no final norm), or hidden_states[-(clip_skip + 2)]; the pooled embedding is out[0] when 2-D (the projection
    model's text_embeds), for the tower alone its pooler_output (computed, unused by SDXL)."""
    out = model(ids, output_hidden_states=True)
    hidden = out.hidden_states[-2] if clip_skip is None else out.hidden_states[-(clip_skip + 2)]
    return hidden, out[0] if out[0].ndim == 2 else out.pooler_output


@pytest.mark.parametrize("architecture", ["CLIPTextModelWithProjection", "CLIPTextModel"])
def test_encode_with_pooled_follows_sdxl(bigg, architecture, tmp_path):
    import transformers

    tokenizer_dir = write_tiny_clip_tokenizer(tmp_path / "tokenizer")
    ours = TextEncoder(load_text_model(bigg / architecture), load_tokenizer(tokenizer_dir))
    ref_model_ = getattr(transformers, architecture).from_pretrained(bigg / architecture).eval()
    ref = TextEncoder(ref_model_, transformers.CLIPTokenizer.from_pretrained(tokenizer_dir))  # transformers backend
    ids = ours.tokenize(PROMPTS)
    assert torch.equal(ids, ref.tokenize(PROMPTS))
    sdxl = dict(layer="penultimate", apply_final_norm=False)
    with torch.no_grad():
        for clip_skip in (None, 1):
            expected = diffusers_reads(ref_model_, ids, clip_skip)
            for encoder in (ours, ref):
                hidden, pooled = encoder.encode_with_pooled(ids, clip_skip=clip_skip, **sdxl)
                assert_parity(hidden, expected[0])
                assert_parity(pooled, expected[1])
        # the config's layer when none is given: encode_ids' hidden states, the same pooled embedding
        for config in (TextEncoderConfig(), TextEncoderConfig(layer="penultimate"),
                       TextEncoderConfig(apply_final_norm=False)):
            encoder = TextEncoder(ours.model, ours.tokenizer, config)
            hidden, pooled = encoder.encode_with_pooled(ids)
            assert torch.equal(hidden, encoder.encode_ids(ids))
            assert_parity(pooled, expected[1])
        assert not torch.allclose(ours.encode_with_pooled(ids, **sdxl)[0], ours.encode_ids(ids), atol=1e-3)
        raw = TextEncoder(ours.model, ours.tokenizer, TextEncoderConfig(**sdxl))  # SDXL's choice as a config
        assert_parity(raw.encode_with_pooled(ids, clip_skip=1)[0], diffusers_reads(ref_model_, ids, 1)[0])


def test_encode_with_pooled_rejects_bad_choices(bigg, tmp_path):
    encoder = TextEncoder(load_text_model(bigg / "CLIPTextModelWithProjection"),
                          load_tokenizer(write_tiny_clip_tokenizer(tmp_path / "tokenizer")))
    ids = encoder.tokenize(PROMPTS)
    with pytest.raises(InputError, match="layer"):
        encoder.encode_with_pooled(ids, layer="first")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="clip_skip"):  # 3 layers; penultimate: 2 left to count back from
        encoder.encode_with_pooled(ids, layer="penultimate", apply_final_norm=False, clip_skip=2)
    with pytest.raises(InputError, match="input_ids"):
        encoder.encode_with_pooled(ids.float())


def test_saved_bigg_load_strictly_in_transformers(bigg, tmp_path):
    import transformers

    source = bigg / "CLIPTextModelWithProjection"
    ours = load_text_model(source)
    ref_class = transformers.CLIPTextModelWithProjection
    tokenizer = load_tokenizer(write_tiny_clip_tokenizer(tmp_path / "tokenizer"))
    ours.save_pretrained(tmp_path / "model")
    TextEncoder(ours, tokenizer).save_pretrained(tmp_path / "encoder")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["architectures"] == \
        ["CLIPTextModelWithProjection"]
    assert TextEncoder(ours, tokenizer).diffusers_entries()["text_encoder"] == \
        ["transformers", "CLIPTextModelWithProjection"]
    assert set(load_file(tmp_path / "model" / "model.safetensors")) == set(load_file(source / "model.safetensors"))
    ids = token_ids(ours.config)
    for folder in (tmp_path / "model", tmp_path / "encoder"):
        ref, info = ref_class.from_pretrained(folder, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        with torch.no_grad():
            assert torch.equal(ref.eval()(ids).text_embeds, ours(ids).text_embeds)
        again = TextEncoder.from_pretrained(folder, tokenizer=tokenizer).model
        assert type(again) is CLIPTextModelWithProjection
        assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_flat_keys_and_old_position_ids_load(bigg, tmp_path):
    source = bigg / "CLIPTextModelWithProjection"
    state = load_file(source / "model.safetensors")
    flat = {k.removeprefix("text_model."): v for k, v in state.items()}
    assert "text_projection.weight" in flat and "embeddings.token_embedding.weight" in flat
    old = {**state, "text_model.embeddings.position_ids": torch.arange(77)[None]}  # transformers < 4.31
    for name, weights in (("flat", flat), ("old", old)):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        save_file(weights, folder / "model.safetensors")
        model = load_text_model(folder)
        assert type(model) is CLIPTextModelWithProjection
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_strict_loading_names_the_key(bigg, tmp_path):
    source = bigg / "CLIPTextModelWithProjection"
    state = load_file(source / "model.safetensors")
    for name, weights, key in (
            ("missing", {k: v for k, v in state.items() if k != "text_projection.weight"}, "text_projection.weight"),
            ("extra", {**state, "text_projection.bias": torch.zeros(PROJECTION_DIM)}, "text_projection.bias"),
            ("shape", {**state, "text_projection.weight": state["text_projection.weight"].T.contiguous()},
             "text_projection.weight")):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        save_file(weights, folder / "model.safetensors")
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
            load_text_model(folder)


def test_unimplemented_settings_go_to_transformers(bigg, tmp_path):
    source = bigg / "CLIPTextModelWithProjection"
    data = json.loads((source / "config.json").read_text())
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPTextModelWithProjection.from_file_config({**data, "hidden_act": "gelu_new"}, source="config.json")
    with pytest.raises(ConfigError, match="architectures"):  # the tower alone is read as CLIPTextModel
        CLIPTextModelWithProjection.from_file_config({k: v for k, v in data.items() if k != "architectures"})
    with pytest.raises(ConfigError, match="architectures"):
        CLIPTextModel.from_file_config(data)
    folder = tmp_path / "gelu_new"
    shutil.copytree(source, folder)
    (folder / "config.json").write_text(json.dumps({**data, "hidden_act": "gelu_new"}))
    for model in (load_text_model(folder), load_text_model(source, backend="transformers")):
        assert type(model).__module__.startswith("transformers")
        assert type(model).__name__ == "CLIPTextModelWithProjection"


def test_loads_and_runs_without_transformers(bigg):
    run_without_transformers(f"""
        from pathlib import Path
        import torch
        from latentdiff.models.text_encoder import load_text_model
        model = load_text_model(Path({str(bigg / "CLIPTextModelWithProjection")!r}))
        assert type(model).__name__ == "CLIPTextModelWithProjection"
        out = model(torch.tensor([[1, 2, 3, {TINY_VOCAB_SIZE - 1}]]), output_hidden_states=True)
        assert out.text_embeds.shape == (1, {PROJECTION_DIM}) and len(out.hidden_states) == 4
    """)
