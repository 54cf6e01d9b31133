"""save_lora_weights writes kohya-format safetensors (lora_unet_* / lora_te_* keys, alpha tensors, ss_* metadata)
that rebuild the same deltas, and that diffusers' own kohya loader reads to the same merged weights;
extract_lora recovers a low-rank fine-tune."""
from __future__ import annotations

import collections
import json
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from latentdiff.adapters.delta import Delta, DoRA, LoRA, delta_from_group
from latentdiff.adapters.lycoris import Full, LoHa, LoKr
from latentdiff.adapters.save import extract_lora, kohya_key, save_lora_weights
from latentdiff.errors import InputError, UsageError

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
Q_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _every_kind() -> dict[str, dict[str, tuple[Delta, tuple[int, ...]]]]:
    lora = LoRA(_r(4, 12), _r(10, 4), 2.0, (10, 12))
    return {
        "unet": {
            Q: (lora, (10, 12)),
            "conv_in": (LoRA(_r(2, 6, 3, 3), _r(8, 2, 1, 1), None, (8, 6, 3, 3)), (8, 6, 3, 3)),
            "down_blocks.0.resnets.0.conv1": (LoRA(_r(2, 6, 1, 1), _r(8, 2, 1, 1), 1.0, (8, 6, 3, 3),
                                                   _r(2, 2, 3, 3)), (8, 6, 3, 3)),
            "time_embedding.linear_1": (LoHa(_r(10, 2), _r(2, 12), _r(10, 2), _r(2, 12), None, None, 1.0, (10, 12)),
                                        (10, 12)),
            "mid_block.attentions.0.proj_in": (LoKr(_r(2, 3), None, None, None, _r(5, 2), _r(2, 4), None, 1.0,
                                                    (10, 12)), (10, 12)),
            "conv_out": (Full(_r(8, 6, 3, 3), _r(8), (8, 6, 3, 3)), (8, 6, 3, 3)),
            "mid_block.attentions.0.norm": (Full(_r(8), _r(8), (8,)), (8,)),
            "up_blocks.1.attentions.0.proj_out": (DoRA(LoRA(_r(3, 12), _r(10, 3), 3.0, (10, 12)),
                                                       _r(1, 12).abs(), 1, (10, 12)), (10, 12)),
        },
        "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": (lora, (10, 12)),
                         "encoder.layers.1.mlp.fc1": (LoRA(_r(1, 12), _r(10, 1), 1.0, (10, 12)), (10, 12))},
    }


