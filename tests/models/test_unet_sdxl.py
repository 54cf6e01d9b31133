"""The SDXL UNet as UNet2DConditional configuration: parity with diffusers' UNet2DConditionModel on SDXL- and
refiner-structure configs at reduced width, config.json both ways, folders both ways, and bad micro-conditioning.

The structure kept from the real configs: the level without attention first, transformer depths 1 / 2 / 10
(base; the mid block takes the last level's 10) or 4 everywhere (refiner, 4 levels, the last without attention
but with a cross-attention mid block), linear projections, the `text_time` embedding of 6 (5) micro-conditioning
numbers and a pooled text embedding, a context as wide as two text encoders' hidden states concatenated.
Only the widths are reduced (the full 2.6 B-parameter model is compared on the meta device: keys and shapes).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from latentdiff.errors import CheckpointError, ConfigError, InputError
from latentdiff.models.unet import UNet2DConditional, UNetConfig
from tests._support.parity import assert_parity, max_rel_error, randomize_

CROSS, DOWN, CROSS_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"

# The keys of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 unet/config.json that differ from
# diffusers' defaults (the rest are defaults there too)
SDXL_BASE = dict(
    sample_size=128, block_out_channels=[320, 640, 1280], down_block_types=[DOWN, CROSS, CROSS],
    up_block_types=[CROSS_UP, CROSS_UP, UP], transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, use_linear_projection=True)
SDXL_REFINER = dict(
    sample_size=128, block_out_channels=[384, 768, 1536, 1536], down_block_types=[DOWN, CROSS, CROSS, DOWN],
    up_block_types=[UP, CROSS_UP, CROSS_UP, UP], transformer_layers_per_block=4, attention_head_dim=[6, 12, 24, 24],
    cross_attention_dim=1280, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560, use_linear_projection=True)

POOLED, TIME_DIM = 16, 8   # reduced pooled text width and per-number sinusoid width
# base structure at reduced width: context 8 + 16 wide (CLIP-L's and bigG's hidden states, concatenated)
TINY_BASE = dict(
    SDXL_BASE, sample_size=8, block_out_channels=[16, 32, 48], attention_head_dim=[1, 2, 4], norm_num_groups=8,
    cross_attention_dim=8 + 16, addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM)
# refiner structure: 4 levels, depth 4 everywhere, 5 numbers (original size, crop top-left, aesthetic score)
TINY_REFINER = dict(
    SDXL_REFINER, sample_size=8, block_out_channels=[16, 32, 48, 48], attention_head_dim=[1, 2, 4, 4],
    norm_num_groups=8, cross_attention_dim=16, addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM)


def pair(kwargs: dict, *, seed: int = 0):
    """(diffusers reference, ours) on the same random weights; ours is loaded from the reference's state dict
    (from_state_dict loads strictly: the add embedding's keys must be diffusers')."""
    torch.manual_seed(seed)
    ref = randomize_(UNet2DConditionModel(**kwargs)).eval()
    ours = UNet2DConditional.from_state_dict(UNet2DConditional.from_file_config(kwargs), ref.state_dict())
    return ref, ours


def inputs(kwargs: dict, *, batch: int = 2, tokens: int = 5, seed: int = 1):
    """x, t, context and added_cond; time ids at pixel scale, different per sample (as a CFG batch's are not)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    context = torch.randn(batch, tokens, kwargs["cross_attention_dim"], generator=g)
    k = (kwargs["projection_class_embeddings_input_dim"] - POOLED) // TIME_DIM
    ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 64.0, 32.0, 1024.0, 896.0]])
    if k == 5:  # the refiner's: original size, crop top-left, aesthetic score
        ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0], [768.0, 512.0, 64.0, 32.0, 2.5]])
    added = {"text_embeds": torch.randn(batch, POOLED, generator=g), "time_ids": ids[:batch]}
    return x, torch.tensor([999, 17])[:batch], context, added


@pytest.fixture(scope="module")
def base():
    return pair(TINY_BASE)


@pytest.fixture(scope="module")
def refiner():
    return pair(TINY_REFINER, seed=3)


def check_parity(ref, ours, kwargs: dict) -> None:
    x, t, context, added = inputs(kwargs)
    with torch.no_grad():
        expected = ref(x, t, context, added_cond_kwargs=added).sample
        actual = ours(x, t, context, added_cond=added)
    assert actual.dtype == expected.dtype
    assert_parity(actual, expected)


