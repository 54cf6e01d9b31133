"""Classifier-free guidance (Ho & Salimans 2021) as a wrapper that returns a new `denoise(x_t, t)`.

    denoise = classifier_free_guidance(unet, context=cond, uncond_context=uncond, guidance_scale=7.5)
    x_0 = sampler.sample(denoise, x_T, noise_scheduler, 50)

The sampler never knows that guidance happens: it calls `denoise(x_t, t)` as for any model. The
wrapper runs the model once on the doubled batch cat([x, x]) with contexts cat([uncond, cond]) and
combines the two halves:

    pred = pred_uncond + s (pred_cond - pred_uncond)                 (Ho & Salimans 2021, eq. 6)

optionally followed by the rescale of Lin et al. 2023 (sec. 3.4, eqs. 15-16), which keeps the
per-sample standard deviation of the guided prediction near the conditional one:

    pred = phi * pred * std(pred_cond) / std(pred) + (1 - phi) * pred

s = 1 (or no unconditional context) is exactly the conditional model: one forward of batch B.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..config import is_real
from ..errors import ConfigError, InputError, describe
from .samplers.base import Denoiser

Model = Callable[..., torch.Tensor]


def combine_guidance(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, guidance_scale: float, *,
                     guidance_rescale: float = 0.0) -> torch.Tensor:
    """pred_uncond + s (pred_cond - pred_uncond), then the optional std rescale. Both (B, C, H, W)."""
    guided = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
    if guidance_rescale > 0:
        dims = tuple(range(1, pred_cond.ndim))
        std_cond = pred_cond.std(dim=dims, keepdim=True)
        std_guided = guided.std(dim=dims, keepdim=True)
        guided = guidance_rescale * (guided * (std_cond / std_guided)) + (1 - guidance_rescale) * guided
    return guided


def classifier_free_guidance(model: Model, *, context: torch.Tensor, uncond_context: torch.Tensor | None = None,
                             guidance_scale: float, guidance_rescale: float = 0.0,
                             **model_kwargs: Any) -> Denoiser:
    """Wrap `model(x, t, context=..., **model_kwargs)` (e.g. the UNet) into a guided `denoise(x_t, t)`.

    context, uncond_context: (B, L, D) text embeddings, one row per sample of x_t (B, C, H, W).
    `model_kwargs` are passed unchanged to every call, so tensors among them must already match the
    batch the model sees (2B with guidance). t is passed through as given (a 0-d tensor broadcasts).
    """
    _check_scale(guidance_scale, guidance_rescale)
    if not isinstance(context, torch.Tensor):
        raise InputError("context must be a tensor (B, L, D)", where="context", expected="torch.Tensor",
                         found=describe(context))
    if uncond_context is None or guidance_scale == 1.0:
        def denoise_conditional(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            _check_batch(x_t, context.shape[0])
            return model(x_t, t, context=context, **model_kwargs)

        return denoise_conditional

    if tuple(uncond_context.shape) != tuple(context.shape):
        raise InputError("uncond_context must have the shape of context", where="uncond_context",
                         expected=tuple(context.shape), found=tuple(uncond_context.shape))
    both = torch.cat([uncond_context, context])   # built once, not at every step

    def denoise_guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_batch(x_t, context.shape[0])
        if isinstance(t, torch.Tensor) and t.ndim == 1:
            t = torch.cat([t, t])
        pred_uncond, pred_cond = model(torch.cat([x_t, x_t]), t, context=both, **model_kwargs).chunk(2)
        return combine_guidance(pred_uncond, pred_cond, guidance_scale, guidance_rescale=guidance_rescale)

    return denoise_guided


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierFreeGuidance:
    """Guidance settings as a value:

        denoise = ClassifierFreeGuidance(guidance_scale=7.5).wrap(unet, context=cond, uncond_context=uncond)
    """

    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0      # phi of Lin et al. 2023; 0.7 is their recommendation for zero-SNR models

    def __post_init__(self) -> None:
        _check_scale(self.guidance_scale, self.guidance_rescale, error=ConfigError)

    @property
    def needs_uncond(self) -> bool:
        """Whether an unconditional context is used at all (s != 1)."""
        return self.guidance_scale != 1.0

    def wrap(self, model: Model, *, context: torch.Tensor, uncond_context: torch.Tensor | None = None,
             **model_kwargs: Any) -> Denoiser:
        return classifier_free_guidance(model, context=context, uncond_context=uncond_context,
                                        guidance_scale=self.guidance_scale, guidance_rescale=self.guidance_rescale,
                                        **model_kwargs)

    def combine(self, pred_uncond: torch.Tensor, pred_cond: torch.Tensor) -> torch.Tensor:
        return combine_guidance(pred_uncond, pred_cond, self.guidance_scale, guidance_rescale=self.guidance_rescale)


def _check_scale(guidance_scale: float, guidance_rescale: float, *, error: type = InputError) -> None:
    if not is_real(guidance_scale) or guidance_scale < 0:
        raise error("guidance_scale must be a number >= 0", where="guidance_scale", expected=">= 0",
                    found=repr(guidance_scale))
    if not is_real(guidance_rescale) or not 0 <= guidance_rescale <= 1:
        raise error("guidance_rescale must lie in [0, 1]", where="guidance_rescale", expected="0 <= phi <= 1",
                    found=repr(guidance_rescale))


def _check_batch(x_t: torch.Tensor, batch: int) -> None:
    if x_t.shape[0] != batch:
        raise InputError("the sample batch must match the context batch (one context row per sample)",
                         where="x_t", expected=f"batch {batch}", found=f"batch {x_t.shape[0]}")
