"""Attention slicing, CPU offload, torch.compile and bfloat16 on the CPU (pipelines/acceleration.py).

What is proven:
* attention over query chunks equals one SDPA call to 1e-6 (fp32), by fixed chunk size and by byte budget,
  in the function, in both attention layers, and through a whole pipeline;
* model and sequential CPU offload through accelerate hooks give the same images as no offload (execution
  device "cpu" here; the CUDA versions run where CUDA is), each network loaded when it runs, in order;
* `pipe.compile()` (inductor, fullgraph, static shapes) gives the eager images within 1e-5, and a new prompt
  and seed reuse the compiled graph (no recompilation);
* a pipeline loaded with torch_dtype=torch.bfloat16 runs on the CPU in bf16 and stays within a stated
  tolerance of fp32 (BF16_TOL, relative to the fp32 maximum; bf16 keeps 8 significant bits).
"""
from __future__ import annotations

import pytest
import torch

from latentdiff import ImageToImagePipeline, LatentDiffusionPipeline, UNet2DConditional
from latentdiff.errors import InputError
from latentdiff.layers.attention import Attention, SpatialSelfAttention, attention, query_chunk
from latentdiff.models.unet import UNetConfig
from tests._support.parity import max_rel_error
from tests._support.tiny_builtin import make_tiny_shapes_model

PROMPT = "a red circle"
ATTENTION_TOL = 1e-6
COMPILE_TOL = 1e-5
# bf16 rounds every op to 8 significant bits (2^-8 = 0.4%); over a 4-step run of the tiny random-weight model
# the latents and images land 2-4% (of the fp32 maximum) away from fp32.
BF16_TOL = 0.06
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_shapes_model(tmp_path_factory.mktemp("accel") / "shapes-64")


@pytest.fixture
def pipe(folder) -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline.from_pretrained(folder)


def run(pipe, prompt: str = PROMPT, seed: int = 0, **options) -> torch.Tensor:
    options = dict(num_inference_steps=2, guidance_scale=3.0, output_type="pt", progress=False) | options
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **options).images


# ---- attention slicing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("upcast", [False, True])
def test_chunked_attention_equals_one_call(chunk_size, upcast):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 4 * 16, generator=g) for n in (100, 77, 77))
    full = attention(q, k, v, 4, upcast=upcast)
    assert max_rel_error(attention(q, k, v, 4, upcast=upcast, chunk_size=chunk_size), full) <= ATTENTION_TOL


def test_byte_budget_chunks_only_calls_that_exceed_it():
    # (B h) = 8 score matrices of 100 x 77 fp32 = 246,400 bytes
    assert query_chunk(8, 100, 77, 4, chunk_size=None, max_bytes=10**6) == 100
    assert query_chunk(8, 100, 77, 4, chunk_size=None, max_bytes=50_000) == 50_000 // (8 * 77 * 4)
    assert query_chunk(8, 100, 77, 4, chunk_size=None, max_bytes=1) == 1
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 100, 64, generator=g) for _ in range(3))
    assert max_rel_error(attention(q, k, v, 4, max_bytes=50_000), attention(q, k, v, 4)) <= ATTENTION_TOL


def test_attention_layers_and_a_pipeline_slice_to_the_same_result(pipe):
    torch.manual_seed(0)
    layers = [(Attention(32, context_dim=24, heads=2, dim_head=16), (torch.randn(2, 50, 32), torch.randn(2, 9, 24))),
              (SpatialSelfAttention(32, groups=8), (torch.randn(2, 32, 7, 9),))]
    with torch.no_grad():
        for layer, inputs in layers:
            full = layer(*inputs)
            layer.chunk_size = 5
            assert max_rel_error(layer(*inputs), full) <= ATTENTION_TOL
    plain = run(pipe, output_type="latent")
    pipe.enable_attention_slicing(3)
    assert {m.chunk_size for m in pipe.unet.modules() if isinstance(m, Attention)} == {3}
    assert max_rel_error(run(pipe, output_type="latent"), plain) <= ATTENTION_TOL
    pipe.enable_attention_slicing("auto", max_bytes=1024)
    assert max_rel_error(run(pipe, output_type="latent"), plain) <= ATTENTION_TOL
    pipe.disable_attention_slicing()
    assert not any(m.chunk_size or m.max_bytes for m in pipe.unet.modules() if isinstance(m, Attention))
    with pytest.raises(InputError):
        pipe.enable_attention_slicing(0)


