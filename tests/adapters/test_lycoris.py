"""LyCORIS kinds (LoCon with a Tucker core, LoHa, LoKr, DoRA, full and norm deltas) built from file key groups,
checked on modules of the UNet's kinds against the published merge math written out here (A1111's
extensions-builtin/Lora conventions), and unfused (`forward`) against running the module with the merged weight."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from latentdiff.adapters import lycoris  # noqa: F401  # registers the kinds
from latentdiff.adapters.delta import DoRA, LayerKind, LoRA, delta_from_group
from latentdiff.errors import CheckpointError

W = 0.7  # the user's weight


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).float()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _linear() -> nn.Linear:
    return nn.Linear(12, 10)


def _conv(k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(6, 8, k, padding=k // 2)


def _input(module: nn.Module) -> torch.Tensor:
    return torch.randn(2, 5, 12) if isinstance(module, nn.Linear) else torch.randn(2, 6, 7, 7)


def _check(delta, module: nn.Module, expected_dw: torch.Tensor, expected_db: torch.Tensor | None = None) -> None:
    """weight(W, w) == W + expected; forward(x) == module run with the merged weight (and bias) minus the base."""
    weight = module.weight.detach()
    merged = delta.weight(weight, W)
    torch.testing.assert_close(merged, weight + expected_dw, rtol=1e-5, atol=1e-5)
    db = delta.bias_delta(W)
    if expected_db is None:
        assert db is None
    else:
        torch.testing.assert_close(db, expected_db, rtol=1e-6, atol=1e-6)
    x = _input(module)
    layer = LayerKind.of(module)
    bias = module.bias.detach() + (0 if db is None else db)
    with torch.no_grad():
        expected = layer.run(x, merged, bias) - module(x)
    torch.testing.assert_close(delta.forward(x, weight, layer, W), expected, rtol=1e-4, atol=1e-5)


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A1111's make_weight_cp, in its two steps."""
    temp = torch.einsum("ijkl,jr->irkl", t, wb)
    return torch.einsum("ijkl,ir->rjkl", temp, wa)


# ---- LoCon with a Tucker core -------------------------------------------------------------------------------------
def test_locon_tucker_matches_the_cp_rebuild_and_runs_as_a_conv_chain():
    conv, r = _conv(), 3
    group = {"lora_down.weight": _r(r, 6, 1, 1), "lora_mid.weight": _r(r, r, 3, 3), "lora_up.weight": _r(8, r, 1, 1),
             "alpha": torch.tensor(1.5)}
    delta = delta_from_group(group, tuple(conv.weight.shape), where="f.safetensors: lora_unet_x")
    assert isinstance(delta, LoRA) and delta.mid is not None
    # rebuild_cp_decomposition: einsum('n m k l, i n, m j -> i j k l', mid, up, down)
    dw = torch.einsum("nmkl,in,mj->ijkl", group["lora_mid.weight"], group["lora_up.weight"].flatten(1),
                      group["lora_down.weight"].flatten(1))
    _check(delta, conv, dw * 1.5 / r * W)


def test_locon_tucker_with_stride_runs_the_core_with_the_layers_stride():
    conv, r = nn.Conv2d(6, 8, 3, stride=2, padding=1), 2
    group = {"lora_down.weight": _r(r, 6, 1, 1), "lora_mid.weight": _r(r, r, 3, 3), "lora_up.weight": _r(8, r, 1, 1)}
    delta = delta_from_group(group, tuple(conv.weight.shape), where="f")
    dw = torch.einsum("nmkl,in,mj->ijkl", group["lora_mid.weight"], group["lora_up.weight"].flatten(1),
                      group["lora_down.weight"].flatten(1))
    _check(delta, conv, dw * W)


def test_locon_tucker_core_of_the_wrong_kernel_is_a_checkpoint_error():
    group = {"lora_down.weight": _r(2, 6, 1, 1), "lora_mid.weight": _r(2, 2, 1, 1), "lora_up.weight": _r(8, 2, 1, 1)}
    with pytest.raises(CheckpointError, match=r"lora_unet_c\.lora_mid\.weight.*\(8, 6, 3, 3\).*mid \(2, 2, 1, 1\)"):
        delta_from_group(group, (8, 6, 3, 3), where="lora_unet_c")


