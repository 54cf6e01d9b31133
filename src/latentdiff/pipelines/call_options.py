"""diffusers' `__call__` idioms, adapted to latentdiff's one step callback: `callback_on_step_end`, cancellation by
`pipe._interrupt`, `return_dict`, and the checks of their arguments.

    def on_step_end(pipe, i, t, callback_kwargs):     # diffusers' form, after step i
        if i == 10:
            pipe._interrupt = True                    # the remaining steps are skipped, the current latents decoded
        return callback_kwargs                        # its "latents" replaces the sample, as in diffusers

`step_callback` folds the old `callback(i, t, x[, denoised])`, `callback_on_step_end` and the interrupt check into the
one `StepCallback` the samplers call; an interrupt raises `Interrupted`, which the `denoise` stage turns into the
sample of that step. `callback_kwargs` holds the names of `callback_on_step_end_tensor_inputs` (default
["latents"]) among `CALLBACK_TENSOR_INPUTS`: "latents" the sample x after the step (in the sampler's scale, what
diffusers passes), "prompt_embeds" / "negative_prompt_embeds" the (B, L, D) embeddings, "add_text_embeds" SDXL's
pooled ones (B, P) (None elsewhere) (to read: the guidance was
built from them, so a callback that returns other embeddings is refused rather than silently ignored).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import torch

from .. import limits
from ..config import is_real
from ..diffusion.samplers.base import StepCallback, after_step
from ..errors import InputError, describe
from .base import PipelineOutput

CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds", "add_text_embeds")
# callback_on_step_end(pipe, i, t, callback_kwargs) -> callback_kwargs (diffusers' form)
CallbackOnStepEnd: TypeAlias = Callable[[Any, int, Any, dict[str, Any]], Mapping[str, Any]]


class Interrupted(Exception):  # noqa: N818  # a signal, not an error: denoise returns its sample
    """Raised after a step when the pipeline's `_interrupt` is set: `x` is the sample of that step."""

    def __init__(self, x: torch.Tensor, step: int):
        super().__init__(f"interrupted after step {step}")
        self.x, self.step = x, step


def step_callback(pipeline: Any, callback: StepCallback | None, callback_on_step_end: CallbackOnStepEnd | None,
                  tensor_inputs: Sequence[str] | None,
                  embeddings: Mapping[str, torch.Tensor | None] | None = None) -> StepCallback | None:
    """The one step callback of a `__call__`: the old `callback`, then `callback_on_step_end(pipeline, i, t,
    callback_kwargs)` (its returned dict's "latents" replaces x), then the interrupt check; None without either
    callback (nothing could set the interrupt: the loops run as before). Resets `pipeline._interrupt` (each call
    starts uninterrupted, as in diffusers)."""
    pipeline._interrupt = False
    if callback is None and callback_on_step_end is None:
        return None
    names = tuple(tensor_inputs if tensor_inputs is not None else ("latents",))
    given = dict(embeddings or {})

    def on_step(i: int, t: float, x: torch.Tensor, denoised: torch.Tensor | None = None) -> torch.Tensor:
        x = after_step(callback, x, i, t, denoised)
        if callback_on_step_end is not None:
            values = {"latents": x} | given
            returned = callback_on_step_end(pipeline, i, t, {name: values.get(name) for name in names})
            x = replaced_latents(returned, x, given)
        if pipeline._interrupt:
            raise Interrupted(x, i)
        return x

    return on_step


def replaced_latents(returned: Any, x: torch.Tensor, given: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
    """x after a callback_on_step_end returned `returned` (a dict, as diffusers requires; its "latents" replaces x)."""
    if not isinstance(returned, Mapping):
        raise InputError("callback_on_step_end must return a dict (callback_kwargs, as in diffusers)",
                         where="callback_on_step_end", expected="a dict such as {'latents': latents}",
                         found=describe(returned))
    for name, value in given.items():
        if name in returned and returned[name] is not value:
            raise InputError(f"callback_on_step_end cannot replace {name}: the guidance was built from them",
                             where="callback_on_step_end", expected=f"{name} returned unchanged (or not at all)",
                             found=describe(returned[name]))
    latents = returned.get("latents", x)
    if not isinstance(latents, torch.Tensor) or latents.shape != x.shape or latents.dtype != x.dtype:
        raise InputError("the latents callback_on_step_end returns must be like the ones it was given",
                         where="callback_on_step_end", expected=f"a {x.dtype} tensor of shape {tuple(x.shape)}",
                         found=describe(latents))
    return latents


def check_call_options(given: Mapping[str, Any]) -> None:
    """The diffusers idioms among a `__call__`'s arguments (by name; absent ones skipped)."""
    on_step_end = given.get("callback_on_step_end")
    if on_step_end is not None and not callable(on_step_end):
        raise InputError("callback_on_step_end must be callable", where="callback_on_step_end",
                         expected="callback_on_step_end(pipe, i, t, callback_kwargs) -> dict",
                         found=describe(on_step_end))
    names = given.get("callback_on_step_end_tensor_inputs")
    if names is not None and (not isinstance(names, (list, tuple))
                              or not all(isinstance(n, str) and n in CALLBACK_TENSOR_INPUTS for n in names)):
        raise InputError("unknown callback_on_step_end_tensor_inputs", where="callback_on_step_end_tensor_inputs",
                         expected=f"a list of names from {list(CALLBACK_TENSOR_INPUTS)}", found=describe(names))
    if "guidance_rescale" in given:
        rescale = given["guidance_rescale"]
        value = limits.check_finite(float(rescale) if is_real(rescale) else rescale, key="guidance_rescale",
                                    where="guidance_rescale")
        if not 0.0 <= value <= 1.0:
            raise InputError("guidance_rescale must be in [0, 1]", where="guidance_rescale",
                             expected="0 <= guidance_rescale <= 1 (0: off; diffusers suggests 0.7)", found=rescale)
    if "return_dict" in given and not isinstance(given["return_dict"], bool):
        raise InputError("return_dict must be True or False", where="return_dict", expected="bool",
                         found=describe(given["return_dict"]))


def finish(output: PipelineOutput, return_dict: bool, *, nsfw_item: bool = True) -> PipelineOutput | tuple[Any, ...]:
    """PipelineOutput, or with return_dict=False diffusers' tuple: (images, nsfw_content_detected) for the Stable
    Diffusion pipelines (latentdiff has no safety checker: None, as diffusers' is for a pipeline without one), and
    (images,) for the others (nsfw_item=False: diffusers' LDMPipeline, DiTPipeline, LDMSuperResolutionPipeline)."""
    if return_dict:
        return output
    return (output.images, None) if nsfw_item else (output.images,)
