"""Token merging (ToMe for SD): the matching against tomesd's own `bipartite_soft_matching_random2d`, the whole UNet
against diffusers' UNet2DConditionModel patched by tomesd (same random weights, use_rand=False: both deterministic),
the token count inside the self-attention, and ratio 0 = no merging."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from latentdiff.errors import InputError, UsageError
from latentdiff.layers.attention import Attention, BasicTransformerBlock
from latentdiff.layers.token_merging import TokenMerging, bipartite_matching, destinations
from latentdiff.models.unet import UNet2DConditional
from latentdiff.models.unet2d import UNet2D, UNet2DConfig
from latentdiff.pipelines.token_merging import disable_tome, enable_tome, level_blocks
from tests._support.parity import assert_parity, randomize_

tomesd = pytest.importorskip("tomesd")
pytestmark = pytest.mark.usefixtures("one_thread")

CROSS, DOWN, CROSS_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
# attention on both levels (the full-resolution one too, where ToMe merges by default), a cross-attention mid block
TINY = dict(sample_size=16, block_out_channels=[32, 64], layers_per_block=1, down_block_types=[CROSS, CROSS],
            up_block_types=[CROSS_UP, CROSS_UP], attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8)


@pytest.mark.parametrize("h, w, sx, sy, r", [(8, 8, 2, 2, 32), (6, 10, 2, 2, 20), (7, 9, 2, 2, 30), (8, 6, 3, 2, 7),
                                              (4, 4, 2, 2, 100)])
def test_merge_and_unmerge_equal_tomesd(h, w, sx, sy, r):
    """Same metric and tokens, top-left destinations: merge (as a set of rows: the order inside is each library's
    own) and unmerge (in token order) equal tomesd's. (4, 4) with r = 100: r capped at the number of sources."""
    g = torch.Generator().manual_seed(0)
    metric, y = torch.randn(2, h * w, 8, generator=g), torch.randn(2, h * w, 5, generator=g)
    merge_ref, unmerge_ref = tomesd.merge.bipartite_soft_matching_random2d(metric, w, h, sx, sy, r, no_rand=True)
    matching = bipartite_matching(metric, destinations(h, w, sx=sx, sy=sy, generator=None, device=metric.device), r)
    merged, expected = matching.merge(y), merge_ref(y)
    assert merged.shape == expected.shape
    for row in range(2):
        assert_parity(merged[row][merged[row][:, 0].argsort()], expected[row][expected[row][:, 0].argsort()])
    z = torch.randn(merged.shape, generator=g)
    assert_parity(matching.unmerge(z), unmerge_ref(_reorder(z, expected, merged)))


def _reorder(z: torch.Tensor, theirs: torch.Tensor, ours: torch.Tensor) -> torch.Tensor:
    """z laid out in our merged order -> tomesd's merged order (rows matched by their merged values)."""
    out = torch.empty_like(z)
    for row in range(z.shape[0]):
        distance = torch.cdist(theirs[row], ours[row])
        out[row] = z[row][distance.argmin(dim=1)]
    return out


def test_random_destinations_one_per_cell():
    g = torch.Generator().manual_seed(3)
    mask = destinations(6, 7, sx=2, sy=3, generator=g, device=torch.device("cpu")).view(6, 7)
    cells = mask[:, :6].reshape(2, 3, 3, 2).sum(dim=(1, 3))
    assert (cells == 1).all() and not mask[:, 6].any()    # one per full cell; the column left over: sources
    other = destinations(6, 7, sx=2, sy=3, generator=g, device=torch.device("cpu")).view(6, 7)
    assert not torch.equal(mask, other)                   # the generator advances


def pair(kwargs: dict):
    torch.manual_seed(0)
    ref = randomize_(UNet2DConditionModel(**kwargs)).eval()
    ours = UNet2DConditional.from_state_dict(UNet2DConditional.from_file_config(kwargs), ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("options", [dict(ratio=0.5), dict(ratio=0.3, max_downsample=2),
                                     dict(ratio=0.6, merge_crossattn=True, merge_mlp=True, sx=2, sy=1)])
def test_unet_with_tome_equals_tomesd(options):
    """The UNet with token merging equals diffusers' UNet patched by tomesd, on the same weights and inputs (odd
    batch: tomesd turns random destinations off, and so do we; use_rand=False too)."""
    ref, ours = pair(TINY)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 16, 12, generator=g), torch.randn(1, 5, 32, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        plain = ours(x, t, context)
        tomesd.apply_patch(ref, use_rand=False, **options)
        expected = ref(x, t, encoder_hidden_states=context).sample
        tomesd.remove_patch(ref)
        blocks = enable_tome(ours, use_rand=False, **options)
        assert blocks == (7 if options.get("max_downsample") else 3)      # per level 1 down, 2 up; 1 mid
        got = ours(x, t, context)
    assert_parity(got, expected)
    assert (got - plain).abs().max() > 1e-3     # merging changed the result: the comparison is not of plain runs


def test_token_count_drops_inside_self_attention():
    _, ours = pair(TINY)
    seen: dict[str, list[int]] = {"attn1": [], "attn2": []}
    for block in ours.modules():
        if isinstance(block, BasicTransformerBlock):
            for name in seen:
                attention = getattr(block, name)
                assert isinstance(attention, Attention)
                attention.register_forward_hook(lambda m, args, out, n=name: seen[n].append(args[0].shape[1]))
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32)
    enable_tome(ours, 0.5)
    with torch.no_grad():
        ours(x, 10, context)
    # level 0 (16 x 16 = 256 tokens; 1 block down, 2 up) merges 128; level 1 (8 x 8: 1 down, 2 up) and the mid
    # block do not
    assert sorted(seen["attn1"]) == [64] * 4 + [128] * 3 and sorted(seen["attn2"]) == [64] * 4 + [256] * 3
    disable_tome(ours)
    seen["attn1"].clear()
    with torch.no_grad():
        ours(x, 10, context)
    assert sorted(seen["attn1"]) == [64] * 4 + [256] * 3


def test_ratio_zero_is_the_plain_unet_exactly():
    _, ours = pair(TINY)
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32)
    with torch.no_grad():
        plain = ours(x, 10, context)
        enable_tome(ours, 0.0, max_downsample=8)
        assert torch.equal(ours(x, 10, context), plain)


def test_restart_repeats_the_random_choices():
    _, ours = pair(TINY)
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32)
    enable_tome(ours, 0.5, seed=7)
    settings = next(b for _, b in level_blocks(ours)).token_merging
    assert isinstance(settings, TokenMerging)
    with torch.no_grad():
        first, second = ours(x, 10, context), ours(x, 10, context)
        settings.restart()
        again = ours(x, 10, context)
    assert torch.equal(first, again) and not torch.equal(first, second)


def test_bad_settings_and_unets_without_transformers():
    _, ours = pair(TINY)
    for bad in (dict(ratio=1.0), dict(ratio=-0.1), dict(ratio=0.5, sx=0), dict(ratio=0.5, max_downsample=0)):
        with pytest.raises(InputError):
            enable_tome(ours, **bad)
    plain = UNet2D(UNet2DConfig(sample_size=8, channels=(8, 8), attention_levels=(False, True), norm_num_groups=4,
                                layers_per_level=1, attention_head_dim=4))   # single-head pixel attention only
    with pytest.raises(UsageError):
        enable_tome(plain, 0.5)
