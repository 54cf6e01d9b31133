"""Non-finite numbers never pass silently (issue 14): NaN / Inf weights, latents, prompt embeddings and guidance
scales, and fp16 overflow, are a latentdiff error naming the stage (and step, argument or weight) with a hint,
never a black or NaN image. The fp16 first stage's fp32 retry still runs first."""
from __future__ import annotations

import warnings

import pytest
import torch

from latentdiff import LatentDiffusionPipeline, UNet2DConditional
from latentdiff.cli import main
from latentdiff.errors import InputError, NumericalError
from tests._support.numerics import (
    FAST,
    PROMPT,
    latent_shape,
    nan_tensor,
    no_unet_calls,
    poisoned_copy,
    tiny_text_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster
clear = pytest.mark.outcome("clear_error", fails_as="unclear")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_text_model(tmp_path_factory.mktemp("numerics") / "tiny")


@pytest.fixture(scope="module")
def pipe(model):
    return LatentDiffusionPipeline.from_pretrained(model)


@pytest.fixture(scope="module")
def poisoned(model, tmp_path_factory):
    """part -> (folder whose part has one NaN weight, the key)."""
    root = tmp_path_factory.mktemp("poisoned")
    return {part: poisoned_copy(model, root / part, part) for part in ("unet", "vae", "text_encoder")}


def assert_numerical(error: NumericalError, *, stage: str, hint: str) -> None:
    assert error.stage == stage and stage in str(error)
    assert error.hint and hint in error.hint


# ---- guidance_scale -------------------------------------------------------------------------------------------
@clear
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_guidance_scale_is_refused_before_any_unet_call(pipe, scale):
    with no_unet_calls(pipe), pytest.raises(InputError, match="guidance_scale must be finite") as info:
        pipe(PROMPT, guidance_scale=scale, **FAST)
    assert info.value.where == "guidance_scale" and str(scale) in str(info.value)


@clear
def test_huge_guidance_scale_overflows_to_a_numerical_error_after_denoising(pipe):
    """1e30 is finite, but guidance multiplies it in: Inf, then NaN latents, caught once after the loop."""
    with pytest.raises(NumericalError) as info:
        pipe(PROMPT, guidance_scale=1e30, **FAST)
    assert_numerical(info.value, stage="denoising", hint="guidance_scale")
    assert info.value.step == 2 and "after step 2 of 2" in str(info.value)


# ---- NaN inputs: named before any work ----------------------------------------------------------------------
@clear
def test_nan_latents_are_named_before_any_unet_call(pipe):
    with no_unet_calls(pipe), pytest.raises(NumericalError) as info:
        pipe(PROMPT, latents=nan_tensor(*latent_shape()), **FAST)
    assert_numerical(info.value, stage="input", hint="latents")
    assert info.value.where == "latents" and "1 NaN" in str(info.value)


@clear
@pytest.mark.parametrize("name", ["prompt_embeds", "negative_prompt_embeds"])
def test_inf_prompt_embeddings_are_named_before_any_unet_call(pipe, name):
    good = pipe.text_encoder([PROMPT])
    bad = good.clone()
    bad[0, 0, 0] = float("inf")
    embeds = {"prompt_embeds": good, "negative_prompt_embeds": good} | {name: bad}
    with no_unet_calls(pipe), pytest.raises(NumericalError) as info:
        pipe(**embeds, **FAST)
    assert info.value.where == name and "1 Inf" in str(info.value) and info.value.stage == "input"


# ---- NaN weights: caught at the stage they spoil, named by the opt-in load check -----------------------------
@clear
@pytest.mark.parametrize("part,stage", [("unet", "denoising"), ("vae", "decode"), ("text_encoder", "text encoding")])
def test_nan_weights_give_a_numerical_error_at_their_stage(poisoned, part, stage):
    folder, _ = poisoned[part]
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    with pytest.raises(NumericalError) as info:
        pipe(PROMPT, **FAST)
    assert_numerical(info.value, stage=stage, hint="check_finite_weights=True")
    assert "fp16" not in info.value.hint   # an fp32 pipeline: overflow is not the likely cause


@clear
@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_check_finite_weights_names_the_part_and_the_first_bad_key(poisoned, part):
    folder, key = poisoned[part]
    with pytest.raises(NumericalError) as info:
        LatentDiffusionPipeline.from_pretrained(folder, check_finite_weights=True)
    assert info.value.stage == "load" and f"{part}." in info.value.where and key in info.value.where
    assert str(folder) in info.value.where and "1 NaN" in str(info.value)


@clear
def test_model_from_pretrained_check_finite_weights(model, tmp_path):
    folder, key = poisoned_copy(model, tmp_path / "inf", "unet", value=float("inf"))
    UNet2DConditional.from_pretrained(folder, subfolder="unet")   # off by default: loads
    with pytest.raises(NumericalError) as info:
        UNet2DConditional.from_pretrained(folder, subfolder="unet", check_finite_weights=True)
    assert info.value.where.endswith(f"unet.{key}") and "1 Inf" in str(info.value)


@clear
def test_single_file_check_finite_weights(pipe, tmp_path):
    unet = UNet2DConditional(pipe.unet.config)
    unet.load_state_dict(pipe.unet.state_dict())
    with torch.no_grad():
        unet.conv_out.bias[0] = float("nan")
    path = unet.save_single_file(tmp_path / "unet.safetensors")
    with pytest.raises(NumericalError) as info:
        UNet2DConditional.from_single_file(path, check_finite_weights=True)
    assert info.value.stage == "load" and "conv_out.bias" in info.value.where and str(path) in info.value.where


@clear
def test_pipeline_from_single_file_check_finite_weights(model, tmp_path):
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias[0] = float("inf")
    path = pipe.save_single_file(tmp_path / "model.safetensors")
    with pytest.raises(NumericalError) as info:
        LatentDiffusionPipeline.from_single_file(path, check_finite_weights=True, tokenizer=str(model / "tokenizer"))
    assert info.value.where == f"{path}: vae.decoder.conv_out.bias" and "1 Inf" in str(info.value)


@pytest.mark.outcome("correct")
def test_finite_weights_pass_the_check_and_generate(model):
    pipe = LatentDiffusionPipeline.from_pretrained(model, check_finite_weights=True)
    images = pipe(PROMPT, output_type="pt", **FAST).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


# ---- fp16 -------------------------------------------------------------------------------------------------------
@pytest.fixture
def half_pipe(model):
    return LatentDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float16)