# ---- CPU offload through accelerate hooks ----------------------------------------------------------------
def record_loads(pipe) -> list[str]:
    """The networks the offload moves onto the execution device, in order, by attribute name."""
    offload, names, loads = pipe.__dict__["_offload"], {id(m): n for n, m in vars(pipe).items()}, []
    load = offload.load

    def spy(module):
        loads.append(names[id(module)])
        load(module)

    offload.load = spy
    return loads


def test_model_offload_loads_each_network_when_it_runs(pipe):
    reference = run(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    loads = record_loads(pipe)
    assert torch.equal(run(pipe), reference)
    # one load per call of a network; the UNet stays resident over the steps
    assert [n for i, n in enumerate(loads) if i == 0 or loads[i - 1] != n] == ["text_encoder", "unet", "vae"]
    assert pipe.__dict__["_offload"].resident is pipe.vae
    img2img = ImageToImagePipeline(vae=pipe.vae, unet=pipe.unet, text_encoder=pipe.text_encoder)
    img2img.enable_model_cpu_offload(device="cpu")
    loads = record_loads(img2img)
    img2img(PROMPT, image=reference, strength=0.5, num_inference_steps=2, progress=False, output_type="pt")
    assert [n for i, n in enumerate(loads) if i == 0 or loads[i - 1] != n] == ["text_encoder", "vae", "unet", "vae"]
    pipe.disable_cpu_offload()
    assert not hasattr(pipe.unet, "_hf_hook") and "decode_latents" not in vars(pipe.vae)
    assert torch.equal(run(pipe), reference)


def test_sequential_offload_keeps_weights_off_the_device(pipe):
    reference = run(pipe)
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert {p.device.type for p in pipe.unet.parameters()} == {"meta"}    # weights live in the hooks' CPU map
    assert pipe.device == torch.device("cpu")
    assert torch.equal(run(pipe), reference)
    pipe.disable_cpu_offload()
    assert {p.device.type for p in pipe.unet.parameters()} == {"cpu"}
    assert torch.equal(run(pipe), reference)


def test_offload_without_an_accelerator_needs_a_device(pipe, monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    with pytest.raises(InputError) as info:
        pipe.enable_model_cpu_offload()
    assert info.value.where == "device"


def test_offload_and_compile_exclude_each_other(pipe):
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(InputError):
        pipe.compile()
    pipe.disable_cpu_offload()
    pipe.compile(backend="eager")
    with pytest.raises(InputError):
        pipe.enable_sequential_cpu_offload(device="cpu")


# ---- torch.compile -------------------------------------------------------------------------------------------
def test_compile_traces_one_full_graph_reused_across_prompts_and_seeds(pipe):
    """fullgraph=True fails on any graph break; the counter sees every (re)compilation."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    eager = [run(pipe, "a red circle", 0, output_type="latent"), run(pipe, "a blue square", 1, output_type="latent")]
    counter = CompileCounterWithBackend("eager")
    pipe.compile(backend=counter)
    compiled = [run(pipe, "a red circle", 0, output_type="latent"), run(pipe, "a blue square", 1, output_type="latent")]
    assert counter.frame_count == 1
    for got, expected in zip(compiled, eager, strict=True):
        assert max_rel_error(got, expected) <= COMPILE_TOL


@pytest.mark.slow
def test_compiled_pipeline_matches_eager(pipe):
    """Inductor on the CPU (C++ kernels, g++): ~100 s the first time on 2 busy cores, ~10 s from inductor's
    on-disk cache. The UNet is one level wide to keep the kernel count down."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    unet = UNet2DConditional(UNetConfig(in_channels=4, out_channels=4, sample_size=16, channels=(8,),
                                        attention_levels=(True,), attention_heads=2, layers_per_level=1,
                                        norm_num_groups=8, cross_attention_dim=32, mid_block="none")).eval()
    pipe = LatentDiffusionPipeline(vae=pipe.vae, unet=unet, text_encoder=pipe.text_encoder)
    torch._dynamo.reset()
    eager = [run(pipe, "a red circle", 0), run(pipe, "a blue square", 1)]
    counter = CompileCounterWithBackend("inductor")
    pipe.compile(backend=counter)
    compiled = [run(pipe, "a red circle", 0), run(pipe, "a blue square", 1)]
    assert counter.frame_count == 1
    for got, expected in zip(compiled, eager, strict=True):
        assert max_rel_error(got, expected) <= COMPILE_TOL


