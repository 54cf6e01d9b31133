"""The arguments the pipelines' `__call__`s share, checked once, before any model runs.

    def __call__(self, prompt=None, ..., *, guidance_scale=7.5, ...):
        check_call(self, locals())      # the first line: an InputError naming any bad argument

Each argument is checked by its name, wherever a `__call__` has it, so every pipeline refuses the same
inputs with the same message (the argument, what was expected, what was found) instead of a raw TypeError
from deep inside a stage:

| argument | accepted |
|---|---|
| `prompt`, `negative_prompt` | a string, or a list of strings (`negative_prompt`: one per prompt) |
| `guidance_scale` | a finite real number >= 0 (NaN would silently mean "no guidance") |
| `num_inference_steps` | an int in [1, `limits.MAX_STEPS`] |
| `eta` | None, or a finite real number >= 0 |
| `generator` | None, a torch.Generator, or a list of them, one per generated image |
| `output_type` | one of `OUTPUT_TYPES` |
| `latents`, `noise` | a floating-point tensor with finite values (shapes: checked where they are known) |
| `prompt_embeds`, `negative_prompt_embeds` | finite float (B, L, D) tensors of one shape, D = `cross_attention_dim` |
| `callback` | None or a callable |
| `callback_on_step_end` | None or a callable (pipe, i, t, callback_kwargs) -> dict |
| `callback_on_step_end_tensor_inputs` | a list of names from `call_options.CALLBACK_TENSOR_INPUTS` |
| `guidance_rescale` | a finite real number in [0, 1] |
| `cfg_truncation` | None, or a fraction of the steps in [0, 1] (`cfg_truncation`) |
| `return_dict` | True or False |
| `clip_skip` | None, or an int in [0, the CLIP text encoder's layers) (1: the penultimate layer, as diffusers) |

A tensor holding NaN or Inf is a `NumericalError` naming the argument (stage "input"). Sizes (height, width,
images per call) are `limits.check_pixels`'s.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .. import limits
from ..config import is_int, is_real
from ..diffusion.samplers.base import check_generator
from ..errors import InputError, describe
from ..utils.numerics import check_finite_input
from .base import OUTPUT_TYPES
from .call_options import check_call_options
from .cfg_truncation import check_cfg_truncation
from .prompt_encoding import check_prompt_syntax

TENSOR_INPUTS = ("latents", "noise", "prompt_embeds", "negative_prompt_embeds")


def check_call(pipeline: Any, arguments: Mapping[str, Any]) -> None:
    """Check the `__call__` arguments (by name: `locals()` at the top of a `__call__`) of `pipeline`; names a
    `__call__` does not have are skipped."""
    given = {name: value for name, value in arguments.items() if name != "self"}
    for name in ("prompt", "negative_prompt"):
        if given.get(name) is not None:
            check_prompt(given[name], argument=name)
    if "guidance_scale" in given:
        check_guidance_scale(given["guidance_scale"])
    if "num_inference_steps" in given:
        steps = given["num_inference_steps"]
        limits.check_count(int(steps) if is_int(steps) else steps, key="num_inference_steps", at_least=1,
                           at_most=limits.MAX_STEPS, where="num_inference_steps", error=InputError)
    if given.get("eta") is not None:
        check_eta(given["eta"])
    if "output_type" in given:
        check_output_type(given["output_type"])
    callback = given.get("callback")
    if callback is not None and not callable(callback):
        raise InputError("callback must be callable", where="callback", expected="callback(i, t, x_t, denoised)",
                         found=describe(callback))
    for name in TENSOR_INPUTS:
        if given.get(name) is not None:
            check_tensor(given[name], argument=name)
    check_embeddings(pipeline, given)
    if given.get("clip_skip") is not None:
        check_clip_skip(pipeline, given["clip_skip"])
    if "prompt_syntax" in given:
        check_prompt_syntax(given["prompt_syntax"])
    check_call_options(given)
    check_cfg_truncation(given.get("cfg_truncation"))
    check_generator_type(given.get("generator"), batch_size(given))


def check_prompt(prompt: Any, *, argument: str) -> None:
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise InputError(f"{argument} must be a string or a list of strings", where=argument,
                         expected="str | list[str]", found=describe(prompt))


def check_guidance_scale(value: Any) -> float:
    # numpy scalars are real numbers too; check_finite refuses strings, bools, None, NaN and Inf
    scale = limits.check_finite(float(value) if is_real(value) else value, key="guidance_scale",
                                where="guidance_scale")
    if scale < 0:
        raise InputError("guidance_scale must be >= 0", where="guidance_scale", expected=">= 0 (1: no guidance)",
                         found=value)
    return scale


def check_eta(value: Any) -> None:
    if not is_real(value) or not float(value) >= 0 or float(value) == float("inf"):
        raise InputError("eta must be a finite number >= 0", where="eta", expected="0 <= eta (0: DDIM, 1: DDPM-like)",
                         found=repr(value) if isinstance(value, (int, float, str)) else describe(value))


def check_output_type(value: Any) -> None:
    if not isinstance(value, str) or value not in OUTPUT_TYPES:
        raise InputError("unknown output_type", where="output_type", expected=list(OUTPUT_TYPES),
                         found=repr(value) if isinstance(value, str) else describe(value))


def check_tensor(value: Any, *, argument: str) -> None:
    """A floating-point tensor with finite values (a NumericalError naming the argument otherwise)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise InputError(f"{argument} must be a floating-point tensor", where=argument,
                         expected="a float torch.Tensor", found=describe(value))
    check_finite_input(value, argument=argument)


