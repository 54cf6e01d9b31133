"""Previews while a pipeline denoises: each chosen step's latent decoded by a tiny autoencoder (TAESD) to images.

    preview = TinyPreview(AutoencoderTiny.from_pretrained(...), every=5, on_preview=lambda i, images: ...)
    pipe(prompt, callback=preview)                  # decodes the step's denoised prediction x0 (the clearest)
    pipe(prompt, callback_on_step_end=preview.on_step_end)   # diffusers' form: decodes callback_kwargs["latents"]

Decoding every few steps with a large first stage (SD's VAE, 84 M parameters) is expensive; TAESD (2.4 M
parameters of plain convolutions) is the cheap way to look (benchmarks/tiny_autoencoder.py measures it). A preview
never changes the sample: the callbacks return nothing (`callback`) or the kwargs unchanged (`on_step_end`). The
latest preview is kept on the object (`images`, `step`), which is what a server's progress route reads from
another thread.

The built-in model has its own (`latentdiff/shapes-64-tiny-vae`, `builtin.BUILTIN_TINY_AUTOENCODERS`), so its
previews work offline.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import InputError, describe
from .base import to_output

OnPreview = Callable[[int, list[Any]], None]   # (step index, PIL images of the batch)


@torch.no_grad()
def decode_preview(vae: Any, latents: torch.Tensor) -> list[Any]:
    """Diffusion latents (B, C, h, w) -> PIL images through `vae.decode_latents` (any first stage; a tiny one is
    the point), on the first stage's device and dtype."""
    z = latents.detach().to(device=vae.device, dtype=vae.dtype)
    return to_output(vae.decode_latents(z).float(), "pil")


class TinyPreview:
    """A step callback that decodes every `every`-th step (counted from 1) with `vae`; `on_preview(i, images)` is
    called with each preview, and the latest is kept in `images` / `step` (read under `lock`)."""

    def __init__(self, vae: Any, *, every: int = 1, on_preview: OnPreview | None = None):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise InputError("preview every must be a positive number of steps", where="every",
                             expected="an int >= 1", found=describe(every))
        if not callable(getattr(vae, "decode_latents", None)):
            raise InputError("a preview needs a first stage with decode_latents", where="vae",
                             expected="an AutoencoderTiny (or any first stage)", found=describe(vae))
        self.vae, self.every, self.on_preview = vae, every, on_preview
        self.images: list[Any] = []
        self.step: int | None = None
        self.lock = threading.Lock()

    def due(self, i: int) -> bool:
        return (i + 1) % self.every == 0

    def show(self, i: int, latents: torch.Tensor) -> list[Any]:
        """Decode `latents` as step i's preview, keep it, and hand it to `on_preview`."""
        images = decode_preview(self.vae, latents)
        with self.lock:
            self.images, self.step = images, i
        if self.on_preview is not None:
            self.on_preview(i, images)
        return images

    def __call__(self, i: int, t: float, x: torch.Tensor, denoised: torch.Tensor | None = None) -> None:
        """The pipelines' `callback(i, t, x, denoised)`: previews x0 (`denoised`), else x where a sampler gives
        no prediction."""
        if self.due(i):
            self.show(i, denoised if denoised is not None else x)

    def on_step_end(self, pipe: Any, i: int, t: Any, callback_kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
        """diffusers' `callback_on_step_end(pipe, i, t, callback_kwargs)`: previews the latents after step i (still
        noisy before the last steps, as in diffusers' TAESD previews) and returns the kwargs unchanged."""
        if self.due(i):
            self.show(i, callback_kwargs["latents"])
        return callback_kwargs

