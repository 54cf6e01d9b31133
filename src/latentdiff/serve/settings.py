"""ServeSettings: what `latentdiff serve`'s flags set, with the limits every request is checked against."""
from __future__ import annotations

import dataclasses
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"   # loopback unless told otherwise
DEFAULT_PORT = 7860          # A1111's port, so clients find it where they look
DEFAULT_MAX_BATCH = 4        # images one pipeline call makes, across requests
DEFAULT_MAX_PIXELS = 1024 * 1024 * 4   # width x height x images of one request
DEFAULT_MAX_STEPS = 150      # A1111's slider: 150
DEFAULT_MAX_SIDE = 2048      # width or height
DEFAULT_MAX_IMAGES = 64      # batch_size x n_iter of one request
DEFAULT_MAX_BODY_BYTES = 32 * 1024**2   # one request body (base64 images included)
DEFAULT_MAX_IMAGE_BYTES = 16 * 1024**2  # one decoded input image file
DEFAULT_MAX_QUEUE = 256      # requests waiting; more: 503
DEFAULT_MODEL_BUDGET_BYTES = 8 * 1024**3   # weights of the models kept loaded (LRU); the current one always is


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    model: str = "latentdiff/shapes-64"        # the model loaded at start (a built-in name, folder, Hub id, file)
    models_dir: Path | None = None             # checkpoints (single files, diffusers folders) listed by sd-models
    lora_dirs: tuple[Path, ...] = ()           # where <lora:NAME:W> finds NAME
    embeddings_dir: Path | None = None         # textual-inversion files, loaded with every model (token = stem)
    vae_dir: Path | None = None                # VAEs sd_vae can name
    controlnet_dirs: tuple[Path, ...] = ()     # ControlNets alwayson_scripts.controlnet units can name
    outputs_dir: Path | None = None            # where save_images=true writes (None: nothing is written)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_auth: tuple[tuple[str, str], ...] = ()  # (user, password) pairs; empty: no auth
    device: str | None = None                  # None: cuda if available, else cpu
    dtype: str = "float32"
    max_batch: int = DEFAULT_MAX_BATCH
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_steps: int = DEFAULT_MAX_STEPS
    max_side: int = DEFAULT_MAX_SIDE
    max_images: int = DEFAULT_MAX_IMAGES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    model_budget_bytes: int = DEFAULT_MODEL_BUDGET_BYTES
    batch_wait_s: float = 0.05                 # how long the worker waits for companions before a call
    preview_vae: str | None = None             # a tiny autoencoder (TAESD) for the live preview of the models
                                               # whose latent space it fits (None: the built-in one, if any)
    # the step switches of every model loaded (docs/fast.md): settings of its UNet, the same for every request
    deepcache: tuple[int, int] | None = None   # --deepcache N [--deepcache-branch B]: (interval, branch)
    freeu: tuple[float, float, float, float] | None = None   # --freeu S1,S2,B1,B2
    tome: float | None = None                  # --tome R: token merging, tomesd's reach (SDXL: none, a warning)
    optimize_cpu: bool = False                 # --optimize-cpu: optimize_for_cpu on every CPU model
    quantize: str | None = None                # --quantize int8 | int8-static: cpu_paths.quantize on every CPU model
