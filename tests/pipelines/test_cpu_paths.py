"""CPU paths (pipelines/cpu_paths.py, layers/prepacked.py, pipelines/compile_cache.py).

What is proven:
* prepacked convolutions compute what nn.Conv2d does: fp32 UNet outputs within 1e-4 (parity bound), bf16 ones as
  close to fp32 as eager bf16 is; state_dict unchanged; a weight changed in place is repacked, never stale; a
  new input size is packed for anew;
* prepacked linears and the fused GEGLU compute what nn.Linear and GEGLU's own chunk-gelu-product do (fp32 1e-5
  per layer, 1e-4 through a UNet), bf16 as close to fp32 as eager bf16; repacked after an in-place change;
* the residual sums fused into packed layers equal the plain sums (1e-6), and a layer with a forward hook (an
  unfused adapter) keeps its hook's effect;
* `optimize_for_cpu` gives a pipeline's fp32 images within 1e-4 of the plain pipeline's, and is undone;
* weights packed in place (`release=True`, `optimize_for_cpu(keep_weights=False)`): every Conv2d and Linear but
  the GEGLU projections holds its weight once (bytes counted: at most the plain weights + the GEGLU projections, where
  keeping both holds more), with the same results as packed copies beside the plain weights (bit for bit), the
  same Parameter objects, state_dict values bit for bit, saved files byte for byte, load_state_dict / training /
  `.to()` / LoRA fusing (against the published merge) / unfusing (bit for bit) / an IP-Adapter's copies of the
  keys and values seeing the plain values; memory-mapped weights released after each stage still work; a
  direct read gets the plain values; a pipeline's call asks its released weights nothing but a few metadata
  reads, however many layers there are (in-place changes: tests/layers/test_released_weights.py);
* `quantize(pipe, "int8")` replaces every UNet Linear, keeps the images within INT8_TOL of fp32, refuses a bf16
  UNet, and makes saving a UsageError;
* `use_compile_cache` points inductor's on-disk caches at the folder asked for, and a compile writes there.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from latentdiff import LatentDiffusionPipeline, UNet2DConditional
from latentdiff.errors import InputError, UsageError
from latentdiff.layers.attention import GEGLU, Attention, FeedForward
from latentdiff.layers.fused import add_output
from latentdiff.layers.prepacked import (
    is_prepacked,
    packed_copies,
    prepack_convolutions,
    prepack_linears,
    restore_weights,
    tensor_bytes,
    unpack_convolutions,
    unpack_linears,
)
from latentdiff.models.unet import UNetConfig
from latentdiff.pipelines import compile_cache, cpu_paths
from tests._support.parity import max_rel_error
from tests._support.tiny_builtin import make_tiny_shapes_model

pytestmark = pytest.mark.usefixtures("one_thread")

PARITY_TOL = 1e-4
# int8 weights (per-tensor scale) and int8 activations: the tiny model's 2-step images move by ~1% of their range
INT8_TOL = 0.05


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_shapes_model(tmp_path_factory.mktemp("cpu") / "shapes-64")


def tiny_unet(dtype=torch.float32) -> UNet2DConditional:
    torch.manual_seed(0)
    config = UNetConfig(in_channels=4, out_channels=4, channels=(32, 64), attention_levels=(False, True),
                        cross_attention_dim=24, layers_per_level=1, norm_num_groups=8, attention_heads=2)
    return UNet2DConditional(config).eval().to(dtype)


def unet_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=g).to(dtype), torch.tensor(500),
            torch.randn(2, 7, 24, generator=g).to(dtype))


def run(pipe, **options) -> torch.Tensor:
    options = dict(num_inference_steps=2, guidance_scale=3.0, output_type="pt", progress=False) | options
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), **options).images


def test_prepacked_unet_equals_eager_fp32_and_keeps_its_state():
    unet = tiny_unet()
    with torch.inference_mode():
        check_prepacked(unet)


def check_prepacked(unet):
    x, t, context = unet_inputs()
    expected, keys = unet(x, t, context), list(unet.state_dict())
    convs = sum(isinstance(m, nn.Conv2d) for m in unet.modules())
    assert prepack_convolutions(unet) == convs > 0
    assert max_rel_error(unet(x, t, context), expected) <= PARITY_TOL
    assert max_rel_error(unet(x.contiguous(memory_format=torch.channels_last), t, context), expected) <= PARITY_TOL
    assert list(unet.state_dict()) == keys and prepack_convolutions(unet) == 0   # twice: nothing more
    conv = next(m for m in unet.modules() if isinstance(m, nn.Conv2d))
    conv.weight.mul_(2)   # in place: the packed copy must follow
    changed = unet(x, t, context)
    assert unpack_convolutions(unet) == convs and not is_prepacked(conv)
    assert max_rel_error(changed, unet(x, t, context)) <= PARITY_TOL


@torch.no_grad()
def test_prepacked_convolutions_pack_for_each_input_size():
    unet = tiny_unet()
    x, t, context = unet_inputs()
    small = x[:, :, :8, :8].contiguous()
    expected, expected_small = unet(x, t, context), unet(small, t, context)
    prepack_convolutions(unet)
    for _ in range(2):   # 16 x 16, 8 x 8, and back: each call packed for its own input shape
        assert max_rel_error(unet(x, t, context), expected) <= PARITY_TOL
        assert max_rel_error(unet(small, t, context), expected_small) <= PARITY_TOL


@torch.no_grad()
def test_fused_geglu_and_packed_linear_equal_the_plain_layers_fp32():
    torch.manual_seed(0)
    ff = FeedForward(48).eval()
    x = torch.randn(2, 37, 48)
    geglu, out = ff.net[0], ff.net[2]
    h, gate = torch.nn.functional.linear(x, geglu.proj.weight, geglu.proj.bias).chunk(2, dim=-1)
    expected_geglu = h * torch.nn.functional.gelu(gate)          # GEGLU's definition, written out
    expected = torch.nn.functional.linear(expected_geglu, out.weight, out.bias)
    assert prepack_linears(ff) == 2 and is_prepacked(geglu) and is_prepacked(out) and not is_prepacked(geglu.proj)
    assert max_rel_error(geglu(x), expected_geglu) <= 1e-5
    assert max_rel_error(ff(x), expected) <= 1e-5
    assert max_rel_error(ff(x[0]), expected[0]) <= 1e-5          # 2-d input: the chunked feed-forward's rows
    geglu.proj.weight.mul_(2)   # in place: both packed halves must follow
    h, gate = torch.nn.functional.linear(x, geglu.proj.weight, geglu.proj.bias).chunk(2, dim=-1)
    assert max_rel_error(geglu(x), h * torch.nn.functional.gelu(gate)) <= 1e-5
    assert unpack_linears(ff) == 2 and not any(is_prepacked(m) for m in ff.modules())


def test_prepacked_linears_in_a_unet_fp32_keep_state_and_still_train():
    unet = tiny_unet()
    x, t, context = unet_inputs()
    with torch.no_grad():
        expected, keys = unet(x, t, context), list(unet.state_dict())
        linears = sum(type(m) is nn.Linear for m in unet.modules())
        geglus = sum(type(m) is GEGLU for m in unet.modules())
        # each GEGLU counts once, for its projection: every Linear outside a GEGLU, every GEGLU
        assert prepack_linears(unet) == linears and geglus > 0
        assert max_rel_error(unet(x, t, context), expected) <= PARITY_TOL
        assert list(unet.state_dict()) == keys and prepack_linears(unet) == 0
    unet.train()
    unet(x, t, context).square().mean().backward()   # the packed ops have no backward: the plain ones run
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


@torch.no_grad()
def test_prepacked_bf16_is_as_close_to_fp32_as_eager_bf16():
    reference = tiny_unet()(*unet_inputs())
    unet = tiny_unet(torch.bfloat16)
    eager = unet(*unet_inputs(torch.bfloat16)).float()
    prepack_convolutions(unet)
    packed = unet(*unet_inputs(torch.bfloat16)).float()
    assert max_rel_error(packed, reference) <= 1.5 * max_rel_error(eager, reference) + 1e-3
    prepack_linears(unet)
    packed = unet(*unet_inputs(torch.bfloat16)).float()
    assert max_rel_error(packed, reference) <= 1.5 * max_rel_error(eager, reference) + 1e-3


def test_prepacked_convolutions_still_train():
    unet = tiny_unet().train()
    prepack_convolutions(unet)
    x, t, context = unet_inputs()
    unet(x, t, context).square().mean().backward()   # the packed op has no backward: the plain one runs
    assert unet.conv_in.weight.grad is not None


def test_optimize_for_cpu_keeps_the_images_and_is_undone(folder):
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    expected = run(pipe)
    cpu_paths.optimize_for_cpu(pipe)
    assert all(is_prepacked(m) for m in pipe.unet.modules() if type(m) in (nn.Conv2d, GEGLU))
    assert any(is_prepacked(m) for m in pipe.unet.modules() if type(m) is nn.Linear)
    assert max_rel_error(run(pipe), expected) <= PARITY_TOL
    cpu_paths.undo_cpu_optimization(pipe)
    assert not any(is_prepacked(m) for network in pipe.networks() for m in network.modules())
    assert max_rel_error(run(pipe), expected) <= PARITY_TOL


def test_compile_after_optimize_for_cpu_runs_plain_layers_and_refuses_int8_static(folder):
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    expected = run(pipe)
    cpu_paths.optimize_for_cpu(pipe, keep_weights=False)
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="prepacked layers"):
        pipe.compile(backend="eager")   # the packed layers' lock and oneDNN tensors broke tracing before
    assert not any(is_prepacked(m) for m in pipe.unet.modules())
    assert max_rel_error(run(pipe), expected) <= PARITY_TOL
    quantized = cpu_paths.quantize(LatentDiffusionPipeline.from_pretrained(folder), "int8-static",
                                   calibration_steps=1)
    with pytest.raises(InputError, match="dequantize"):
        quantized.compile(backend="eager")


@pytest.mark.parametrize("keep_weights", [True, False])
def test_int8_after_optimize_for_cpu_equals_int8_before_it(folder, keep_weights):
    """Dynamic int8 replaces the Linear layers: packed Linear / GEGLU forwards are unpacked first (they failed
    with the quantized layers' `weight` method before)."""
    before = cpu_paths.optimize_for_cpu(cpu_paths.quantize(LatentDiffusionPipeline.from_pretrained(folder), "int8"))
    after = cpu_paths.optimize_for_cpu(LatentDiffusionPipeline.from_pretrained(folder), keep_weights=keep_weights)
    cpu_paths.quantize(after, "int8")
    assert cpu_paths.quantized_linears(after.unet) == cpu_paths.quantized_linears(before.unet) > 0
    assert max_rel_error(run(after), run(before)) <= PARITY_TOL
    static = cpu_paths.quantize(LatentDiffusionPipeline.from_pretrained(folder), "int8-static", calibration_steps=1)
    with pytest.raises(InputError, match="dequantize"):
        cpu_paths.quantize(static, "int8")


def test_int8_quantization_replaces_the_linears_bounds_the_error_and_refuses_to_save(folder, tmp_path):
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    expected = run(pipe)
    linears = sum(type(m) is nn.Linear for m in pipe.unet.modules())
    cpu_paths.quantize(pipe, "int8")
    assert cpu_paths.quantized_linears(pipe.unet) == linears > 0
    assert not any(type(m) is nn.Linear for m in pipe.unet.modules())
    error = max_rel_error(run(pipe), expected)
    assert 0 < error <= INT8_TOL
    with pytest.raises(UsageError, match="int8"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    with pytest.raises(InputError, match="quantization"):
        cpu_paths.quantize(pipe, "int4")
    with pytest.raises(InputError, match="float32"):
        cpu_paths.quantize(LatentDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16))


def test_compile_cache_folder_is_set_and_written(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.delenv(compile_cache.INDUCTOR_ENV, raising=False)
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.use_compile_cache() == (tmp_path / "xdg" / "latentdiff" / "inductor").resolve()
    folder = compile_cache.use_compile_cache(tmp_path / "inductor")
    assert os.environ[compile_cache.INDUCTOR_ENV] == str(folder) and folder.is_dir()
    assert inductor_config.fx_graph_cache


@pytest.mark.slow
def test_compile_writes_its_graph_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.INDUCTOR_ENV, str(tmp_path / "inductor"))
    linear = nn.Linear(8, 8)
    torch._dynamo.reset()
    compiled = torch.compile(linear)
    compile_cache.use_compile_cache()
    with torch.no_grad():
        assert max_rel_error(compiled(torch.ones(2, 8)), linear(torch.ones(2, 8))) <= PARITY_TOL
    assert any((tmp_path / "inductor").rglob("*")), "inductor wrote nothing to the cache folder"


@torch.no_grad()
def test_fused_residual_sums_equal_the_plain_sums_and_keep_hooks():
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(16, 8)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 8, 6, 6)
    tokens, token_residual = torch.randn(2, 5, 16), torch.randn(2, 5, 8)
    expected = (torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1) + residual,
                torch.nn.functional.linear(tokens, linear.weight, linear.bias) + token_residual)
    prepack_convolutions(conv), prepack_linears(linear)
    assert max_rel_error(add_output(conv, x, residual), expected[0]) <= 1e-6
    assert max_rel_error(add_output(linear, tokens, token_residual), expected[1]) <= 1e-6
    # a forward hook (an unfused LoRA's, the adapters' runtime) must still run: the plain sum then
    handle = linear.register_forward_hook(lambda module, args, out: out * 2)
    assert max_rel_error(add_output(linear, tokens, token_residual), 2 * (expected[1] - token_residual)
                         + token_residual) <= 1e-6
    handle.remove()


