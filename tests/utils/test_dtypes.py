"""torch_dtype="auto": the resolver's branches (CPU with and without native bf16, the error bound, CUDA), the
loaders that take "auto", and `latentdiff generate`'s choice printed with its reason."""
from __future__ import annotations

import pytest
import torch

from latentdiff.errors import InputError
from latentdiff.utils import dtypes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_dtype_or_none_passes_through():
    assert dtypes.resolve_torch_dtype(torch.float16, device="cpu") == (torch.float16, "as given")
    assert dtypes.resolve_torch_dtype(None) == (None, "as given")
    with pytest.raises(InputError, match="torch_dtype"):
        dtypes.resolve_torch_dtype("bf16")


def test_cpu_with_native_bf16_gets_bf16_and_without_it_float32():
    dtype, reason = dtypes.resolve_torch_dtype("auto", device="cpu", native_bf16=lambda: "amx_bf16")
    assert dtype is torch.bfloat16 and "amx_bf16" in reason
    dtype, reason = dtypes.resolve_torch_dtype("auto", device=None, native_bf16=lambda: None)
    assert dtype is torch.float32 and "no native bf16" in reason


def test_a_family_over_the_bound_stays_float32(monkeypatch):
    monkeypatch.setitem(dtypes.BF16_IMAGE_ERROR, "noisy", dtypes.BF16_ERROR_BOUND * 2)
    dtype, reason = dtypes.resolve_torch_dtype("auto", device="cpu", model="noisy", native_bf16=lambda: "amx_bf16")
    assert dtype is torch.float32 and "exceeds" in reason
    # an unknown model is judged by the worst family measured: now "noisy"
    assert dtypes.resolve_torch_dtype("auto", model="/some/folder", native_bf16=lambda: "amx_bf16")[0] is torch.float32
    monkeypatch.delitem(dtypes.BF16_IMAGE_ERROR, "noisy")
    assert dtypes.resolve_torch_dtype("auto", model="/some/folder", native_bf16=lambda: "amx_bf16")[0] is torch.bfloat16


def test_cuda_prefers_bf16_else_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dtypes.resolve_torch_dtype("auto", device="cuda")[0] is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dtypes.resolve_torch_dtype("auto", device="cuda")[0] is torch.float16


def test_cpu_detection_reads_the_flags_and_the_environment(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert dtypes.cpu_flags(info) >= {"avx512f", "avx512_bf16"}
    assert dtypes.cpu_flags(tmp_path / "absent") == set()
    monkeypatch.delenv(dtypes.BF16_ENV, raising=False)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert dtypes.cpu_native_bf16(lambda: dtypes.cpu_flags(info)) == "avx512_bf16"
    assert dtypes.cpu_native_bf16(lambda: {"avx2"}) is None
    monkeypatch.setenv(dtypes.BF16_ENV, "1")
    assert dtypes.cpu_native_bf16(lambda: set()) == f"{dtypes.BF16_ENV}=1"
    monkeypatch.setenv(dtypes.BF16_ENV, "0")
    assert dtypes.cpu_native_bf16(lambda: {"amx_bf16"}) is None


def test_loaders_take_auto(tmp_path, monkeypatch):
    from latentdiff import LatentDiffusionPipeline, UNet2DConditional

    monkeypatch.setattr(dtypes, "cpu_native_bf16", lambda: "amx_bf16")
    pipe = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64", torch_dtype="auto")
    assert pipe.unet.dtype is torch.bfloat16
    pipe.unet.save_pretrained(tmp_path / "unet")
    monkeypatch.setattr(dtypes, "cpu_native_bf16", lambda: None)
    assert UNet2DConditional.from_pretrained(tmp_path / "unet", torch_dtype="auto").dtype is torch.float32
    with pytest.raises(InputError, match="torch_dtype"):
        UNet2DConditional.from_pretrained(tmp_path / "unet", torch_dtype="fast")


def test_generate_prints_the_dtype_it_chose_and_records_it(monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants

    from latentdiff.cli import main
    from latentdiff.utils.images import read_png_params
    from tests._support.tiny_builtin import make_tiny_shapes_model, use_as_builtin

    model = make_tiny_shapes_model(tmp_path / "shapes-64", settings={"num_inference_steps": 1, "height": 64,
                                                                     "width": 64, "sampler": "ddim"})
    use_as_builtin(monkeypatch, model, "latentdiff/shapes-64")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)
    for forced, name in (("1", "bfloat16"), ("0", "float32")):
        monkeypatch.setenv(dtypes.BF16_ENV, forced)
        assert main(["generate", "a red circle", "-o", f"{name}.png", "--device", "cpu"]) == 0
        assert (f"--dtype auto -> {name}" in capsys.readouterr().err) == (name == "bfloat16")   # float32: unsaid
        assert read_png_params(f"{name}.png")["dtype"] == name   # --from repeats the dtype used
    assert main(["generate", "a red circle", "-o", "given.png", "--dtype", "bf16"]) == 0
    assert "--dtype auto" not in capsys.readouterr().err