def check_clip_skip(pipeline: Any, value: Any) -> None:
    """clip_skip for the pipeline's text encoder (`TextEncoder.check_clip_skip`); a pipeline without a text encoder
    (class labels, layouts) has no layers to skip: an InputError naming clip_skip."""
    check = getattr(getattr(pipeline, "text_encoder", None), "check_clip_skip", None)
    if check is None:
        raise InputError(f"{type(pipeline).__name__} has no text encoder, so no layers to skip", where="clip_skip",
                         expected="clip_skip=None (it is for CLIP text encoders)", found=describe(value))
    check(value)


def check_embeddings(pipeline: Any, given: Mapping[str, Any]) -> None:
    """prompt_embeds / negative_prompt_embeds: (B, L, D), D the UNet's cross_attention_dim; both of one shape;
    one given alone (with guidance) must have the text encoder's length L, as the other side is encoded."""
    embeds = {name: given[name] for name in ("prompt_embeds", "negative_prompt_embeds") if given.get(name) is not None}
    width = getattr(getattr(getattr(pipeline, "unet", None), "config", None), "cross_attention_dim", None)
    for name, value in embeds.items():
        if value.ndim != 3:
            raise InputError(f"{name} must be (batch, tokens, width)", where=name,
                             expected=f"a 3-d tensor (B, L, {width or 'D'})", found=describe(value))
        if width is not None and value.shape[-1] != width:
            raise InputError(f"{name} has the wrong width for this UNet", where=name,
                             expected=f"width {width} (unet.config.cross_attention_dim)",
                             found=f"width {value.shape[-1]} (shape {tuple(value.shape)})")
    if len(embeds) == 2:
        cond, uncond = embeds["prompt_embeds"], embeds["negative_prompt_embeds"]
        if cond.shape != uncond.shape:
            raise InputError("negative_prompt_embeds must have the shape of prompt_embeds",
                             where="negative_prompt_embeds", expected=tuple(cond.shape), found=tuple(uncond.shape))
        return
    length = getattr(getattr(pipeline, "text_encoder", None), "max_length", None)
    guided = is_real(given.get("guidance_scale", 0)) and float(given.get("guidance_scale", 0)) > 1.0
    if len(embeds) == 1 and guided and isinstance(length, int):
        (name, value), = embeds.items()
        if value.shape[1] != length:
            other = "negative_prompt" if name == "prompt_embeds" else "prompt"
            raise InputError(f"{name} must have the text encoder's length: the {other} is encoded to it for "
                             f"guidance (or pass {other}_embeds of the same shape)", where=name,
                             expected=f"{length} tokens", found=f"{value.shape[1]} (shape {tuple(value.shape)})")


def batch_size(given: Mapping[str, Any]) -> int | None:
    """How many images the call generates, where the arguments alone tell (else None: checked later)."""
    if "batch_size" in given:
        return given["batch_size"] if is_int(given["batch_size"]) else None
    per_prompt = given.get("num_images_per_prompt", 1)
    if not is_int(per_prompt) or per_prompt < 1:
        return None
    prompt, embeds = given.get("prompt"), given.get("prompt_embeds")
    if isinstance(prompt, str):
        return per_prompt
    if isinstance(prompt, (list, tuple)):
        return len(prompt) * per_prompt
    if prompt is None and isinstance(embeds, torch.Tensor) and embeds.ndim == 3:
        return embeds.shape[0] * per_prompt
    return None


def check_generator_type(generator: Any, batch: int | None) -> None:
    """None, a torch.Generator, or a list of them (one per generated image when the batch is known)."""
    if isinstance(generator, (list, tuple)) and batch is None:
        check_generator(generator, len(generator))
    else:
        check_generator(generator, batch or 1)