def test_optimize_for_cpu_keeps_a_hooked_layer_s_effect(folder):
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    out = next(m for m in pipe.unet.modules() if isinstance(m, Attention)).to_out[0]
    out.register_forward_hook(lambda module, args, output: output + 0.5)   # as an unfused adapter would
    expected = run(pipe)
    cpu_paths.optimize_for_cpu(pipe)
    assert max_rel_error(run(pipe), expected) <= PARITY_TOL


@pytest.mark.parametrize("kernel", [1, 3])
@torch.no_grad()
def test_tiny_outputs_run_as_im2col_gemm_and_equal_the_convolution(kernel):
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 16, kernel, padding=kernel // 2)
    x = torch.randn(2, 24, 4, 4).contiguous(memory_format=torch.channels_last)   # 32 output pixels: the GEMM
    residual = torch.randn(2, 16, 4, 4)
    expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=kernel // 2)
    prepack_convolutions(conv)
    assert conv.forward._as_gemm(x.shape) and not conv.forward._as_gemm((2, 24, 8, 8))
    assert conv.forward._as_gemm((1, 24, 4, 8)) and not conv.forward._as_gemm((3, 24, 4, 4))
    assert max_rel_error(conv(x), expected) <= 1e-5
    assert max_rel_error(add_output(conv, x, residual), expected + residual) <= 1e-5
    assert max_rel_error(conv(x.contiguous()), expected) <= 1e-5                  # a plain-layout input too
    bigger = torch.randn(2, 24, 8, 8)                                               # back to the convolution
    assert max_rel_error(conv(bigger), torch.nn.functional.conv2d(bigger, conv.weight, conv.bias,
                                                                  padding=kernel // 2)) <= 1e-5


# ---- packed weights in place of the plain ones (optimize_for_cpu's default; issue 20's memory) ----------------
def weight_bytes(module: nn.Module) -> int:
    """Bytes of every weight `module` holds now: dense parameters and buffers by storage, packed parameters
    (oneDNN layout, no storage) and the packed copies beside them by element count."""
    tensors = [*module.parameters(), *module.buffers()]
    dense = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors if not t.is_mkldnn}
    return sum(dense.values()) + tensor_bytes([t for t in tensors if t.is_mkldnn] + packed_copies(module))


def packed_in_place(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m.__dict__.get("_parameters", {}).get("weight"),
                                                          torch.Tensor) and m.weight.is_mkldnn]


