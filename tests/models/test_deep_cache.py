"""DeepCache inside the UNets (`models.deep_cache`): for every skip branch, a full pass is the plain forward and
stores the feature DeepCache's procedure records, and a shallow pass computes what that procedure computes from
the stored feature (tests/_support/deep_cache.py drives diffusers' blocks by hand, on the same random weights):
SD-layout (cross-attention and plain levels) and SDXL-layout UNet2DConditional, the unconditional UNet2D;
ControlNet and T2I-Adapter residuals on full and shallow passes; slots, shape changes and a bad branch."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from latentdiff.errors import InputError
from latentdiff.models.deep_cache import DeepCacheState, skip_count
from latentdiff.models.residuals import Residuals
from latentdiff.models.unet import UNet2DConditional
from latentdiff.models.unet2d import UNet2D
from tests._support import deep_cache as reference
from tests._support.parity import assert_parity, randomize_
from tests._support.sd import TINY_UNET_SD_LAYOUT, TINY_UNET_SDXL_LAYOUT

pytestmark = pytest.mark.usefixtures("one_thread")

SD, SDXL = TINY_UNET_SD_LAYOUT, TINY_UNET_SDXL_LAYOUT
UNCOND = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=8, norm_num_groups=8)


def pair(config: dict):
    torch.manual_seed(0)
    if "cross_attention_dim" in config:
        ref = randomize_(UNet2DConditionModel(**config)).eval()
        return ref, UNet2DConditional.from_state_dict(UNet2DConditional.from_file_config(config), ref.state_dict())
    ref = randomize_(UNet2DModel(**config)).eval()
    return ref, UNet2D.from_state_dict(UNet2D.from_file_config(config), ref.state_dict())


def call(config: dict, seed: int) -> dict:
    """One call's inputs: x, t, and context / added_cond where the UNet takes them."""
    g = torch.Generator().manual_seed(seed)
    channels = config.get("in_channels", 4)
    args = {"x": torch.randn(2, channels, 8, 8, generator=g), "t": torch.tensor([900, 850]) - seed}
    if "cross_attention_dim" in config:
        args["context"] = torch.randn(2, 3, config["cross_attention_dim"], generator=g)
    if "addition_embed_type" in config:
        args["added_cond"] = {"text_embeds": torch.randn(2, 8, generator=g),
                              "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 32, 8, 4, 64, 56]])}
    return args


def ours_call(unet, args: dict, **kw) -> torch.Tensor:
    extra = {"added_cond": args["added_cond"]} if "added_cond" in args else {}
    return unet(args["x"], args["t"], args.get("context"), **extra, **kw)


def ref_call(ref, args: dict, **kw):
    return reference.run(ref, args["x"], args["t"], args.get("context"), added_cond=args.get("added_cond"), **kw)


@pytest.fixture(scope="module", params=["sd", "sdxl", "uncond"])
def layout(request):
    config = {"sd": SD, "sdxl": SDXL, "uncond": UNCOND}[request.param]
    return config, *pair(config)


def test_every_branch_full_and_shallow_match_the_procedure(layout) -> None:
    config, ref, ours = layout
    first, later = call(config, 1), call(config, 2)
    with torch.no_grad():
        plain = ours_call(ours, first)
        total = skip_count(ours.down_blocks)
        # conv_in's skip, a resnet's, a downsampler's, one inside the second level, the deepest
        for branch in sorted({0, 1, 3, 4, total - 1} & set(range(total))):
            state = DeepCacheState(branch=branch, full=True)
            full = ours_call(ours, first, cache=state)
            assert torch.equal(full, plain)                          # a full pass is the plain forward
            ref_full, feature = ref_call(ref, first, branch=branch)
            assert_parity(full, ref_full)
            assert_parity(state.features[0][1], feature)             # the feature DeepCache records
            state.full = False
            shallow = ours_call(ours, later, cache=state)
            ref_shallow, _ = ref_call(ref, later, branch=branch, stored=feature)
            assert_parity(shallow, ref_shallow)
            assert (state.full_passes, state.shallow_passes) == (1, 1)
            assert not torch.allclose(shallow, ours_call(ours, later), atol=1e-6)   # the shallow pass differs


def test_controlnet_residuals_on_full_and_shallow_passes() -> None:
    ref, ours = pair(SD)
    first, later = call(SD, 1), call(SD, 2)
    with torch.no_grad():
        skips = [ours.conv_in(first["x"])]
        emb = ours.embed(first["x"], first["t"], None, None)
        h = skips[0]
        for down in ours.down_blocks:
            h = down(h, emb, first["context"], skips)
        g = torch.Generator().manual_seed(5)
        down_r = tuple(0.3 * torch.randn(s.shape, generator=g) for s in skips)
        mid_r = 0.3 * torch.randn(h.shape, generator=g)
        for branch in (0, 2, 4, 7):
            state = DeepCacheState(branch=branch)
            full = ours_call(ours, first, cache=state, residuals=Residuals(down=down_r, mid=mid_r))
            ref_full, feature = ref_call(ref, first, branch=branch, down_residuals=down_r, mid_residual=mid_r)
            assert_parity(full, ref_full)
            state.full = False
            shallow = ours_call(ours, later, cache=state, residuals=Residuals(down=down_r, mid=mid_r))
            ref_shallow, _ = ref_call(ref, later, branch=branch, stored=feature, down_residuals=down_r)
            assert_parity(shallow, ref_shallow)
        short = Residuals(down=down_r[:-1])
        with pytest.raises(InputError, match="one tensor per UNet skip"):
            ours_call(ours, later, cache=state, residuals=short)


def test_adapter_features_reach_the_levels_that_run_to_their_point() -> None:
    """A T2I feature is added at its level's end: on a shallow pass that stops inside a level, not at all; the
    shallow pass of a branch past the whole first level equals the plain walk of that level with the feature."""
    ref, ours = pair(SD)
    args = call(SD, 3)
    g = torch.Generator().manual_seed(6)
    features = (torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 32, 4, 4, generator=g),
                torch.randn(2, 32, 2, 2, generator=g))
    adapter = Residuals(intrablock=features)
    with torch.no_grad():
        for branch, changes in ((1, False), (2, True), (3, True)):
            state = DeepCacheState(branch=branch)
            ours_call(ours, args, cache=state)
            state.full = False
            with_adapter = ours_call(ours, args, cache=state, residuals=adapter)
            without = ours_call(ours, args, cache=state)
            # the first level is a cross-attention level: its feature joins after its last resnet + attention
            assert torch.equal(with_adapter, without) != changes, branch


def test_slots_and_shape_changes_run_full() -> None:
    _, ours = pair(SD)
    first, later = call(SD, 1), call(SD, 2)
    with torch.no_grad():
        state = DeepCacheState(branch=1)
        ours_call(ours, first, cache=state)
        state.full, state.slot = False, 1          # a second call of the step: nothing stored for it
        assert torch.equal(ours_call(ours, later, cache=state), ours_call(ours, later))
        half = {k: v[:1] for k, v in later.items()}
        state.slot = 0                               # another batch than the stored feature's: a full pass
        assert torch.equal(ours_call(ours, half, cache=state), ours_call(ours, half))
        assert (state.full_passes, state.shallow_passes) == (3, 0)


def test_bad_branch() -> None:
    _, ours = pair(SD)
    with pytest.raises(InputError, match="one of the UNet's skips"):
        ours_call(ours, call(SD, 1), cache=DeepCacheState(branch=skip_count(ours.down_blocks)))