# ---- bfloat16 on the CPU ---------------------------------------------------------------------------------
def test_bfloat16_pipeline_stays_near_float32(pipe, folder):
    half = LatentDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert {p.dtype for net in half.networks() for p in net.parameters()} == {torch.bfloat16}
    for seed in (0, 1):
        options = dict(num_inference_steps=4, seed=seed)
        latents = run(half, output_type="latent", **options)
        assert latents.dtype == torch.bfloat16
        assert max_rel_error(latents.float(), run(pipe, output_type="latent", **options)) <= BF16_TOL
        assert max_rel_error(run(half, **options), run(pipe, **options)) <= BF16_TOL


# ---- CUDA --------------------------------------------------------------------------------------------------
@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_cuda_offload_matches_the_pipeline_on_the_gpu(pipe, mode):
    reference = run(pipe.to("cuda"))
    pipe.to("cpu")
    getattr(pipe, f"enable_{mode}_cpu_offload")()              # device=None: the current accelerator
    assert pipe.device.type == "cuda"
    assert max_rel_error(run(pipe), reference) <= 1e-5
    if mode == "model":   # the autoencoder ran last and is the only network on the GPU
        assert pipe.vae.device.type == "cuda" and pipe.unet.device.type == "cpu"
    else:
        assert {p.device.type for p in pipe.unet.parameters()} == {"meta"}
    pipe.disable_cpu_offload()


def test_compile_mode_auto_means_cuda_graphs_on_cuda_only(pipe, monkeypatch):
    """pipe.compile() with no mode: torch.compile's default on the CPU, "reduce-overhead" (a CUDA-graph replay of
    each step) on CUDA; an explicit mode is passed through."""
    modes = []

    def fake_compile(fn, *, mode=None, **kwargs):
        modes.append(mode)
        return lambda *a, **k: fn(*a, **k)

    monkeypatch.setattr(torch, "compile", fake_compile)
    pipe.compile()
    monkeypatch.setattr(type(pipe.unet), "device", property(lambda self: torch.device("cuda")))
    pipe.compile()
    pipe.compile(mode="max-autotune-no-cudagraphs")
    pipe.compile(backend="eager")
    assert modes == [None, "reduce-overhead", "max-autotune-no-cudagraphs", None]


@cuda
@pytest.mark.cuda
def test_cuda_graph_compile_matches_eager(pipe, monkeypatch):
    """pipe.compile() on CUDA (mode "auto": CUDA graphs) gives the eager latents, and a new prompt and seed
    replay the same graph (error_on_recompile). TF32 is off for both: with it, eager and compiled convolutions
    (other cuDNN algorithms and layouts) differ at TF32's ~1e-3, not at fp32's rounding."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    pipe.to("cuda")
    torch._dynamo.reset()
    eager = [run(pipe, "a red circle", 0, output_type="latent"), run(pipe, "a blue square", 1, output_type="latent")]
    pipe.compile()
    compiled = [run(pipe, "a red circle", 0, output_type="latent")]
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    compiled.append(run(pipe, "a blue square", 1, output_type="latent"))
    errors = [max_rel_error(got, expected) for got, expected in zip(compiled, eager, strict=True)]
    assert max(errors) <= 1e-4, f"compiled vs eager latents: {errors}"