def test_weights_packed_in_place_are_held_once_and_keep_values_identity_and_results():
    unet, kept = tiny_unet(), tiny_unet()
    x, t, context = unet_inputs()
    before, params = {k: v.clone() for k, v in unet.state_dict().items()}, list(unet.parameters())
    plain = sum(p.numel() * p.element_size() for p in [*unet.parameters(), *unet.buffers()])
    geglus = sum(m.proj.weight.numel() * m.proj.weight.element_size() for m in unet.modules() if type(m) is GEGLU)
    with torch.inference_mode():
        expected = unet(x, t, context)
        for model, release in ((unet, True), (kept, False)):
            prepack_convolutions(model, release=release), prepack_linears(model, release=release)
        out, out_kept = unet(x, t, context), kept(x, t, context)
    assert torch.equal(out, out_kept)   # the same packed tensors: the same results
    assert max_rel_error(out, expected) <= PARITY_TOL
    # every Conv2d and Linear but the GEGLU's projection (packed in two halves beside it) holds its weight once
    linears = [m for m in unet.modules() if type(m) is nn.Linear]
    released = sum(type(m) is nn.Conv2d for m in unet.modules()) + len(linears) - (
        sum(type(m) is GEGLU for m in unet.modules()))
    assert len(packed_in_place(unet)) == released
    assert weight_bytes(unet) <= plain + geglus < weight_bytes(kept)   # kept: every weight twice
    assert all(a is b for a, b in zip(params, unet.parameters(), strict=True))   # optimizers keep theirs
    state = unet.state_dict()
    assert list(state) == list(before) and all(torch.equal(state[k], v) for k, v in before.items())
    assert len(packed_in_place(unet)) == released   # state_dict copies them out; they stay packed
    assert torch.equal(unet.conv_in.weight.sum(), before["conv_in.weight"].sum())   # read: the plain values
    assert unet.conv_in not in packed_in_place(unet)   # ... of the weight turned back (packed at its next call)
    # a new input size repacks from the packed weight itself: still the plain convolution
    small = x[:, :, :8, :8].contiguous()
    with torch.inference_mode():
        assert max_rel_error(unet(small, t, context), tiny_unet()(small, t, context)) <= PARITY_TOL
        assert torch.equal(unet(x, t, context), out)


