"""Static int8 convolutions and linear layers (layers/int8.py) and `quantize(pipe, "int8-static")`.

What is proven:
* an int8 convolution / linear layer computes exactly the float layer on its fake-quantized operands (input
  clamp(round(x / s) + z) mapped back, weight round(w / s_o) * s_o per output channel), written out with
  `F.conv2d` / `F.linear`: fp32 outputs within 1e-5 (int32 accumulation is exact; only float rounding differs),
  for strided, unbiased and channels-last convolutions and 3-d linear inputs; bf16 inputs give bf16 outputs;
* the compiled input quantizer gives the eager quantizer's bytes, and a quantizer that fails falls back to eager
  with a warning;
* calibration observes each layer's true input [min, max] over all calls and removes its hooks;
* a weight changed in place is quantized anew (never stale), and so is the fp32 copy of a bias (in place, swapped,
  another dtype); a call that wants gradients runs the float layer;
  bf16 shapes where int8 does not pay run the packed float path;
* `quantize(pipe, "int8-static")` swaps every candidate layer of the UNet, keeps the images within
  INT8_STATIC_TOL of fp32, keeps the weights (saving writes the model's own), is undone by `dequantize` to the
  exact previous images, survives `undo_cpu_optimization`, and refuses bad arguments before any work;
* a ControlNet pipeline calibrated with its hints (`calibration_options`) has the ranges of the hinted calls and
  its controlled image stays within INT8_STATIC_TOL of fp32;
* an SDXL refiner calibrated with `refiner_calibration` observes exactly the inputs of the base -> refiner hand-off
  and its refined image stays within INT8_STATIC_TOL of fp32.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from latentdiff import LatentDiffusionPipeline
from latentdiff.errors import InputError, UsageError
from latentdiff.layers import int8
from latentdiff.layers.prepacked import is_int8, prepack_convolutions, prepack_linears
from latentdiff.pipelines import cpu_paths
from tests._support.int8 import observed_ranges
from tests._support.parity import max_rel_error
from tests._support.tiny_builtin import make_tiny_shapes_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Measured on the tiny model: int8 images move by ~1-2 % of their range against fp32 (2 steps, CFG 3)
INT8_STATIC_TOL = 0.06


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_shapes_model(tmp_path_factory.mktemp("int8") / "shapes-64")


def run(pipe, **options) -> torch.Tensor:
    return pipe("a red circle", num_inference_steps=2, guidance_scale=3.0, output_type="pt", progress=False,
                generator=torch.Generator().manual_seed(0), **options).images


def fake_quantized_input(x: torch.Tensor, forward: int8._Int8Forward) -> torch.Tensor:
    s, z = forward.scale, forward.zero_point
    return (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s


def fake_quantized_weight(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / 127
    return torch.round(w / scale) * scale


def random_range(x: torch.Tensor) -> tuple[float, float]:
    return float(x.min()) * 0.9, float(x.max()) * 0.9    # narrower than x: clipping is exercised too


@pytest.mark.parametrize(("stride", "bias", "channels_last"), [(1, True, True), (2, True, False), (1, False, False)])
@torch.no_grad()
def test_int8_convolution_equals_the_convolution_of_its_fake_quantized_operands(stride, bias, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(48, 40, 3, stride=stride, padding=1, bias=bias)
    x = torch.randn(2, 48, 12, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    forward = int8.Int8ConvForward(conv, random_range(x))
    expected = F.conv2d(fake_quantized_input(x, forward), fake_quantized_weight(conv.weight), conv.bias,
                        stride=stride, padding=1)
    out = forward(x)
    assert out.dtype == torch.float32 and max_rel_error(out, expected) <= 1e-5
    assert max_rel_error(out, conv(x)) > 1e-4       # it is quantized: not the float convolution
    assert forward(x.bfloat16()).dtype == torch.bfloat16


@torch.no_grad()
def test_int8_linear_equals_the_product_of_its_fake_quantized_operands():
    torch.manual_seed(0)
    for linear in (nn.Linear(64, 48), nn.Linear(64, 40, bias=False)):
        x = torch.randn(3, 10, 64)
        forward = int8.Int8LinearForward(linear, random_range(x))
        expected = F.linear(fake_quantized_input(x, forward), fake_quantized_weight(linear.weight), linear.bias)
        out = forward(x)
        assert out.shape == (3, 10, linear.out_features) and max_rel_error(out, expected) <= 1e-5
        bf16 = forward(x.bfloat16())
        assert bf16.dtype == torch.bfloat16 and max_rel_error(bf16, expected) <= 0.03


def test_input_quantizer_compiled_equals_eager_and_falls_back(monkeypatch):
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last) * 3
    for dtype in (torch.float32, torch.bfloat16):
        inv_scale, zero_point = torch.tensor(1 / 0.02), torch.tensor(100.0)
        expected = int8.quantize_eager(x.to(dtype), inv_scale, zero_point)
        assert torch.equal(int8.quantize_input(x.to(dtype), inv_scale, zero_point), expected)
        assert expected.dtype == torch.uint8 and expected.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(expected, torch.clamp(torch.round(x.bfloat16().float() * 50) + 100, 0, 255).to(torch.uint8))

    def broken(*args):
        raise RuntimeError("no compiler")
    monkeypatch.setattr(int8, "_quantizer", [broken])
    with pytest.warns(RuntimeWarning, match="eager"):
        assert torch.equal(int8.quantize_input(x, inv_scale, zero_point), int8.quantize_eager(x, inv_scale,
                                                                                                zero_point))
    assert int8._quantizer == [int8.quantize_eager]


def test_input_qparams_hold_zero_and_cover_the_range():
    scale, zero_point = int8.input_qparams(-0.28, 5.0)
    assert zero_point == round(0.28 / scale) and scale == pytest.approx(5.28 / 255)
    assert int8.input_qparams(1.0, 2.0) == (pytest.approx(2 / 255), 0)      # 0 is always representable
    assert int8.input_qparams(-3.0, -1.0) == (pytest.approx(3 / 255), 255)


@torch.no_grad()
def test_calibration_observes_every_call_and_removes_its_hooks():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    layers = dict(model.named_children())
    inputs = [torch.randn(4, 32) * k for k in (1, 3)]
    with int8.observe_input_ranges(layers) as ranges:
        for x in inputs:
            model(x)
    hidden = [model[0](x) for x in inputs]
    assert ranges["0"] == (min(float(x.min()) for x in inputs), max(float(x.max()) for x in inputs))
    assert ranges["1"] == (min(float(h.min()) for h in hidden), max(float(h.max()) for h in hidden))
    assert not any(m._forward_pre_hooks for m in model.modules())


@torch.no_grad()
def test_a_weight_changed_in_place_is_quantized_anew():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(1, 32, 8, 8)
    forward = int8.Int8ConvForward(conv, random_range(x))
    forward(x)
    conv.weight.mul_(-2)
    expected = F.conv2d(fake_quantized_input(x, forward), fake_quantized_weight(conv.weight), conv.bias, padding=1)
    assert max_rel_error(forward(x), expected) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_the_float32_bias_is_made_once_and_again_when_the_bias_changes(dtype):
    """_bias() caches the bias's fp32 copy, keyed by its version, storage, dtype and device: a bias changed in
    place, swapped for another tensor or moved to another dtype gives what a fresh int8 forward (no cache) gives."""
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(32, 32, 3, padding=1).to(dtype), nn.Linear(32, 48).to(dtype)
    for layer, x in ((conv, torch.randn(1, 32, 8, 8, dtype=dtype)), (linear, torch.randn(4, 32, dtype=dtype))):
        kind = int8.Int8ConvForward if type(layer) is nn.Conv2d else int8.Int8LinearForward
        forward = kind(layer, (-4.0, 4.0))
        before = forward(x)
        assert forward._bias() is forward._bias() and forward._bias().dtype == torch.float32   # converted once
        layer.bias.add_(0.5)                                               # in place: a new version
        assert torch.equal(forward(x), kind(layer, (-4.0, 4.0))(x)) and not torch.equal(forward(x), before)
        layer.bias.data = torch.full_like(layer.bias, -1.0)                # another storage
        assert torch.equal(forward(x), kind(layer, (-4.0, 4.0))(x))
        assert forward._bias().eq(-1.0).all()
        other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
        layer.bias.data = (layer.bias.detach() - 1.0).to(other)            # another dtype
        assert torch.equal(forward._bias(), layer.bias.detach().float()) and forward._bias().eq(-2.0).all()


def test_a_call_that_wants_gradients_runs_the_float_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(1, 32, 8, 8, requires_grad=True)
    conv.forward = int8.Int8ConvForward(conv, random_range(x.detach()))
    out = conv(x)
    assert torch.equal(out, F.conv2d(x, conv.weight, conv.bias, padding=1))
    out.sum().backward()
    assert conv.weight.grad is not None


@torch.no_grad()
def test_bf16_shapes_where_int8_does_not_pay_run_the_packed_float_path(monkeypatch):
    torch.manual_seed(0)
    linear, conv = nn.Linear(64, 64).bfloat16(), nn.Conv2d(64, 64, 3, padding=1).bfloat16()
    rows, tiny = torch.randn(4, 64).bfloat16(), torch.randn(1, 64, 4, 4).bfloat16()   # 16 px: im2col GEMM
    packed_linear, packed_conv = nn.Linear(64, 64).bfloat16(), nn.Conv2d(64, 64, 3, padding=1).bfloat16()
    packed_linear.load_state_dict(linear.state_dict())
    packed_conv.load_state_dict(conv.state_dict())
    prepack_linears(packed_linear)
    prepack_convolutions(packed_conv)
    monkeypatch.setattr(int8, "INT8_MAX_ROWS", 2)
    assert torch.equal(int8.Int8LinearForward(linear, (-4.0, 4.0))(rows), packed_linear(rows))
    assert torch.equal(int8.Int8ConvForward(conv, (-4.0, 4.0))(tiny), packed_conv(tiny))
    monkeypatch.setattr(int8, "INT8_MAX_ROWS", 4)
    assert not torch.equal(int8.Int8LinearForward(linear, (-4.0, 4.0))(rows), packed_linear(rows))


def test_quantize_static_swaps_the_layers_bounds_the_error_and_keeps_the_weights(folder, tmp_path):
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    expected = run(pipe)
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cpu_paths.optimize_for_cpu(pipe)
    packed = run(pipe)
    candidates = int8.int8_candidates(pipe.unet)
    assert any(type(m) is nn.Conv2d for m in candidates.values())
    assert any(type(m) is nn.Linear for m in candidates.values())
    cpu_paths.quantize(pipe, "int8-static", calibration=["a red circle", "a blue square"], calibration_steps=2)
    assert pipe.quantization == "int8-static"
    assert all(is_int8(m) for m in candidates.values())
    error = max_rel_error(run(pipe), expected)
    assert 1e-4 < error <= INT8_STATIC_TOL
    cpu_paths.undo_cpu_optimization(pipe)
    assert all(is_int8(m) for m in candidates.values())     # undoing the packing keeps the quantization
    pipe.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in state.items())
    cpu_paths.optimize_for_cpu(pipe)
    cpu_paths.dequantize(pipe)
    assert not any(is_int8(m) for m in pipe.unet.modules()) and not hasattr(pipe, "quantization")
    assert torch.equal(run(pipe), packed)


def test_quantize_static_in_bf16_and_with_a_calibration_function(folder):
    pipe = LatentDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    expected = run(LatentDiffusionPipeline.from_pretrained(folder))
    calls = []
    cpu_paths.quantize(pipe, "int8-static", calibration=lambda p: calls.append(run(p)))
    assert len(calls) == 1 and any(is_int8(m) for m in pipe.unet.modules())
    assert max_rel_error(run(pipe).float(), expected) <= INT8_STATIC_TOL


def test_quantize_static_refuses_bad_arguments_before_any_work(folder):
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    with pytest.raises(InputError, match="int8-static"):
        cpu_paths.quantize(pipe, "int4")
    with pytest.raises(InputError, match="calibration_steps"):
        cpu_paths.quantize(pipe, "int8-static", calibration_steps=0)
    with pytest.raises(InputError, match="prompts"):
        cpu_paths.quantize(pipe, "int8-static", calibration=[])
    with pytest.raises(InputError, match="never called"):
        cpu_paths.quantize(pipe, "int8-static", calibration=lambda p: None)
    with pytest.raises(InputError, match="float32 or bfloat16"):
        cpu_paths.quantize(LatentDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16),
                           "int8-static")
    assert not any(is_int8(m) for m in pipe.unet.modules())
    cpu_paths.quantize(pipe, "int8")
    with pytest.raises(UsageError, match="int8-static"):
        cpu_paths.dequantize(pipe)


def test_the_compiled_quantizer_needs_one_graph_per_dtype(monkeypatch):
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(int8, "_quantizer", [])
    inv_scale, zero_point = torch.tensor(20.0), torch.tensor(7.0)
    inputs = [torch.randn(2, 8, 6, 6), torch.randn(3, 5, 4, 4).contiguous(memory_format=torch.channels_last),
              torch.randn(7, 40), torch.randn(2, 9, 40)[:, 1:], torch.randn(5, 3, requires_grad=True)]
    with torch._dynamo.config.patch(recompile_limit=2):   # a third graph would make it fall back to eager
        for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
            with mode():
                for x in inputs:
                    for dtype in (torch.float32, torch.bfloat16):
                        q = int8.quantize_input(x.to(dtype), inv_scale, zero_point)
                        assert torch.equal(q, int8.quantize_eager(x.detach().to(dtype), inv_scale, zero_point))
    assert int8._quantizer[0] is not int8.quantize_eager      # never fell back to eager


def test_a_deep_copy_of_a_quantized_pipeline_keeps_its_int8_layers(folder):
    import copy

    pipe = cpu_paths.optimize_for_cpu(LatentDiffusionPipeline.from_pretrained(folder), keep_weights=False)
    cpu_paths.quantize(pipe, "int8-static", calibration=["a red circle"], calibration_steps=2)
    expected = run(pipe)
    twin = copy.deepcopy(pipe)
    assert sum(is_int8(m) for m in twin.unet.modules()) == sum(is_int8(m) for m in pipe.unet.modules()) > 0
    assert torch.equal(run(twin), expected) and torch.equal(run(pipe), expected)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from latentdiff.pipelines.sdxl import StableDiffusionXLPipeline
    from latentdiff.pipelines.sdxl_image import StableDiffusionXLImg2ImgPipeline
    from tests._support.sdxl_native import write_tiny_sdxl

    root = tmp_path_factory.mktemp("sdxl")
    base, refiner = write_tiny_sdxl(root / "base"), write_tiny_sdxl(root / "refiner", kind="refiner", seed=5)
    return StableDiffusionXLPipeline.from_pretrained(base), lambda: StableDiffusionXLImg2ImgPipeline.from_pretrained(
        refiner)


def refine(base, refiner, prompt: str = "a red church", steps: int = 3) -> torch.Tensor:
    common = dict(num_inference_steps=steps, progress=False, generator=torch.Generator().manual_seed(0))
    latents = base(prompt, denoising_end=0.5, output_type="latent", **common).images
    return refiner(prompt, image=latents, denoising_start=0.5, output_type="pt", **common).images


@torch.no_grad()
def test_a_refiner_is_calibrated_on_the_base_s_latents_and_its_error_bounded(sdxl):
    """refiner_calibration observes the refiner's layers on exactly what the base -> refiner hand-off feeds them
    (the ranges of the same chain written out here), and the int8 refiner's image stays within INT8_STATIC_TOL."""
    base, load_refiner = sdxl
    refiner = load_refiner()
    prompts = ["a red church", "a blue boat"]
    layers = int8.int8_candidates(refiner.unet)
    with int8.observe_input_ranges(layers) as expected:
        for prompt in prompts:
            refine(base, refiner, prompt, steps=2)
    with int8.observe_input_ranges(layers) as observed:
        cpu_paths.refiner_calibration(base, switch=0.5, prompts=prompts, steps=2)(refiner)
    assert observed == expected and len(observed) == len(layers) > 0
    reference = refine(base, refiner)
    cpu_paths.quantize(refiner, "int8-static", calibration=cpu_paths.refiner_calibration(base, switch=0.5))
    assert all(is_int8(m) for m in layers.values())
    assert 1e-4 < max_rel_error(refine(base, refiner), reference) <= INT8_STATIC_TOL
    with pytest.raises(InputError, match="calibration"):     # alone, a refiner cannot run the default calibration
        cpu_paths.quantize(load_refiner(), "int8-static")
    for bad in (0.0, 1.0, True, "0.5"):
        with pytest.raises(InputError, match="switch"):
            cpu_paths.refiner_calibration(base, switch=bad)
    with pytest.raises(InputError, match="steps"):
        cpu_paths.refiner_calibration(base, switch=0.5, steps=0)
    with pytest.raises(InputError, match="prompts"):
        cpu_paths.refiner_calibration(base, switch=0.5, prompts=[])


