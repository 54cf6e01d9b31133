"""Inference-only memory savings in the layers (peak RSS of a 512 px SD 1.5 generation, benchmarks/RESULTS.md):

* FeedForward runs over chunks of tokens when autograd is off, the tensors are on the CPU and the GEGLU
  projection would exceed FEED_FORWARD_CHUNK_BYTES: the same values as the whole-tensor path (to GEMM
  rounding), nothing chunked when gradients are recorded or off the CPU;
* ResnetBlock works in place on its own temporaries when autograd is off: bit-identical to the autograd path,
  with and without a shortcut conv, output scale and up/down resampling, and its input is left untouched.
"""
from __future__ import annotations

import pytest
import torch

from latentdiff.layers import attention
from latentdiff.layers.attention import FeedForward
from latentdiff.layers.resnet import ResnetBlock
from tests._support.parity import max_rel_error


def test_feed_forward_chunks_give_the_whole_result(monkeypatch):
    torch.manual_seed(0)
    ff = FeedForward(32).eval()
    state = {k: v.clone() for k, v in ff.state_dict().items()}
    x = torch.randn(2, 300, 32)
    whole = ff(x)                                       # autograd on: one pass (the parameters require grad)
    assert whole.requires_grad
    calls = []
    proj = ff.net[0].proj
    monkeypatch.setattr(proj, "forward",
                        lambda t: calls.append(t.shape[:-1].numel()) or torch.nn.Linear.forward(proj, t))
    monkeypatch.setattr(attention, "FEED_FORWARD_CHUNK_BYTES", 256 * 4 * 64)   # 64 rows of 2 x 128 floats
    with torch.inference_mode():
        chunked = ff(x)
    assert calls == [64] * 9 + [600 - 9 * 64]
    assert chunked.shape == whole.shape and max_rel_error(chunked, whole.detach()) <= 1e-6
    calls.clear()
    ff.to("meta")                                       # not on the CPU (a GPU): whole GEMMs, never chunked
    with torch.inference_mode():
        ff(x.to("meta"))
    assert calls == [600]
    ff.to_empty(device="cpu").load_state_dict(state)
    calls.clear()
    with torch.no_grad():                               # small enough for one pass: not chunked
        monkeypatch.setattr(attention, "FEED_FORWARD_CHUNK_BYTES", 16 * 2**20)
        assert torch.equal(ff(x), whole.detach()) and calls == [600]


@pytest.mark.parametrize("kind", ["same width", "shortcut", "scaled", "up", "down", "scale-shift"])
def test_resnet_block_in_place_equals_autograd_path(kind):
    torch.manual_seed(1)
    options = {"same width": {}, "shortcut": {"out_channels": 24}, "scaled": {"output_scale_factor": 2.0},
               "up": {"up": True}, "down": {"down": True}, "scale-shift": {"time_scale_shift": True}}[kind]
    block = ResnetBlock(16, temb_channels=8, groups=4, **options).eval()
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 8)
    expected = block(x, temb)                           # autograd on: no in-place work
    before = x.clone()
    with torch.inference_mode():
        got = block(x, temb)
    assert torch.equal(got, expected.detach())
    assert torch.equal(x, before)