def test_weights_packed_in_place_follow_load_state_dict_train_and_move():
    unet, reference = tiny_unet(), tiny_unet()
    x, t, context = unet_inputs()
    prepack_convolutions(unet, release=True), prepack_linears(unet, release=True)
    with torch.no_grad():
        unet(x, t, context)
    changed = {k: v * 1.5 if k.endswith("weight") else v for k, v in reference.state_dict().items()}
    reference.load_state_dict(changed)
    unet.load_state_dict(changed)   # into the same parameters, restored first: never a stale packed copy
    with torch.no_grad():
        assert max_rel_error(unet(x, t, context), reference(x, t, context)) <= PARITY_TOL
        assert packed_in_place(unet)
    params = list(unet.parameters())
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.1)
    unet.train()
    unet(x, t, context).square().mean().backward()   # the plain weights again: the packed ops have no backward
    optimizer.step()
    assert all(a is b and a.grad is not None for a, b in zip(params, unet.parameters(), strict=True))
    assert not torch.equal(unet.conv_in.weight, reference.conv_in.weight)   # the optimizer's step took
    with torch.no_grad():
        unet.eval()(x, t, context)
        assert not packed_in_place(unet)   # weights holding gradients stay plain (a swap would drop them)
        optimizer.zero_grad()
        unet(x, t, context)
        trained = {k: v.clone() for k, v in unet.state_dict().items()}
        assert packed_in_place(unet)
        unet.to(torch.float64)   # .to() sees the plain weights
    assert all(torch.equal(v, trained[k].double()) for k, v in unet.state_dict().items())
    assert not packed_in_place(unet)