@torch.no_grad()
def test_a_controlnet_pipeline_is_calibrated_with_its_hints_and_its_error_bounded(folder):
    """calibration_options reach every calibration call: the int8 layers' ranges are those of the pipeline run
    on the calibration prompts with the hint (observed here on the same calls written out), not those without it
    (the ControlNet's residuals move the UNet's activations), and the controlled image stays within
    INT8_STATIC_TOL of fp32."""
    from PIL import Image

    from latentdiff import ControlNet
    from tests._support.parity import randomize_

    plain = LatentDiffusionPipeline.from_pretrained(folder)
    torch.manual_seed(0)
    net = randomize_(ControlNet.from_unet(plain.unet, conditioning_embedding_out_channels=(16, 32, 96))).eval()
    pipe = LatentDiffusionPipeline.from_pretrained(folder, controlnet=net)
    hint = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    options = dict(control_image=hint, controlnet_conditioning_scale=0.8, height=64, width=64)
    prompts = ["a red circle", "a blue square"]
    layers = int8.int8_candidates(pipe.unet)

    expected = observed_ranges(pipe, prompts, **options)
    unhinted = observed_ranges(pipe, prompts, **options | dict(controlnet_conditioning_scale=0.0))
    assert expected != unhinted                 # the hint's residuals change what the UNet's layers see
    reference = run(pipe, **options)
    assert max_rel_error(reference, run(plain)) > 0.01      # the ControlNet acts
    cpu_paths.quantize(pipe, "int8-static", calibration=prompts, calibration_steps=2, calibration_options=options)
    assert {name: layer.forward.input_range for name, layer in layers.items()} == expected
    assert 1e-4 < max_rel_error(run(pipe, **options), reference) <= INT8_STATIC_TOL
    for bad in (dict(calibration=lambda p: None), dict(calibration_options=[("height", 64)])):
        with pytest.raises(InputError, match="calibration_options"):
            cpu_paths.quantize(plain, "int8-static", **{"calibration_options": options} | bad)
    with pytest.raises(InputError, match="calibration_options"):
        cpu_paths.quantize(plain, "int8", calibration_options=options)
    assert not any(is_int8(m) for m in plain.unet.modules())
