"""ControlNet against diffusers' ControlNetModel: residual parity on every weight randomised (the zero convolutions
too, or the test could not fail), SD-1.x- and SDXL-structure configs, folders both ways, from_unet, bad input."""
from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from latentdiff.errors import ConfigError, InputError
from latentdiff.models.controlnet import ControlNet, ControlNetConfig
from latentdiff.models.diffusers_tables import CONTROLNET
from latentdiff.models.unet import UNet2DConditional
from latentdiff.registry import COMPONENTS
from tests._support.parity import assert_parity, max_rel_error, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

CROSS, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
# SD-1.x structure at reduced width: cross-attention on the first level, a cross-attention mid block
TINY_SD = dict(block_out_channels=[32, 64], down_block_types=[CROSS, DOWN], layers_per_block=2,
               cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
               conditioning_embedding_out_channels=[16, 32])
# SDXL structure (tests/models/test_unet_sdxl.py's tiny base): no attention first, depths 1 / 2 / 10 (the mid
# block at 10), linear projections, text_time of a pooled embedding and 6 numbers
POOLED, TIME_DIM = 16, 8
TINY_SDXL = dict(block_out_channels=[16, 32, 48], down_block_types=[DOWN, CROSS, CROSS],
                 transformer_layers_per_block=[1, 2, 10], attention_head_dim=[1, 2, 4], norm_num_groups=8,
                 cross_attention_dim=24, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
                 conditioning_embedding_out_channels=[8, 16, 16])


def pair(kwargs: dict, *, seed: int = 0) -> tuple[ControlNetModel, ControlNet]:
    torch.manual_seed(seed)
    ref = randomize_(ControlNetModel(**kwargs)).eval()
    ours = ControlNet.from_state_dict(ControlNet.from_file_config(kwargs), ref.state_dict())
    return ref, ours


def inputs(kwargs: dict, *, seed: int = 1) -> tuple:
    """x (2, 4, 8, 8), t per sample, context, the control image at 2^(levels - 1) times the latent, added_cond."""
    g = torch.Generator().manual_seed(seed)
    f = 2 ** (len(kwargs["conditioning_embedding_out_channels"]) - 1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 5, kwargs["cross_attention_dim"], generator=g)
    hint = torch.rand(2, 3, 8 * f, 8 * f, generator=g)
    added = None
    if kwargs.get("addition_embed_type"):
        ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 64.0, 32.0, 1024.0, 896.0]])
        added = {"text_embeds": torch.randn(2, POOLED, generator=g), "time_ids": ids}
    return x, torch.tensor([999, 17]), context, hint, added


def check_parity(ref: ControlNetModel, ours: ControlNet, kwargs: dict, **options) -> None:
    x, t, context, hint, added = inputs(kwargs)
    with torch.no_grad():
        down, mid = ref(x, t, context, hint, added_cond_kwargs=added, return_dict=False, **options)
        ours_down, ours_mid = ours(x, t, context, hint, added_cond=added, **options)
    assert len(ours_down) == len(down)
    for actual, expected in zip(ours_down, down, strict=True):
        assert_parity(actual, expected)
    assert_parity(ours_mid, mid)


@pytest.fixture(scope="module")
def sd():
    return pair(TINY_SD)


@pytest.mark.parametrize("options", [{}, {"conditioning_scale": 0.7}, {"conditioning_scale": 0.7, "guess_mode": True}],
                         ids=["scale1", "scale0.7", "guess"])
def test_sd_structure_parity(sd, options):
    ref, ours = sd
    assert all(conv.weight.abs().sum() > 0 for conv in ours.controlnet_down_blocks)   # randomised: can fail
    check_parity(ref, ours, TINY_SD, **options)


def test_sdxl_structure_parity():
    ref, ours = pair(TINY_SDXL, seed=2)
    assert len(ours.mid_block.attentions[0].transformer_blocks) == 10 and ours.down_blocks[0].attentions is None
    check_parity(ref, ours, TINY_SDXL)
    check_parity(ref, ours, TINY_SDXL, conditioning_scale=0.5, guess_mode=True)


def test_the_control_image_and_guess_mode_move_the_residuals(sd):
    """The hint reaches every residual, and guess mode scales them (a parity test that ignored either on both
    sides would still pass)."""
    _, ours = sd
    x, t, context, hint, _ = inputs(TINY_SD)
    with torch.no_grad():
        down, mid = ours(x, t, context, hint)
        other_down, other_mid = ours(x, t, context, hint.flip(-1))
        guess_down, _ = ours(x, t, context, hint, guess_mode=True)
    assert all(max_rel_error(a, b) > 1e-3 for a, b in zip(other_down, down, strict=True))
    assert max_rel_error(other_mid, mid) > 1e-3
    assert_parity(guess_down[0], down[0] * 0.1, tol=1e-6)


