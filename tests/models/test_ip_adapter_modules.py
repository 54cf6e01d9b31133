"""The IP-Adapter modules on a UNet without a pipeline (models/ip_adapter.py): the image attention in each
cross-attention layer's `extra`, the token count read by a compiled UNet (torch.compile, fullgraph), strict loads."""
from __future__ import annotations

import pytest
import torch

from latentdiff import CheckpointError
from latentdiff.models.ip_adapter import IPAdapter, cross_attentions, image_tokens
from latentdiff.models.unet import UNet2DConditional, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet() -> UNet2DConditional:
    torch.manual_seed(0)
    return UNet2DConditional(UNetConfig(channels=(32, 64), attention_levels=(True, False), attention_heads=2,
                                        cross_attention_dim=16, norm_num_groups=8, sample_size=8)).eval()


def test_compiled_unet_reads_the_image_token_count():
    """torch.compile(fullgraph=True) cannot read the context variable: the compiled path reads its global twin."""
    unet = tiny_unet()
    adapter = IPAdapter.for_unet(unet, image_embed_dim=8)
    for (_, layer), attention in zip(cross_attentions(unet), adapter.attentions(), strict=True):
        layer.extra = (attention,)
    compiled = torch.compile(unet.forward, backend="eager", fullgraph=True)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 9, 16)
    with torch.no_grad():
        with image_tokens((4,)):
            eager, fast = unet(x, 10, context), compiled(x, 10, context)
        text_only = unet(x, 10, context[:, :5])
        assert torch.equal(compiled(x, 10, context[:, :5]), text_only)
    assert torch.equal(fast, eager) and not torch.equal(eager, text_only)


def test_state_dict_round_trip_and_strict_load():
    """An adapter's state dict is the released layout: it loads back to the same module; a wrong key is refused."""
    for plus in (False, True):
        adapter = IPAdapter.for_unet(tiny_unet(), image_embed_dim=8, plus=plus, depth=2)
        state = adapter.state_dict()
        again = IPAdapter.from_state_dict(state, source="memory")
        assert again.is_plus == plus and again.tokens == (16 if plus else 4)
        assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
        with pytest.raises(CheckpointError, match="does not match its own layout"):
            IPAdapter.from_state_dict({**state, "image_proj.extra.weight": torch.zeros(1)}, source="memory")