def test_optimize_for_cpu_holds_the_weights_once_saves_the_same_files_and_is_undone(folder, tmp_path):
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.save_pretrained(tmp_path / "before")
    expected, state = run(pipe), {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    networks = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    plain = {name: weight_bytes(net) for name, net in networks.items()}
    geglus = sum(m.proj.weight.numel() * m.proj.weight.element_size() for m in pipe.unet.modules()
                 if type(m) is GEGLU)
    cpu_paths.optimize_for_cpu(pipe, keep_weights=False)
    assert max_rel_error(run(pipe), expected) <= PARITY_TOL
    for name, net in networks.items():
        assert packed_in_place(net), name
        assert weight_bytes(net) <= plain[name] + (geglus if name == "unet" else 0), name
    pipe.save_pretrained(tmp_path / "after")
    files = sorted(p.relative_to(tmp_path / "before") for p in (tmp_path / "before").rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(tmp_path / "after") for p in (tmp_path / "after").rglob("*")
                                     if p.is_file())
    assert all((tmp_path / "before" / f).read_bytes() == (tmp_path / "after" / f).read_bytes() for f in files)
    cpu_paths.undo_cpu_optimization(pipe)
    assert not any(packed_in_place(net) for net in networks.values())
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())
    kept = cpu_paths.optimize_for_cpu(LatentDiffusionPipeline.from_pretrained(folder), keep_weights=True)
    assert max_rel_error(run(kept), expected) <= PARITY_TOL
    assert not packed_in_place(kept.unet) and weight_bytes(kept.unet) > plain["unet"] + geglus