# ---- structure and parity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [SDXL_BASE, SDXL_REFINER], ids=["base", "refiner"])
def test_full_size_config_reads_and_builds_diffusers_parameters(kwargs):
    """The real configs: per-level heads and depths as diffusers interprets them, the mid block at the last
    level's depth, and the same parameter names and shapes (meta device: no memory, no init)."""
    config = UNet2DConditional.from_file_config(kwargs)
    assert config.attention_levels == tuple(b == CROSS for b in kwargs["down_block_types"])
    assert config.addition_embed_type == "text_time" and config.use_linear_projection
    with torch.device("meta"):
        ref = UNet2DConditionModel(**kwargs)
        ours = UNet2DConditional(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    depth = config.per_level(config.transformer_depth)[-1]
    assert len(ours.mid_block.attentions[0].transformer_blocks) == depth == len(
        ref.mid_block.attentions[0].transformer_blocks)
    assert ours.add_embedding.linear_1.in_features == kwargs["projection_class_embeddings_input_dim"]


def test_sdxl_structure_parity(base):
    ref, ours = base
    assert [len(a.transformer_blocks) for blk in ours.down_blocks if blk.attentions for a in blk.attentions] \
        == [2, 2, 10, 10]
    assert ours.down_blocks[0].attentions is None and ours.up_blocks[-1].attentions is None
    check_parity(ref, ours, TINY_BASE)


def test_refiner_structure_parity(refiner):
    ref, ours = refiner
    assert ours.down_blocks[3].attentions is None and len(ours.mid_block.attentions[0].transformer_blocks) == 4
    check_parity(ref, ours, TINY_REFINER)


def test_micro_conditioning_moves_the_output(base):
    """Each part of added_cond reaches the output (a parity test that ignored it on both sides would still pass):
    one batch of three copies of sample 0, then with a shifted crop, then with another pooled embedding."""
    _, ours = base
    x, t, context, added = inputs(TINY_BASE)
    ids, text = added["time_ids"][:1].repeat(3, 1), added["text_embeds"][[0, 0, 1]]
    ids[1, 2] += 8
    with torch.no_grad():
        out = ours(x[:1].repeat(3, 1, 1, 1), t[:1], context[:1].repeat(3, 1, 1),
                   added_cond={"text_embeds": text, "time_ids": ids})
    assert max_rel_error(out[1], out[0]) > 1e-3 and max_rel_error(out[2], out[0]) > 1e-3


def test_integer_time_ids_and_low_precision(base):
    """time_ids may be integers (sinusoids in fp32 either way); under bf16 weights the features are computed in
    fp32 and cast once, as diffusers casts its concatenation to the time embedding's dtype."""
    _, ours = base
    _, _, _, added = inputs(TINY_BASE)
    full = ours._text_time_features(added, torch.float32)
    assert torch.equal(ours._text_time_features({**added, "time_ids": added["time_ids"].long()}, torch.float32), full)
    features = ours._text_time_features(added, torch.bfloat16)
    assert features.dtype == torch.bfloat16 and features.shape == (2, POOLED + 6 * TIME_DIM)
    assert torch.equal(features, full.bfloat16())


# ---- config.json and folders ------------------------------------------------------------------------------

def test_file_config_round_trip_keeps_text_time():
    config = UNet2DConditional.from_file_config(TINY_REFINER)
    with torch.device("meta"):
        file_config = UNet2DConditional(config).to_file_config()
    assert (file_config["addition_embed_type"], file_config["addition_time_embed_dim"],
            file_config["projection_class_embeddings_input_dim"]) == ("text_time", TIME_DIM, POOLED + 5 * TIME_DIM)
    assert file_config["transformer_layers_per_block"] == 4 and file_config["attention_head_dim"] == [1, 2, 4, 4]
    assert UNet2DConditional.from_file_config(file_config) == config


def test_widths_without_text_time_are_ignored_as_diffusers_does():
    plain = {k: v for k, v in TINY_BASE.items() if k != "addition_embed_type"}
    config = UNet2DConditional.from_file_config(plain)
    assert config.addition_embed_type is None and config.addition_time_embed_dim is None
    with torch.device("meta"):
        assert not any(k.startswith("add_embedding") for k in UNet2DConditional(config).state_dict())


def test_folder_saved_by_diffusers_loads(tmp_path, base):
    ref, _ = base
    ref.save_pretrained(tmp_path / "unet")
    ours = UNet2DConditional.from_pretrained(tmp_path / "unet")
    assert ours.config == UNet2DConditional.from_file_config(TINY_BASE)
    # the same weights under the same names (parity on these weights: test_sdxl_structure_parity)
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_folder_saved_by_us_loads_in_diffusers(tmp_path, refiner):
    _, ours = refiner
    ours.save_pretrained(tmp_path / "unet")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert back.config.addition_embed_type == "text_time"
    assert back.config.projection_class_embeddings_input_dim == POOLED + 5 * TIME_DIM
    assert set(back.state_dict()) == set(ours.state_dict())
    check_parity(back, ours, TINY_REFINER)


def test_missing_add_embedding_weights_are_a_checkpoint_error(base):
    ref, ours = base
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("add_embedding.")}
    with pytest.raises(CheckpointError) as info:
        UNet2DConditional.from_state_dict(ours.config, state)
    assert "add_embedding.linear_1" in str(info.value)


