"""SDXL's text encoders as Stability's generative-models single files hold them (`conditioner.embedders.N.`):
CLIP ViT-L in transformers' layout and OpenCLIP ViT-bigG in OpenCLIP's (fused in_proj, a (hidden, proj)
projection matrix), converted by text_ldm's tables to latentdiff's CLIPTextModel / CLIPTextModelWithProjection
and back. The original layout is written here by hand from transformers' weights (an independent path)."""
from __future__ import annotations

import pytest
import torch

from latentdiff.convert.text_ldm import sdxl_text_from_original, sdxl_text_to_original
from latentdiff.errors import CheckpointError
from latentdiff.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from tests._support.parity import assert_parity
from tests._support.tiny_clip import TINY_VOCAB_SIZE, random_clip_text_model, tiny_clip_config

PROJECTION_DIM = 24  # != hidden_size (32): a projection left untransposed cannot load
LAYERS = 3
BIGG = "conditioner.embedders.1."
CLIP_L = "conditioner.embedders.0."
UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"  # another part of the file, left alone


def reference(architecture: str, hidden_act: str):
    config = tiny_clip_config(hidden_act=hidden_act, num_hidden_layers=LAYERS)
    config.projection_dim = PROJECTION_DIM
    return random_clip_text_model(config, seed=5, architecture=architecture)


def openclip_layout(model, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP's text tower keys as SDXL's FrozenOpenCLIPEmbedder2 saves them, from a transformers model."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t = "text_model."
    out = {"model.token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
           "model.positional_embedding": sd[t + "embeddings.position_embedding.weight"],
           "model.ln_final.weight": sd[t + "final_layer_norm.weight"],
           "model.ln_final.bias": sd[t + "final_layer_norm.bias"],
           "model.text_projection": sd["text_projection.weight"].t().contiguous(),  # x @ P: P is (hidden, proj)
           "model.logit_scale": torch.tensor(4.6052)}
    for i in range(LAYERS):
        ours, theirs = f"{t}encoder.layers.{i}.", f"model.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{p}"] = torch.cat([sd[f"{ours}self_attn.{x}_proj.{p}"] for x in "qkv"])
            out[f"{theirs}attn.out_proj.{p}"] = sd[f"{ours}self_attn.out_proj.{p}"]
            out[f"{theirs}ln_1.{p}"] = sd[f"{ours}layer_norm1.{p}"]
            out[f"{theirs}ln_2.{p}"] = sd[f"{ours}layer_norm2.{p}"]
            out[f"{theirs}mlp.c_fc.{p}"] = sd[f"{ours}mlp.fc1.{p}"]
            out[f"{theirs}mlp.c_proj.{p}"] = sd[f"{ours}mlp.fc2.{p}"]
    return {prefix + k: v for k, v in out.items()}