def _groups(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        prefix, suffix = key.split(".", 1)
        groups.setdefault(prefix, {})[suffix] = tensor
    return groups


def test_save_then_rebuild_gives_the_same_weights_for_every_kind(tmp_path):
    cases = _every_kind()
    path = tmp_path / "mine.safetensors"
    save_lora_weights({c: {n: d for n, (d, _) in per.items()} for c, per in cases.items()}, path)
    groups = _groups(load_file(path))
    assert len(groups) == sum(len(per) for per in cases.values())
    for component, per in cases.items():
        for name, (delta, shape) in per.items():
            rebuilt = delta_from_group(groups[kohya_key(component, name)], shape, where=name)
            assert type(rebuilt) is type(delta)
            weight = _r(*shape)
            torch.testing.assert_close(rebuilt.weight(weight, 0.8), delta.weight(weight, 0.8), rtol=0, atol=0)
            b1, b2 = rebuilt.bias_delta(0.8), delta.bias_delta(0.8)
            assert (b1 is None) == (b2 is None) and (b1 is None or torch.equal(b1, b2))
    assert not [p.name for p in tmp_path.iterdir() if p.name != "mine.safetensors"]  # no temporary left behind


def test_key_names_follow_kohya(tmp_path):
    lora = LoRA(_r(4, 12), _r(10, 4), 2.0, (10, 12))
    path = tmp_path / "k.safetensors"
    save_lora_weights({"unet": {Q: lora}, "text_encoder": {"encoder.layers.0.self_attn.q_proj": lora}}, path)
    state = load_file(path)
    assert sorted(state) == sorted(
        f"{p}.{s}" for p in (Q_KEY, "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
        for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert state[f"{Q_KEY}.alpha"].dim() == 0 and state[f"{Q_KEY}.alpha"].item() == 2.0
    assert torch.equal(state[f"{Q_KEY}.lora_up.weight"], lora.up)


def test_metadata_network_module_and_user_entries(tmp_path):
    plain, lyco = tmp_path / "plain.safetensors", tmp_path / "lyco.safetensors"
    save_lora_weights({"unet": {Q: LoRA(_r(4, 12), _r(10, 4), 1.0, (10, 12))}}, plain,
                      metadata={"ss_base_model_version": "sd_v1", "ss_output_name": "mine"})
    save_lora_weights({"unet": {Q: LoHa(_r(10, 2), _r(2, 12), _r(10, 2), _r(2, 12), None, None, 1.0, (10, 12))}},
                      lyco)
    with safe_open(plain, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "1.0" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_output_name"] == "mine"
    with safe_open(lyco, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == "loha"


def test_saving_a_pipelines_loaded_adapter_records_its_base(tmp_path):
    lora = LoRA(_r(4, 12), _r(10, 4), 1.0, (10, 12))
    target = collections.namedtuple("Target", "component name")("unet", Q)
    adapter = types.SimpleNamespace(name="a", deltas={target: lora}, source="a.safetensors")
    pipe = types.SimpleNamespace(text_encoder=types.SimpleNamespace(hidden_size=768))
    pipe._adapter_state = types.SimpleNamespace(adapters={"a": adapter})
    save_lora_weights(pipe, tmp_path / "a.safetensors")
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v1"
        assert sorted(f.keys())[0].startswith(Q_KEY)
    pipe._adapter_state.adapters["b"] = adapter
    with pytest.raises(UsageError, match=r"adapter_name.*\['a', 'b'\]"):
        save_lora_weights(pipe, tmp_path / "b.safetensors")
    with pytest.raises(UsageError, match=r"adapter_name.*'c'"):
        save_lora_weights(pipe, tmp_path / "b.safetensors", adapter_name="c")


@pytest.mark.parametrize(("deltas", "match"), [
    ({"vae": {"x": LoRA(_r(1, 2), _r(2, 1), None, (2, 2))}}, r"where: deltas.*'vae'"),
    ({"unet": {"x": "not a delta"}}, r"where: deltas\['unet'\]\['x'\].*str"),
    ({"unet": {}}, r"nothing to save"),
])
def test_bad_deltas_are_input_errors(tmp_path, deltas, match):
    with pytest.raises(InputError, match=match):
        save_lora_weights(deltas, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_non_text_metadata_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"metadata\['ss_network_dim'\].*int"):
        save_lora_weights({"unet": {Q: LoRA(_r(1, 12), _r(10, 1), None, (10, 12))}}, tmp_path / "x.safetensors",
                          metadata={"ss_network_dim": 4})


@pytest.mark.parametrize("name, found", [("no/x.safetensors", "no folder"), (".", "a folder")])
def test_a_missing_folder_or_a_folder_as_the_path_is_a_clear_error(tmp_path, name, found):
    with pytest.raises(InputError, match=f"where: path: .*found: {found}"):
        save_lora_weights({"unet": {Q: LoRA(_r(1, 12), _r(10, 1), None, (10, 12))}}, tmp_path / name)
    assert not list(tmp_path.iterdir())


def test_diffusers_reads_the_saved_file_to_the_same_merged_weights(tmp_path, diffusers):
    pytest.importorskip("peft")
    from tests._support.sd import tiny_diffusers_pipeline

    pipe = tiny_diffusers_pipeline(tmp_path)
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    conv = pipe.unet.down_blocks[0].resnets[0].conv1
    name_q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    name_c = "down_blocks.0.resnets.0.conv1"
    wq, wc = attn.to_q.weight.detach().clone(), conv.weight.detach().clone()
    # one rank, alpha = rank: diffusers 0.42 drops a kohya file's per-module alphas (its alpha_pattern keys name no
    # module: a RuntimeWarning) and takes one rank for all; alpha itself is covered by the rebuild test above
    lora_q = LoRA(_r(4, wq.shape[1]) * 0.1, _r(wq.shape[0], 4) * 0.1, 4.0, tuple(wq.shape))
    lora_c = LoRA(_r(4, *wc.shape[1:]) * 0.1, _r(wc.shape[0], 4, 1, 1) * 0.1, 4.0, tuple(wc.shape))
    save_lora_weights({"unet": {name_q: lora_q, name_c: lora_c}}, tmp_path / "mine.safetensors")
    pipe.load_lora_weights(str(tmp_path), weight_name="mine.safetensors", adapter_name="mine")
    pipe.fuse_lora(lora_scale=1.0)
    torch.testing.assert_close(attn.to_q.weight.detach(), lora_q.weight(wq, 1.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.weight.detach(), lora_c.weight(wc, 1.0), rtol=1e-5, atol=1e-6)


def test_extract_lora_recovers_a_low_rank_fine_tune():
    base = {"a.weight": _r(10, 12), "c.weight": _r(8, 6, 3, 3), "a.bias": _r(10), "same.weight": _r(4, 4)}
    tuned = dict(base)
    tuned["a.weight"] = base["a.weight"] + _r(10, 3) @ _r(3, 12)
    tuned["c.weight"] = base["c.weight"] + (_r(8, 2) @ _r(2, 54)).reshape(8, 6, 3, 3)
    out = extract_lora(base, tuned, rank=3)
    assert sorted(out) == ["a", "c"]
    for name in out:
        w = base[f"{name}.weight"]
        torch.testing.assert_close(out[name].weight(w, 1.0), tuned[f"{name}.weight"], rtol=1e-4, atol=1e-4)
    assert out["c"].rank == 3 and out["c"].down.shape == (3, 6, 3, 3)


def test_extract_lora_rejects_a_bad_rank_and_mismatched_shapes():
    with pytest.raises(InputError, match="where: rank"):
        extract_lora({}, {}, rank=0)
    with pytest.raises(InputError, match=r"tuned\['a.weight'\].*\(2, 2\).*\(2, 3\)"):
        extract_lora({"a.weight": _r(2, 2)}, {"a.weight": _r(2, 3)}, rank=1)