def test_folders_both_ways(sd, tmp_path):
    ref, ours = sd
    ref.save_pretrained(tmp_path / "theirs")
    loaded = ControlNet.from_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours", variant="fp16")
    back = ControlNetModel.from_pretrained(tmp_path / "ours", variant="fp16").eval()
    assert list(back.config.conditioning_embedding_out_channels) == [16, 32]
    check_parity(ref, loaded, TINY_SD, conditioning_scale=0.7)
    check_parity(back, ours, TINY_SD, guess_mode=True)
    assert ControlNet.from_pretrained(tmp_path / "ours", variant="fp16").config == ours.config


def test_defaults_table_matches_diffusers_signature():
    params = inspect.signature(ControlNetModel.__init__).parameters
    plain = {k: list(p.default) if isinstance(p.default, tuple) else p.default
             for k, p in params.items() if k != "self"}
    assert CONTROLNET.defaults == plain


def test_default_config_builds_diffusers_parameters():
    """The full-size default (SD 1.5's ControlNet): the same names and shapes (meta device: no memory)."""
    with torch.device("meta"):
        ref = ControlNetModel(cross_attention_dim=768)
        ours = ControlNet(ControlNet.from_file_config({"cross_attention_dim": 768}))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert COMPONENTS.get("controlnet") is ControlNet


def test_from_unet_matches_diffusers():
    unet_kwargs = {k: v for k, v in TINY_SD.items() if k != "conditioning_embedding_out_channels"}
    unet_kwargs["up_block_types"] = ["UpBlock2D", "CrossAttnUpBlock2D"]
    torch.manual_seed(0)
    ref_unet = randomize_(UNet2DConditionModel(**unet_kwargs)).eval()
    unet = UNet2DConditional.from_state_dict(UNet2DConditional.from_file_config(unet_kwargs), ref_unet.state_dict())
    ref = ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=(16, 32))
    ours = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    assert ours.config == ControlNet.from_file_config(dict(ref.config))
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert set(mine) == set(theirs)
    for key, value in mine.items():
        if key.startswith("controlnet_cond_embedding.") and not key.startswith("controlnet_cond_embedding.conv_out"):
            continue   # the hint encoder's inner convs: random in both (different draws)
        assert torch.equal(value, theirs[key]), key
    assert all(not v.any() for k, v in mine.items() if k.startswith(("controlnet_down", "controlnet_mid")))
    assert mine["conv_in.weight"].data_ptr() != unet.conv_in.weight.data_ptr()   # copies, not shared
    x, t, context, hint, _ = inputs(TINY_SD)
    with torch.no_grad():
        down, mid = ours(x, t, context, hint)
    assert all(not r.any() for r in (*down, mid))   # zero convs: a fresh ControlNet adds nothing


def test_from_unet_refuses_what_diffusers_has_no_key_for():
    unet = UNet2DConditional(UNet2DConditional.from_file_config(
        {**{k: v for k, v in TINY_SD.items() if k != "conditioning_embedding_out_channels"},
         "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "time_embedding_dim": 64}))
    with pytest.raises(ConfigError, match="time_embedding_dim"):
        ControlNet.from_unet(unet)


def test_bad_control_image_is_named(sd, monkeypatch):
    _, ours = sd
    x, t, context, hint, _ = inputs(TINY_SD)

    def no_work(*_args, **_kwargs):
        raise AssertionError("the hint was checked after the work began")

    monkeypatch.setattr(ours, "embed", no_work)
    with pytest.raises(InputError, match="controlnet_cond") as info:
        ours(x, t, context, hint[..., :8, :8])
    assert info.value.where == "controlnet_cond" and info.value.expected == (2, 3, 16, 16)
    assert info.value.found == (2, 3, 8, 8)
    with pytest.raises(InputError, match="controlnet_cond"):
        ours(x, t, context, hint.to(torch.uint8))


def test_config_checks():
    with pytest.raises(ConfigError, match="conditioning_embedding_out_channels"):
        ControlNetConfig(conditioning_embedding_out_channels=())
    with pytest.raises(ConfigError, match="mid_block"):
        ControlNet.from_file_config({"mid_block_type": None})
    with pytest.raises(ConfigError, match="global_pool_conditions"):
        ControlNet.from_file_config({"global_pool_conditions": True})