# ---- bad configs and inputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,field", [
    (dict(addition_embed_type="text_time"), "addition_time_embed_dim"),
    (dict(addition_embed_type="text_time", addition_time_embed_dim=8), "projection_class_embeddings_input_dim"),
    (dict(addition_time_embed_dim=8), "addition_time_embed_dim"),
    (dict(projection_class_embeddings_input_dim=64), "projection_class_embeddings_input_dim"),
    (dict(addition_embed_type="text", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64),
     "addition_embed_type"),
    (dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8),
     "projection_class_embeddings_input_dim"),
])
def test_bad_text_time_config_names_the_field(changes, field):
    with pytest.raises(ConfigError) as info:
        UNetConfig(**changes)
    assert info.value.where == field


def test_unsupported_addition_embed_in_file_names_the_key():
    with pytest.raises(ConfigError) as info:
        UNet2DConditional.from_file_config({**TINY_BASE, "addition_embed_type": "image"}, source="unet/config.json")
    assert "addition_embed_type" in str(info.value)


def _bad_added_cond(added):
    return [
        (None, "added_cond"),
        ([added["text_embeds"], added["time_ids"]], "added_cond"),
        ({"text_embeds": added["text_embeds"]}, "added_cond['time_ids']"),
        ({"time_ids": added["time_ids"]}, "added_cond['text_embeds']"),
        ({**added, "time_ids": added["time_ids"][:, :5]}, "added_cond"),        # 5 numbers: a refiner's
        ({**added, "time_ids": added["time_ids"][:1]}, "added_cond['time_ids']"),  # one row for a batch of 2
        ({**added, "time_ids": added["time_ids"].flatten()}, "added_cond['time_ids']"),
        ({**added, "text_embeds": added["text_embeds"][:, :8]}, "added_cond"),
        ({**added, "text_embeds": added["text_embeds"].long()}, "added_cond['text_embeds']"),
        ({**added, "time_ids": added["time_ids"] > 0}, "added_cond['time_ids']"),
        ({**added, "time_ids": [[1024, 1024, 0, 0, 1024, 1024]] * 2}, "added_cond['time_ids']"),
        ({**added, "image_embeds": added["text_embeds"]}, "added_cond['image_embeds']"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_added_cond_names_what_and_expected(base, case):
    x, t, context, added = inputs(TINY_BASE)
    bad, where = _bad_added_cond(added)[case]
    with pytest.raises(InputError) as info:
        base[1](x, t, context, added_cond=bad)
    assert info.value.where == where
    assert "time_ids" in str(info.value.expected) and str(POOLED + 6 * TIME_DIM) in str(info.value.expected)


def test_added_cond_on_a_unet_without_text_time():
    kwargs = {k: v for k, v in TINY_BASE.items() if k != "addition_embed_type"}
    ours = UNet2DConditional(UNet2DConditional.from_file_config(kwargs))
    x, t, context, added = inputs(TINY_BASE)
    with pytest.raises(InputError) as info:
        ours(x, t, context, added_cond=added)
    assert info.value.where == "added_cond" and "addition_embed_type" in str(info.value)
    assert ours(x, t, context).shape == x.shape
