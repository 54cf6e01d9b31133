"""Hardening cases for the LyCORIS / LoRA kind builders: malformed key groups from an adapter file (wrong ranks,
dimensions, alphas, DoRA scales, factor products the size of no module) are CheckpointErrors naming the key,
raised before any product is computed."""
from __future__ import annotations

import time

import pytest
import torch

import latentdiff.adapters  # noqa: F401  # registers every kind
from latentdiff.adapters.delta import delta_from_group
from latentdiff.errors import CheckpointError
from tests._support.bounded import run_bounded

WHERE = "bad.safetensors: lora_unet_mid_block_attentions_0_proj_in"


def _raises(group: dict[str, torch.Tensor], shape: tuple[int, ...], key: str, *found: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        delta_from_group(group, shape, where=WHERE)
    message = str(info.value)
    assert f"where: {WHERE}.{key}" in message, message
    for text in found:
        assert text in message, message
    return info.value


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_lokr_factors_whose_product_is_astronomical_fail_before_the_product():
    code = """
        import torch, latentdiff.adapters
        from latentdiff.adapters.delta import delta_from_group
        big = torch.zeros(1).expand(200_000, 200_000)   # no memory: the kron would be 1.6e21 elements
        delta_from_group({"lokr_w1": big, "lokr_w2": big}, (320, 320), where="x")
    """
    start = time.monotonic()
    result = run_bounded(code, timeout_s=60, address_space_gb=8)
    assert result.raised == "CheckpointError" and result.is_latentdiff_error, result.traceback
    assert "x.lokr_w1" in result.message and "(40000000000, 40000000000)" in result.message
    assert result.peak_rss_mb < 1500 and time.monotonic() - start < 30


@pytest.mark.outcome("clear_error", fails_as="crash")
@pytest.mark.parametrize("alpha, found", [(torch.zeros(0), "shape (0,)"), (torch.tensor(float("nan")), "nan"),
                                          (torch.ones(2, 2), "shape (2, 2)")], ids=["empty", "nan", "matrix"])
def test_an_alpha_that_is_not_one_finite_number(alpha, found):
    group = {"lora_down.weight": torch.randn(2, 12), "lora_up.weight": torch.randn(10, 2), "alpha": alpha}
    _raises(group, (10, 12), "alpha", found)


@pytest.mark.outcome("clear_error", fails_as="crash")
@pytest.mark.parametrize("down, up", [(torch.randn(0, 12), torch.randn(10, 0)), (torch.randn(12), torch.randn(10, 1)),
                                      (torch.randn(2, 12, 3), torch.randn(10, 2))], ids=["rank-0", "1-d", "3-d"])
def test_lora_tensors_of_no_rank_or_the_wrong_dimensions(down, up):
    _raises({"lora_down.weight": down, "lora_up.weight": up}, (10, 12), "lora_down.weight", "r >= 1")


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_a_tucker_core_on_a_linear_module():
    group = {"lora_down.weight": torch.randn(2, 12, 1, 1), "lora_mid.weight": torch.randn(2, 2, 3, 3),
             "lora_up.weight": torch.randn(10, 2, 1, 1)}
    _raises(group, (10, 12), "lora_mid.weight", "needs a conv module", "(10, 12)")


@pytest.mark.outcome("clear_error", fails_as="crash")
@pytest.mark.parametrize("scale", [torch.tensor(1.0), torch.ones(3, 4)], ids=["0-d", "other-size"])
def test_a_dora_scale_of_no_axis(scale):
    group = {"lora_down.weight": torch.randn(2, 12), "lora_up.weight": torch.randn(10, 2), "dora_scale": scale}
    _raises(group, (10, 12), "dora_scale", "(1, 12, 1, ...)", "(10, 1, ...)")


@pytest.mark.outcome("clear_error", fails_as="crash")
@pytest.mark.parametrize("group, key", [
    ({"hada_w1_a": torch.randn(10, 0), "hada_w1_b": torch.randn(0, 12), "hada_w2_a": torch.randn(10, 2),
      "hada_w2_b": torch.randn(2, 12)}, "hada_w1_a"),
    ({"hada_w1_a": torch.randn(10), "hada_w1_b": torch.randn(2, 12), "hada_w2_a": torch.randn(10, 2),
      "hada_w2_b": torch.randn(2, 12)}, "hada_w1_a"),
    ({"hada_w1_a": torch.randn(2, 10), "hada_w1_b": torch.randn(2, 12), "hada_t1": torch.randn(2),
      "hada_w2_a": torch.randn(10, 2), "hada_w2_b": torch.randn(2, 12)}, "hada_t1"),
    ({"lokr_w1": torch.randn(2, 3, 4), "lokr_w2": torch.randn(5, 4)}, "lokr_w1"),
    ({"lokr_w1": torch.randn(2, 3), "lokr_w2": torch.randn(5)}, "lokr_w2"),
    ({"lokr_w1": torch.randn(2, 3)}, "lokr_w2_a"),
    ({"diff": torch.randn(11, 10)}, "diff"),
], ids=["loha-rank-0", "loha-1-d", "loha-tucker-1-d", "lokr-3-d", "lokr-1-d", "lokr-missing", "full-size"])
def test_malformed_lycoris_groups(group, key):
    _raises(group, (10, 12), key)


@pytest.mark.outcome("clear_error")
def test_a_group_of_no_known_kind_lists_the_known_markers():
    with pytest.raises(CheckpointError, match=r"hada_w1_a.*lokr_w1.*lora_down.*found: \['oft_blocks'\]"):
        delta_from_group({"oft_blocks": torch.randn(2, 2)}, (10, 12), where=WHERE)


@pytest.mark.outcome("clear_error", fails_as="data_loss")
@pytest.mark.parametrize("group, key", [
    ({"lora_down.weight": torch.randn(2, 12), "lora_up.weight": torch.randn(10, 2), "scale": torch.tensor(2.0)},
     "scale"),
    ({"hada_w1_a": torch.randn(10, 2), "hada_w1_b": torch.randn(2, 12), "hada_w2_a": torch.randn(10, 2),
      "hada_w2_b": torch.randn(2, 12), "hada_w3_a": torch.randn(10, 2)}, "hada_w3_a"),
    ({"lokr_w1": torch.randn(2, 3), "lokr_w2": torch.randn(5, 4), "lokr_w2_c": torch.randn(1)}, "lokr_w2_c"),
    ({"diff": torch.randn(10, 12), "bias": torch.randn(10)}, "bias"),
], ids=["lora-scale", "loha", "lokr", "full"])
def test_a_key_the_kind_does_not_read_is_not_silently_dropped(group, key):
    _raises(group, (10, 12), key, "expected: only")