def test_plain_lora_still_builds_as_before():
    lin = _linear()
    group = {"lora_down.weight": _r(4, 12), "lora_up.weight": _r(10, 4), "alpha": torch.tensor(2.0)}
    delta = delta_from_group(group, (10, 12), where="f")
    assert type(delta) is LoRA and delta.mid is None
    _check(delta, lin, group["lora_up.weight"] @ group["lora_down.weight"] * 0.5 * W)


# ---- LoHa ---------------------------------------------------------------------------------------------------------
def test_loha_linear_is_the_hadamard_product_of_two_low_rank_factors():
    lin, r = _linear(), 4
    g = {"hada_w1_a": _r(10, r), "hada_w1_b": _r(r, 12), "hada_w2_a": _r(10, r), "hada_w2_b": _r(r, 12),
         "alpha": torch.tensor(2.0)}
    delta = delta_from_group(g, (10, 12), where="f")
    assert isinstance(delta, lycoris.LoHa)
    dw = (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"]) * (2.0 / r) * W
    _check(delta, lin, dw)


def test_loha_conv_flattened_factors_reshape_to_the_kernel():
    conv, r = _conv(), 2
    g = {"hada_w1_a": _r(8, r), "hada_w1_b": _r(r, 6 * 9), "hada_w2_a": _r(8, r), "hada_w2_b": _r(r, 6 * 9)}
    delta = delta_from_group(g, (8, 6, 3, 3), where="f")
    dw = ((g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"])).reshape(8, 6, 3, 3) * W
    _check(delta, conv, dw)


def test_loha_tucker_uses_a1111s_cp_rebuild():
    conv, r = _conv(), 3
    g = {"hada_t1": _r(r, r, 3, 3), "hada_w1_a": _r(r, 8), "hada_w1_b": _r(r, 6),
         "hada_t2": _r(r, r, 3, 3), "hada_w2_a": _r(r, 8), "hada_w2_b": _r(r, 6), "alpha": torch.tensor(1.0)}
    delta = delta_from_group(g, (8, 6, 3, 3), where="f")
    dw = _cp(g["hada_t1"], g["hada_w1_a"], g["hada_w1_b"]) * _cp(g["hada_t2"], g["hada_w2_a"], g["hada_w2_b"])
    _check(delta, conv, dw * (1.0 / r) * W)


def test_loha_of_another_width_names_the_key_and_both_shapes():
    g = {"hada_w1_a": _r(10, 4), "hada_w1_b": _r(4, 16), "hada_w2_a": _r(10, 4), "hada_w2_b": _r(4, 16)}
    with pytest.raises(CheckpointError, match=r"where: lora_te_q\.hada_w1_a.*\(10, 12\).*\(10, 16\)"):
        delta_from_group(g, (10, 12), where="lora_te_q")


def test_loha_missing_factor_is_a_checkpoint_error():
    g = {"hada_w1_a": _r(10, 4), "hada_w1_b": _r(4, 12), "hada_w2_a": _r(10, 4)}
    with pytest.raises(CheckpointError, match=r"where: k\.hada_w2_b"):
        delta_from_group(g, (10, 12), where="k")


# ---- LoKr ---------------------------------------------------------------------------------------------------------
def test_lokr_full_w1_low_rank_w2_scales_by_alpha_over_rank():
    lin, r = _linear(), 2
    g = {"lokr_w1": _r(2, 3), "lokr_w2_a": _r(5, r), "lokr_w2_b": _r(r, 4), "alpha": torch.tensor(1.0)}
    delta = delta_from_group(g, (10, 12), where="f")
    assert isinstance(delta, lycoris.LoKr)
    dw = torch.kron(g["lokr_w1"], g["lokr_w2_a"] @ g["lokr_w2_b"]) * (1.0 / r) * W
    _check(delta, lin, dw)


def test_lokr_both_factors_full_ignores_alpha():
    lin = _linear()
    g = {"lokr_w1": _r(5, 4), "lokr_w2": _r(2, 3), "alpha": torch.tensor(100.0)}
    delta = delta_from_group(g, (10, 12), where="f")
    _check(delta, lin, torch.kron(g["lokr_w1"], g["lokr_w2"]) * W)


def test_lokr_low_rank_w1_and_4d_w2_on_a_conv():
    conv = _conv()
    g = {"lokr_w1_a": _r(4, 1), "lokr_w1_b": _r(1, 2), "lokr_w2": _r(2, 3, 3, 3), "alpha": torch.tensor(0.5)}
    delta = delta_from_group(g, (8, 6, 3, 3), where="f")
    w1 = g["lokr_w1_a"] @ g["lokr_w1_b"]
    dw = torch.kron(w1[:, :, None, None], g["lokr_w2"]) * 0.5 * W
    _check(delta, conv, dw)


def test_lokr_flattened_w2_on_a_conv_equals_the_4d_kron():
    conv, r = _conv(), 2
    g = {"lokr_w1": _r(2, 2), "lokr_w2_a": _r(4, r), "lokr_w2_b": _r(r, 3 * 9)}
    delta = delta_from_group(g, (8, 6, 3, 3), where="f")
    w2 = (g["lokr_w2_a"] @ g["lokr_w2_b"]).reshape(4, 3, 3, 3)
    _check(delta, conv, torch.kron(g["lokr_w1"][:, :, None, None], w2) * W)


def test_lokr_tucker_w2():
    conv, r = _conv(), 2
    g = {"lokr_w1": _r(2, 3), "lokr_t2": _r(r, r, 3, 3), "lokr_w2_a": _r(r, 4), "lokr_w2_b": _r(r, 2),
         "alpha": torch.tensor(1.0)}
    delta = delta_from_group(g, (8, 6, 3, 3), where="f")
    w2 = _cp(g["lokr_t2"], g["lokr_w2_a"], g["lokr_w2_b"])
    _check(delta, conv, torch.kron(g["lokr_w1"][:, :, None, None], w2) * (1.0 / r) * W)


def test_lokr_of_the_wrong_size_names_the_key_and_shapes():
    g = {"lokr_w1": _r(2, 3), "lokr_w2": _r(4, 4)}
    with pytest.raises(CheckpointError, match=r"where: m\.lokr_w1.*\(10, 12\).*\(8, 12\)"):
        delta_from_group(g, (10, 12), where="m")


# ---- DoRA ---------------------------------------------------------------------------------------------------------
def _a1111_dora(weight: torch.Tensor, dw: torch.Tensor, m: torch.Tensor, w: float) -> torch.Tensor:
    """A1111's apply_weight_decompose (norm per input channel), then the user weight on the result."""
    merged = weight + dw
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    return weight + w * (merged * (m / norm) - weight)


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_dora_per_input_channel_as_a1111(make):
    module = make()
    shape = tuple(module.weight.shape)
    r = 3
    down = _r(r, *shape[1:]) if len(shape) == 4 else _r(r, shape[1])
    up = _r(shape[0], r, *([1, 1] if len(shape) == 4 else []))
    m = _r(1, shape[1], *[1] * (len(shape) - 2)).abs() + 0.5
    g = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(2.0), "dora_scale": m}
    delta = delta_from_group(g, shape, where="f")
    assert isinstance(delta, DoRA) and delta.axis == 1
    dw = (up.flatten(1) @ down.flatten(1)).reshape(shape) * (2.0 / r)
    weight = module.weight.detach()
    _check(delta, module, _a1111_dora(weight, dw, m, W) - weight)


def test_dora_per_output_channel_matches_peft():
    peft = pytest.importorskip("peft")
    base = nn.Sequential()
    base.add_module("lin", _linear())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True, init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_()
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.uniform_(0.5, 1.5)
    g = {"lora_down.weight": layer.lora_A["default"].weight.detach().clone(),
         "lora_up.weight": layer.lora_B["default"].weight.detach().clone(), "alpha": torch.tensor(8.0),
         "dora_scale": layer.lora_magnitude_vector["default"].weight.detach().clone().reshape(10, 1)}
    weight = layer.base_layer.weight.detach().clone()
    delta = delta_from_group(g, (10, 12), where="f")
    assert isinstance(delta, DoRA) and delta.axis == 0
    merged = model.merge_and_unload().lin.weight.detach()
    torch.testing.assert_close(delta.weight(weight, 1.0), merged, rtol=1e-5, atol=1e-5)


def test_dora_scale_of_no_axis_is_a_checkpoint_error():
    g = {"lora_down.weight": _r(2, 12), "lora_up.weight": _r(10, 2), "dora_scale": _r(1, 7)}
    with pytest.raises(CheckpointError, match=r"where: d\.dora_scale.*\(1, 12, 1, \.\.\.\).*\(1, 7\)"):
        delta_from_group(g, (10, 12), where="d")


def test_dora_on_a_loha():
    lin, r = _linear(), 2
    g = {"hada_w1_a": _r(10, r), "hada_w1_b": _r(r, 12), "hada_w2_a": _r(10, r), "hada_w2_b": _r(r, 12),
         "dora_scale": _r(1, 12).abs() + 0.5}
    delta = delta_from_group(g, (10, 12), where="f")
    dw = (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"])
    weight = lin.weight.detach()
    _check(delta, lin, _a1111_dora(weight, dw, g["dora_scale"], W) - weight)


# ---- full and norm deltas -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_full_delta_with_bias(make):
    module = make()
    shape = tuple(module.weight.shape)
    g = {"diff": _r(*shape), "diff_b": _r(shape[0])}
    delta = delta_from_group(g, shape, where="f")
    assert isinstance(delta, lycoris.Full)
    _check(delta, module, g["diff"] * W, g["diff_b"] * W)


def test_full_delta_of_the_wrong_size_names_the_key():
    with pytest.raises(CheckpointError, match=r"where: x\.diff_b.*\(10,\).*\(12,\)"):
        delta_from_group({"diff": _r(10, 12), "diff_b": _r(12)}, (10, 12), where="x")


def test_norm_delta_changes_weight_and_bias():
    norm = nn.GroupNorm(2, 8)
    g = {"w_norm": _r(8), "b_norm": _r(8)}
    delta = delta_from_group(g, (8,), where="f")
    torch.testing.assert_close(delta.weight(norm.weight.detach(), W), norm.weight.detach() + g["w_norm"] * W)
    torch.testing.assert_close(delta.bias_delta(W), g["b_norm"] * W)


# ---- parity with PEFT's own LoHa / LoKr (same tensors, its merge) ---------------------------------------------------
@pytest.mark.parametrize("kind, make, options", [
    ("LoHaConfig", _linear, dict(r=3, alpha=6)),
    ("LoHaConfig", _conv, dict(r=2, alpha=3, use_effective_conv2d=True)),
    ("LoKrConfig", lambda: nn.Linear(24, 20), dict(r=1, alpha=3)),
], ids=["loha-linear", "loha-conv-tucker", "lokr-linear"])
def test_parity_with_peft(kind, make, options):
    peft = pytest.importorskip("peft")
    base = nn.Sequential()
    base.add_module("m", make())
    model = peft.get_peft_model(base, getattr(peft, kind)(target_modules=["m"], init_weights=False, **options))
    layer = model.base_model.model.m
    weight = layer.base_layer.weight.detach().clone()
    group = {name.removesuffix(".default"): p.detach().clone() for name, p in layer.named_parameters()
             if name.endswith(".default")}
    group["alpha"] = torch.tensor(float(options["alpha"]))
    delta = delta_from_group(group, tuple(weight.shape), where="f")
    merged = model.merge_and_unload().m.weight.detach()
    torch.testing.assert_close(delta.weight(weight, 1.0), merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [
    {"hada_w1_a": _r(10, 2), "hada_w1_b": _r(2, 12), "hada_w2_a": _r(10, 2), "hada_w2_b": _r(2, 12)},
    {"lokr_w1": _r(2, 3), "lokr_w2": _r(5, 4)},
    {"lora_down.weight": _r(2, 12), "lora_up.weight": _r(10, 2), "dora_scale": _r(1, 12).abs() + 0.5},
], ids=["loha", "lokr", "dora"])
def test_half_precision_weights_stay_half_and_merge_in_float32(group):
    weight = _r(10, 12)
    delta = delta_from_group({k: v.half() for k, v in group.items()}, (10, 12), where="f")
    merged = delta.weight(weight.half(), W)
    assert merged.dtype == torch.float16
    reference = delta_from_group({k: v.half().float() for k, v in group.items()}, (10, 12), where="f")
    torch.testing.assert_close(merged.float(), reference.weight(weight.half().float(), W), rtol=2e-3, atol=2e-3)