def test_a_pipeline_call_reads_only_metadata_of_the_weights_packed_in_place(folder, monkeypatch):
    from latentdiff.layers.prepacked import ReleasedWeight

    pipe = cpu_paths.optimize_for_cpu(LatentDiffusionPipeline.from_pretrained(folder), keep_weights=False)
    run(pipe)   # packs, the weights in place
    asked, handler = [], ReleasedWeight.__torch_function__.__func__

    def counted(cls, func, types, args=(), kwargs=None):
        asked.append(torch.overrides.resolve_name(func))
        return handler(cls, func, types, args, kwargs)

    released = len(packed_in_place(pipe.unet))
    monkeypatch.setattr(ReleasedWeight, "__torch_function__", classmethod(counted))
    run(pipe)
    monkeypatch.undo()
    assert len(asked) <= 10 and {name.rsplit(".", 2)[1] for name in asked} <= {"dtype", "device"}, asked
    assert len(packed_in_place(pipe.unet)) == released > 10   # none turned back by the call


def test_lora_fused_onto_weights_packed_in_place_equals_the_published_merge(folder, tmp_path):
    from safetensors.torch import save_file

    from tests._support.lora import kohya, merge_kohya, targets

    reference, pipe = (LatentDiffusionPipeline.from_pretrained(folder) for _ in range(2))
    found = targets(reference.unet)
    state = kohya(found)
    save_file(state, tmp_path / "one.safetensors")
    prefixes = [k.removesuffix(".lora_down.weight") for k in state if k.endswith("lora_down.weight")]
    merge_kohya({"unet": reference.unet}, state, {p: f"unet:{name}" for p, (_, name, _) in
                                                  zip(prefixes, found, strict=True)})
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cpu_paths.optimize_for_cpu(pipe, keep_weights=False)
    run(pipe)   # packs, the weights in place
    pipe.load_lora_weights(tmp_path / "one.safetensors")
    pipe.fuse_lora()
    fused, merged = pipe.unet.state_dict(), reference.unet.state_dict()
    assert max(max_rel_error(fused[k], merged[k]) for k in merged) <= 1e-6
    assert max_rel_error(run(pipe), run(reference)) <= PARITY_TOL
    pipe.unfuse_lora()
    assert all(torch.equal(v, base[k]) for k, v in pipe.unet.state_dict().items())   # bit for bit


def test_optimize_for_cpu_on_memory_mapped_weights_released_after_each_stage(folder):
    pipe = LatentDiffusionPipeline.from_pretrained(folder, mmap_weights=True)   # release_weights after each stage
    expected = run(pipe)
    cpu_paths.optimize_for_cpu(pipe, keep_weights=False)
    assert max_rel_error(run(pipe), expected) <= PARITY_TOL and packed_in_place(pipe.unet)
    assert max_rel_error(run(pipe), expected) <= PARITY_TOL


@torch.no_grad()
def test_an_ip_adapter_made_for_a_unet_with_weights_packed_in_place_copies_the_plain_ones():
    from latentdiff.models.ip_adapter import IPAdapter

    unet = tiny_unet()
    expected = IPAdapter.for_unet(unet, image_embed_dim=16).state_dict()
    prepack_convolutions(unet, release=True), prepack_linears(unet, release=True)
    unet(*unet_inputs())
    assert packed_in_place(unet)
    made = IPAdapter.for_unet(unet, image_embed_dim=16).state_dict()
    copied = [k for k in expected if "_ip." in k]
    assert copied and all(torch.equal(made[k], expected[k]) for k in copied)


@pytest.mark.parametrize("release", [True, False])
@torch.no_grad()
def test_a_deep_copy_of_a_prepacked_unet_is_packed_independent_and_equal(release):
    import copy

    unet = tiny_unet(torch.bfloat16)
    prepack_convolutions(unet, release=release)
    prepack_linears(unet, release=release)
    x, t, context = unet_inputs(torch.bfloat16)
    expected = unet(x, t, context)        # packed (and released) before the copy
    twin = copy.deepcopy(unet)
    assert all(is_prepacked(m) for m in twin.modules() if type(m) in (nn.Conv2d, GEGLU))
    assert torch.equal(twin(x, t, context), expected) and torch.equal(unet(x, t, context), expected)
    originals = dict(unet.named_parameters())
    for name, param in twin.named_parameters():
        assert param is not originals[name]
    restore_weights(twin)          # plain weights before an in-place change (a released one has oneDNN's layout)
    twin.conv_in.weight.detach().zero_()          # the copy's weights are its own
    assert torch.equal(unet(x, t, context), expected) and not torch.equal(twin(x, t, context), expected)
    unpack_convolutions(twin)
    unpack_linears(twin)
    assert not any(is_prepacked(m) for m in twin.modules())
    assert torch.equal(copy.deepcopy(twin).conv_in.weight, twin.conv_in.weight)
