"""FreeU (`models.freeu`) against diffusers' UNet2DConditionModel.enable_freeu on the same random weights and
inputs (fp32, 1e-4): SD-layout (plain coarsest up level, cross-attention below) and SDXL-layout tiny UNets, with
SD 1.x's and SDXL's published factors; the Fourier filter against diffusers' on odd and power-of-two sizes; FreeU
with DeepCache; bad factors refused."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.utils.torch_utils import fourier_filter as diffusers_fourier_filter

from latentdiff.errors import InputError
from latentdiff.models.deep_cache import DeepCacheState
from latentdiff.models.freeu import FreeU, fourier_filter
from latentdiff.models.unet import UNet2DConditional
from tests._support.parity import assert_parity, max_rel_error, randomize_
from tests._support.sd import TINY_UNET_SD_LAYOUT, TINY_UNET_SDXL_LAYOUT

pytestmark = pytest.mark.usefixtures("one_thread")

SD, SDXL = TINY_UNET_SD_LAYOUT, TINY_UNET_SDXL_LAYOUT


@pytest.mark.parametrize("config, factors, size", [(SD, (0.9, 0.2, 1.5, 1.6), 16), (SDXL, (0.6, 0.4, 1.1, 1.2), 16),
                                                   (SD, (0.9, 0.2, 1.5, 1.6), 12)], ids=["sd", "sdxl", "sd-odd"])
def test_matches_diffusers_enable_freeu(config: dict, factors: tuple, size: int) -> None:
    torch.manual_seed(0)
    ref = randomize_(UNet2DConditionModel(**config)).eval()
    ours = UNet2DConditional.from_state_dict(UNet2DConditional.from_file_config(config), ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, size, size, generator=g), torch.tensor([900, 11])
    context = torch.randn(2, 3, 12, generator=g)
    added = {"text_embeds": torch.randn(2, 8, generator=g),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 32, 8, 4, 64, 56]])} \
        if "addition_embed_type" in config else None
    with torch.no_grad():
        plain = ours(x, t, context, added_cond=added)
        ref.enable_freeu(*factors)
        expected = ref(x, t, context, added_cond_kwargs=added).sample
        ref.disable_freeu()
        got = ours(x, t, context, added_cond=added, freeu=FreeU(*factors))
    assert_parity(got, expected)
    assert max_rel_error(plain, expected) > 1e-2          # FreeU changes the prediction


@pytest.mark.parametrize("size", [(4, 4), (5, 7), (2, 2), (1, 3)])
def test_fourier_filter_matches_diffusers(size: tuple) -> None:
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    assert_parity(fourier_filter(x, scale=0.3), diffusers_fourier_filter(x, threshold=1, scale=0.3))
    assert fourier_filter(x.bfloat16(), scale=0.3).dtype == torch.bfloat16


def test_with_deepcache_a_full_pass_is_the_freeu_forward() -> None:
    torch.manual_seed(0)
    ours = randomize_(UNet2DConditional(UNet2DConditional.from_file_config(SD))).eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 12)
    freeu = FreeU(0.9, 0.2, 1.5, 1.6)
    with torch.no_grad():
        assert torch.equal(ours(x, 5, ctx, freeu=freeu, cache=DeepCacheState(branch=2)), ours(x, 5, ctx, freeu=freeu))


@pytest.mark.parametrize("bad", [(0.0, 0.2, 1.5, 1.6), (0.9, -1, 1.5, 1.6), (0.9, 0.2, float("nan"), 1.6),
                                 (0.9, 0.2, 1.5, "1.6")])
def test_bad_factors(bad: tuple) -> None:
    with pytest.raises(InputError, match="FreeU"):
        FreeU(*bad)
