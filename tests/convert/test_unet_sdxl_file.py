"""SDXL's UNet in the original (Stability generative-models) single-file layout: the text_time embedding is
`label_emb.0.0` / `label_emb.0.2` there and `add_embedding.linear_1/2` in latentdiff (diffusers' names). A tiny
SDXL-structure UNet goes to the original keys through UNetArch's keymap inverted (as the single-file writer does)
and back, bit for bit, strictly."""
from __future__ import annotations

import pytest
import torch

from latentdiff.convert.keymap import apply_keymap, invert
from latentdiff.convert.unet_ldm import UNetArch
from latentdiff.errors import CheckpointError
from latentdiff.models.unet import UNet2DConditional
from tests._support.convert import same_tensors
from tests._support.parity import randomize_

CROSS, DOWN, CROSS_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
POOLED, TIME_DIM = 16, 8
# SDXL base's structure (levels without attention / 1 / 2 transformer blocks, linear projections) at reduced width;
# 32 norm groups: the original layout (UNetArch) has no other
TINY_SDXL = dict(
    sample_size=8, block_out_channels=[32, 64, 96], down_block_types=[DOWN, CROSS, CROSS],
    up_block_types=[CROSS_UP, CROSS_UP, UP], transformer_layers_per_block=[1, 1, 2], attention_head_dim=[1, 2, 4],
    cross_attention_dim=24, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM, use_linear_projection=True)


def tiny_sdxl() -> UNet2DConditional:
    torch.manual_seed(0)
    config = UNet2DConditional.from_file_config(TINY_SDXL)
    return randomize_(UNet2DConditional.from_state_dict(config, UNet2DConditional(config).state_dict())).eval()


def test_sdxl_unet_round_trips_through_the_original_layout():
    model = tiny_sdxl()
    arch = UNetArch.from_config(model.config)
    assert arch.text_time and arch.addition_time_embed_dim == TIME_DIM
    assert arch.to_config() == model.config
    assert UNetArch.from_diffusers_config(arch.to_diffusers_config()) == arch

    state = model.state_dict()
    original = apply_keymap(state, invert(arch.keymap()), source="to_single_file")
    for key, ours in (("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
                      ("label_emb.0.2.bias", "add_embedding.linear_2.bias")):
        assert torch.equal(original[key], state[ours])
    assert original["label_emb.0.0.weight"].shape == (4 * 32, POOLED + 6 * TIME_DIM)
    assert not [k for k in original if "add_embedding" in k or "class_embedding" in k]

    back = apply_keymap(original, arch.keymap(), source="from_single_file")
    same_tensors(back, state)
    rebuilt = UNet2DConditional.from_state_dict(arch.to_config(), back)  # strict

    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g)
    added = {"text_embeds": torch.randn(2, POOLED, generator=g),
             "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0],
                                       [768.0, 512.0, 64.0, 32.0, 1024.0, 896.0]])}
    t = torch.tensor([999, 17])
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t, context, added_cond=added), model(x, t, context, added_cond=added))


def test_label_emb_without_text_time_stays_a_projection_class_embedding():
    """The same original keys hold a projection class embedding in other families: only text_time moves them."""
    model = tiny_sdxl()
    plain = UNetArch.from_config(model.config)
    for arch, target in ((plain, "add_embedding"),
                         (UNetArch(**{**plain.__dict__, "addition_embed_type": None, "addition_time_embed_dim": None}),
                          "class_embedding")):
        mapped = apply_keymap({"label_emb.0.0.weight": torch.zeros(1), "label_emb.0.2.bias": torch.zeros(1)},
                              [r for r in arch.keymap() if "label_emb" in str(r)], source="t")
        assert sorted(mapped) == [f"{target}.linear_1.weight", f"{target}.linear_2.bias"]


def test_text_time_with_a_projection_class_embedding_is_refused_by_name():
    """Both would be label_emb.0 in the original layout: one would silently take the other's weights."""
    with pytest.raises(CheckpointError) as info:
        UNetArch.from_config(tiny_sdxl().config, projection_class_embeddings_input_dim=10)
    assert info.value.where == "class_embed_type"
