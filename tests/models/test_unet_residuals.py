"""The UNet with control residuals against diffusers' UNet2DConditionModel given the same tensors: ControlNet's
down / mid residuals (`down_block_additional_residuals`, `mid_block_additional_residual`) and T2I-Adapter features
(`down_intrablock_additional_residuals`, incl. the SDXL adapters' mid-level one), every weight randomised; sums of
`Residuals`; bad residuals refused by name."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from latentdiff.errors import InputError
from latentdiff.models.residuals import Residuals
from latentdiff.models.unet import UNet2DConditional
from tests._support.parity import assert_parity, randomize_
from tests._support.sd import TINY_UNET_SD_LAYOUT

pytestmark = pytest.mark.usefixtures("one_thread")

CROSS, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
UP_CROSS, UP = "CrossAttnUpBlock2D", "UpBlock2D"
# cross-attention levels and a plain one (intrablock residuals go to different places in each)
CONFIG = TINY_UNET_SD_LAYOUT
# plain first level, mid-level feature (SDXL adapters' layout)
PLAIN_FIRST = dict(CONFIG, down_block_types=[DOWN, CROSS, CROSS], up_block_types=[UP_CROSS, UP_CROSS, UP])


def pair(config: dict) -> tuple[UNet2DConditionModel, UNet2DConditional]:
    torch.manual_seed(0)
    ref = randomize_(UNet2DConditionModel(**config)).eval()
    return ref, UNet2DConditional.from_state_dict(UNet2DConditional.from_file_config(config), ref.state_dict())


def features(shapes: list[tuple[int, ...]], seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g) for s in shapes)


def skip_shapes(unet: UNet2DConditional, x: torch.Tensor) -> list[tuple[int, ...]]:
    """The shapes of the UNet's skips (its own way down, run here)."""
    h = unet.conv_in(x)
    skips = [h]
    emb = unet.embed(x, torch.tensor([5, 5]), None, None)
    context = torch.zeros(x.shape[0], 3, unet.config.cross_attention_dim)
    for down in unet.down_blocks:
        h = down(h, emb, context, skips)
    return [tuple(s.shape) for s in skips]


def inputs(config: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900, 3]),
            torch.randn(2, 3, config["cross_attention_dim"], generator=g))


def test_controlnet_residuals_match_diffusers() -> None:
    ref, ours = pair(CONFIG)
    x, t, ctx = inputs(CONFIG)
    with torch.no_grad():
        down = features(skip_shapes(ours, x), seed=4)
        mid = features([(2, 32, 2, 2)], seed=5)[0]
        expected = ref(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        got = ours(x, t, ctx, residuals=Residuals(down=down, mid=mid))
        plain = ours(x, t, ctx)
    assert_parity(got, expected)
    assert (got - plain).abs().max() > 1e-2   # the residuals reach the output


@pytest.mark.parametrize("config,shapes", [
    (CONFIG, [(2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]),
    # plain first level: its feature after the downsampler; the fourth feature goes to the mid level
    (PLAIN_FIRST, [(2, 16, 4, 4), (2, 32, 4, 4), (2, 32, 2, 2), (2, 32, 2, 2)]),
], ids=["cross-levels", "plain-first-and-mid"])
def test_intrablock_residuals_match_diffusers(config: dict, shapes: list) -> None:
    ref, ours = pair(config)
    x, t, ctx = inputs(config)
    adapter = features(shapes, seed=6)
    with torch.no_grad():
        expected = ref(x, t, ctx, down_intrablock_additional_residuals=[a.clone() for a in adapter]).sample
        got = ours(x, t, ctx, residuals=Residuals(intrablock=adapter))
        plain = ours(x, t, ctx)
    assert_parity(got, expected)
    assert (got - plain).abs().max() > 1e-2


def test_sum_of_residuals_is_one_call_with_their_sum() -> None:
    _, ours = pair(CONFIG)
    x, t, ctx = inputs(CONFIG)
    shapes = skip_shapes(ours, x)
    a = Residuals(down=features(shapes, seed=7), mid=features([(2, 32, 2, 2)], seed=8)[0])
    b = Residuals(down=features(shapes, seed=9), mid=features([(2, 32, 2, 2)], seed=10)[0])
    c = Residuals(intrablock=features([(2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)], seed=11))
    total = a + b + c
    assert all(torch.equal(s, x1 + x2) for s, x1, x2 in zip(total.down, a.down, b.down, strict=True))
    assert total.intrablock is c.intrablock and torch.equal(total.mid, a.mid + b.mid)
    assert torch.equal(a.scaled(0.5).mid, a.mid * 0.5)
    with torch.no_grad():
        assert torch.equal(ours(x, t, ctx, residuals=total), ours(x, t, ctx, residuals=total))


def test_bad_residuals_are_refused_by_name() -> None:
    _, ours = pair(CONFIG)
    x, t, ctx = inputs(CONFIG)
    shapes = skip_shapes(ours, x)
    with pytest.raises(InputError, match="one tensor per UNet skip") as info:
        ours(x, t, ctx, residuals=Residuals(down=features(shapes[:-1], seed=1)))
    assert info.value.where == "residuals.down"
    wrong = features(shapes[:2] + [(2, 99, 8, 8)] + shapes[3:], seed=1)
    with pytest.raises(InputError, match="skip 2"):
        ours(x, t, ctx, residuals=Residuals(down=wrong))
    with pytest.raises(InputError, match="T2I-Adapter feature does not match"):
        ours(x, t, ctx, residuals=Residuals(intrablock=features([(2, 16, 4, 4)], seed=1)))
    with pytest.raises(InputError, match="more T2I-Adapter features"):
        ours(x, t, ctx, residuals=Residuals(intrablock=features(
            [(2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2), (2, 7, 2, 2)], seed=1)))
    with pytest.raises(InputError, match="differ in their number of down"):
        Residuals(down=features(shapes, seed=1)) + Residuals(down=features(shapes[:1], seed=1))