def clip_l_layout(model, prefix: str) -> dict[str, torch.Tensor]:
    """SDXL's FrozenCLIPEmbedder: the tower's keys under `transformer.text_model.` (as the released files name them,
    whether or not this transformers' state dict has `text_model.`), with the position-id buffer."""
    out = {f"{prefix}transformer.text_model.{k.removeprefix('text_model.')}": v.detach().clone()
           for k, v in model.state_dict().items()}
    out[f"{prefix}transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def token_ids() -> torch.Tensor:
    ids = torch.randint(0, TINY_VOCAB_SIZE - 2, (2, 77), generator=torch.Generator().manual_seed(1))
    ids[:, 30] = TINY_VOCAB_SIZE - 1  # the end token (pooled / text_embeds position)
    return ids


def load(cls, ref, converted, key_names=None):
    config = cls.from_file_config({**ref.config.to_dict(), "architectures": [cls.architecture]})
    return cls.from_state_dict(config, converted, source="test", key_names=key_names).eval()


def whole_file(ref_g, ref_l, *, refiner: bool = False) -> dict[str, torch.Tensor]:
    sd = {UNET_KEY: torch.randn(4, 4, 3, 3)}
    if refiner:
        return {**sd, **openclip_layout(ref_g, CLIP_L)}
    return {**sd, **clip_l_layout(ref_l, CLIP_L), **openclip_layout(ref_g, BIGG)}


@pytest.fixture(scope="module")
def refs():
    return reference("CLIPTextModelWithProjection", "gelu"), reference("CLIPTextModel", "quick_gelu")


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_bigg_parity_with_transformers(refs, refiner):
    ref, ref_l = refs
    dropped: dict[str, torch.Tensor] = {}
    converted = sdxl_text_from_original(whole_file(ref, ref_l, refiner=refiner), "text_encoder_2",
                                        refiner=refiner, dropped=dropped)
    assert "text_projection.weight" in converted and len(dropped) == 1  # logit_scale, kept aside
    ours = load(CLIPTextModelWithProjection, ref, converted)
    ids = token_ids()
    with torch.no_grad():
        a, b = ours(ids, output_hidden_states=True), ref(ids, output_hidden_states=True)
    assert_parity(a.text_embeds, b.text_embeds)
    assert_parity(a.hidden_states[-2], b.hidden_states[-2])  # SDXL's context: the penultimate layer, all kept
    assert len(a.hidden_states) == LAYERS + 1


def test_clip_l_parity_with_transformers(refs):
    ref_g, ref = refs
    dropped: dict[str, torch.Tensor] = {}
    converted = sdxl_text_from_original(whole_file(ref_g, ref), "text_encoder", dropped=dropped)
    assert list(dropped) == [f"{CLIP_L}transformer.text_model.embeddings.position_ids"]
    ours = load(CLIPTextModel, ref, converted)
    ids = token_ids()
    with torch.no_grad():
        a, b = ours(ids, output_hidden_states=True), ref(ids, output_hidden_states=True)
    assert_parity(a.hidden_states[-2], b.hidden_states[-2])
    assert_parity(a.last_hidden_state, b.last_hidden_state)


@pytest.mark.parametrize("part", ["text_encoder", "text_encoder_2"])
def test_round_trip_bit_for_bit(refs, part):
    file = whole_file(*refs)
    dropped: dict[str, torch.Tensor] = {}
    ours = sdxl_text_from_original(file, part, dropped=dropped)
    back = sdxl_text_to_original(ours, part, dropped=dropped)
    prefix = CLIP_L if part == "text_encoder" else BIGG
    expected = {k: v for k, v in file.items() if k.startswith(prefix)}
    assert sorted(back) == sorted(expected)
    for key, value in expected.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert torch.equal(back[key], value), key


def test_round_trip_from_latentdiff_model(refs):
    """latentdiff -> original -> latentdiff: a model's own state dict (q, k, v fused in that order) comes back."""
    ref = refs[0]
    model = load(CLIPTextModelWithProjection, ref, {k: v.clone() for k, v in ref.state_dict().items()})
    state = model.state_dict()
    original = sdxl_text_to_original(state, "text_encoder_2")
    layer0 = state["text_model.encoder.layers.0.self_attn.k_proj.weight"]
    fused = original[f"{BIGG}model.transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(fused[32:64], layer0)  # k is the middle third
    assert torch.equal(original[f"{BIGG}model.text_projection"], state["text_projection.weight"].t())
    again = sdxl_text_from_original(original, "text_encoder_2")
    assert sorted(again) == sorted(state) and all(torch.equal(again[k], state[k]) for k in state)


def test_extra_key_is_named(refs):
    file = whole_file(*refs)
    file[f"{BIGG}model.transformer.resblocks.0.attn.unknown"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"resblocks\.0\.attn\.unknown"):
        sdxl_text_from_original(file, "text_encoder_2")


def test_missing_key_is_named(refs):
    ref = refs[0]
    file = whole_file(*refs)
    del file[f"{BIGG}model.ln_final.bias"]
    converted = sdxl_text_from_original(file, "text_encoder_2")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): text_model\.final_layer_norm\.bias"):
        load(CLIPTextModelWithProjection, ref, converted)


def test_missing_piece_on_the_way_back_is_named(refs):
    state = sdxl_text_from_original(whole_file(*refs), "text_encoder_2")
    del state["text_model.encoder.layers.1.self_attn.v_proj.bias"]
    with pytest.raises(CheckpointError, match=r"resblocks\.1\.attn\.in_proj_bias"):
        sdxl_text_to_original(state, "text_encoder_2")


def test_extra_layer_fails_the_strict_load(refs):
    """A file with more layers than the config: the converted extra layer is an unexpected key, named."""
    ref = refs[0]
    file = whole_file(*refs)
    for key in [k for k in file if ".resblocks.0." in k]:
        file[key.replace(".resblocks.0.", f".resblocks.{LAYERS}.")] = file[key]
    origins: dict[str, str] = {}
    converted = sdxl_text_from_original(file, "text_encoder_2", origins=origins)
    with pytest.raises(CheckpointError,
                       match=rf"unexpected keys.*encoder\.layers\.{LAYERS}\..*resblocks\.{LAYERS}\."):
        load(CLIPTextModelWithProjection, ref, converted, key_names=origins)


def test_unknown_part_and_absent_encoder(refs):
    file = whole_file(*refs, refiner=True)
    with pytest.raises(CheckpointError, match="text_encoder_2"):
        sdxl_text_from_original(file, "text_encoder", refiner=True)
    with pytest.raises(CheckpointError, match=r"conditioner\.embedders\.1\."):
        sdxl_text_from_original(file, "text_encoder_2")  # a refiner file read as a base one
