"""Helpers of the non-finite-number and argument hardening cases: a tiny text-to-image model folder (the
built-in model's layout, random weights), a copy of it with one weight set to NaN / Inf, a guard that fails
if the UNet runs, and the settings of a fast call."""
from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests._support.tiny_builtin import make_tiny_shapes_model

# 16 x 16 images: 4 x 4 latents with the tiny model's f = 4; two steps; a few ms per call.
FAST = dict(num_inference_steps=2, height=16, width=16, progress=False)
PROMPT = "a red circle"
# the part's subfolder and weights file in the folder, and the key to poison
PARTS = {"unet": ("unet", "diffusion_pytorch_model.safetensors", "conv_in.weight"),
         "vae": ("vqvae", "diffusion_pytorch_model.safetensors", "decoder.conv_in.weight"),
         "text_encoder": ("bert", "model.safetensors", "model.layers.0.fc1.weight")}


def tiny_text_model(folder: Path) -> Path:
    """The tiny text-to-image folder (LDMBert, KL f = 4, cross-attention UNet, DDIM)."""
    return make_tiny_shapes_model(Path(folder))


def poisoned_copy(source: Path, dest: Path, part: str, value: float = float("nan")) -> tuple[Path, str]:
    """A copy of the model folder whose `part` ("unet", "vae", "text_encoder") has one weight set to `value`;
    -> (folder, the key in the part's weights file)."""
    shutil.copytree(source, dest)
    subfolder, name, key = PARTS[part]
    path = dest / subfolder / name
    state = load_file(path)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    save_file(state, path, metadata={"format": "pt"})
    return dest, key


@contextlib.contextmanager
def no_unet_calls(pipe) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Fail the test if the pipeline's UNet runs inside the block (errors come before any heavy work)."""
    def refuse(*_args):  # type: ignore[no-untyped-def]
        raise AssertionError("the UNet ran before the argument was refused")

    handle = pipe.unet.register_forward_pre_hook(refuse)
    try:
        yield
    finally:
        handle.remove()


def latent_shape(batch: int = 1) -> tuple[int, int, int, int]:
    """x_T of a FAST call: (batch, 4, 4, 4)."""
    return (batch, 4, FAST["height"] // 4, FAST["width"] // 4)


def nan_tensor(*shape: int) -> torch.Tensor:
    x = torch.randn(*shape)
    x.view(-1)[1] = float("nan")
    return x