@clear
def test_fp16_overflow_in_the_unet_names_the_fp16_hint(half_pipe):
    """A UNet whose fp16 activations overflow (simulated: its output becomes Inf at the last step)."""
    calls = []

    def overflow(_module, _inputs, output):  # type: ignore[no-untyped-def]
        calls.append(1)
        return output * float("inf") if len(calls) == FAST["num_inference_steps"] else output

    handle = half_pipe.unet.register_forward_hook(overflow)
    try:
        with pytest.raises(NumericalError) as info:
            half_pipe(PROMPT, **FAST)
    finally:
        handle.remove()
    assert_numerical(info.value, stage="denoising", hint="fp16 overflow")
    assert "torch.bfloat16" in info.value.hint and "after step 2 of 2" in str(info.value)


@pytest.mark.outcome("correct")
def test_fp16_first_stage_retry_runs_before_any_numerical_error(half_pipe):
    """The fp16 VAE safety net stays: a decoder that overflows only in fp16 is decoded again in fp32."""
    def overflow_in_half(_module, _inputs, output):  # type: ignore[no-untyped-def]
        return output * 1e6 if output.dtype == torch.float16 else output   # 65504 is fp16's largest

    handle = half_pipe.vae.decoder.conv_in.register_forward_hook(overflow_in_half)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            images = half_pipe(PROMPT, output_type="pt", **FAST).images
    finally:
        handle.remove()
    assert any("decoding again in float32" in str(w.message) for w in caught)
    assert torch.isfinite(images).all()


# ---- the command line -------------------------------------------------------------------------------------------
@clear
def test_cli_generate_prints_the_numerical_error_and_its_hint(poisoned, tmp_path, capsys):
    folder, _ = poisoned["unet"]
    code = main(["generate", PROMPT, "--model", str(folder), "--steps", "2", "--height", "16", "--width", "16",
                 "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not (tmp_path / "out.png").exists()
    assert "Traceback" not in "\n".join(err)
    errors = [line for line in err if "error:" in line]
    hints = [line for line in err if line.startswith("hint:")]
    assert len(errors) == 1 and "denoising produced NaN or Inf" in errors[0]
    assert len(hints) == 1 and "check_finite_weights=True" in hints[0]
