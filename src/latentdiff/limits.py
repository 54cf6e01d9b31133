"""Bounds on every size a file, a config, a request or a command line can set, checked before anything is built
or allocated: a few bytes of input must never cost gigabytes or hours.

The bounds are far above any real model (SD 1.x-3, SDXL, the LDM family use at most 4 resnets per level and
1000 training steps) and far below what a machine can hold. Where a caller has a real need beyond one, the call
that checks it takes a keyword to raise it (`max_pixels=` on a pipeline call); the rest are constants here, in
one place, so the docs (docs/limits.md) list them once.
"""
from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError, InputError

# ---- model structure (config.json, original YAML, single-file metadata) ---------------------------------------
MAX_LAYERS_PER_LEVEL = 64          # resnets per resolution level (layers_per_block, num_res_blocks); real: 1-4
MAX_LEVELS = 16                    # resolution levels (block_out_channels, ch_mult); real: 2-5
MAX_CHANNELS = 65_536              # one layer's width (model_channels x mult, block_out_channels); real: <= 2560
MAX_TRANSFORMER_DEPTH = 64         # transformer blocks per attention (SDXL: 10)
MAX_HEADS = 1024
MAX_TEXT_LAYERS = 256              # text encoder layers (CLIP: 12-32)
MAX_VOCAB = 4_000_000
MAX_TEXT_LENGTH = 8192             # max_position_embeddings
MAX_TRAIN_TIMESTEPS = 100_000      # num_train_timesteps (everything published: 1000)
MAX_PARAMETERS = 20_000_000_000    # a parameter-count estimate of the model a config describes (SDXL UNet: 2.6e9)
MAX_CONFIG_DEPTH = 64              # nesting of a JSON / YAML config

# ---- generation (API, CLI, --from PNG values, latentdiff_generate.json, HTTP requests) -----------------------------
MAX_SIDE = 16_384                  # height or width in pixels
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # height x width x images per call; `max_pixels=` raises it
MAX_STEPS = 10_000                 # sampling steps
MAX_IMAGES_PER_PROMPT = 1024
MAX_INFOTEXT_CHARS = 65_536        # an A1111 "parameters" text read back (PNG chunk, EXIF UserComment); real: < 4 KB
MAX_THREADS = 4096                 # torch threads (`latentdiff generate --threads`)
MAX_HIRES_SCALE = 8                # hires fix: the second pass's size / the first's (A1111's slider: 1-4)
MAX_EMBEDDING_VECTORS = 75         # vectors of one textual-inversion embedding (a prompt chunk: 75 tokens)
MAX_EMBEDDING_WIDTH = 8192         # an embedding vector's width (CLIP-L 768, OpenCLIP-G 1280)
MAX_EMBEDDING_FILE_BYTES = 64 * 1024**2  # an embedding file (real: a few KB; A1111 .pt with extras: < 1 MB)
MAX_EMBEDDING_FILES = 64           # `latentdiff generate --embedding` files of one run
MAX_PROMPT_CHUNKS = 32             # A1111 syntax: 75-token chunks per prompt (2,400 tokens); A1111: none, real: < 10
MAX_PROMPT_NESTING = 64            # A1111 syntax: bracket depth prompt editing follows; deeper: used as written

# ---- data (eval folders / .npy / images) -------------------------------------------------------------------------
MAX_ARRAY_BYTES = 8 * 1024**3      # one .npy array read by `latentdiff eval`
MAX_IMAGE_PIXELS = 178_956_970     # PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS), kept on
MAX_XMP_BYTES = 1024 * 1024        # an image's XMP packet read for latentdiff's parameters (PIL's PNG text chunk bound)
MAX_FEATURE_DIM = 8192             # width D of FID statistics (mu (D,), sigma (D, D)); Inception's pool3: 2048
MAX_SHAPES_IMAGES = 1_000_000      # `latentdiff data shapes -n`: images of one data set (the examples: 512)
MIN_SHAPES_SIZE, MAX_SHAPES_SIZE = 8, 1024  # `latentdiff data shapes --size`: the image side in pixels (examples: 32)


def check_count(value: Any, *, key: str, at_most: int, at_least: int = 0, where: Any = None,
                error: type[ConfigError] | type[InputError] = ConfigError) -> int:
    """`value` as an int within [at_least, at_most], else `error` naming the key, the bound and the value.
    Bools and floats are refused (a config's `true` is not 1)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{key} must be a whole number", where=where, expected=f"an int in [{at_least}, {at_most}]",
                    found=repr(value) if isinstance(value, (int, float, str)) else type(value).__name__)
    if not at_least <= value <= at_most:
        raise error(f"{key} is out of bounds", where=where, expected=f"an int in [{at_least}, {at_most}]",
                    found=value)
    return value


def check_finite(value: Any, *, key: str, where: Any = None,
                 error: type[ConfigError] | type[InputError] = InputError) -> float:
    """`value` as a finite float, else `error` (a NaN guidance scale silently means "no guidance")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or isinstance(value, complex):
        raise error(f"{key} must be a real number", where=where, expected="a finite float", found=type(value).__name__)
    if not math.isfinite(value):
        raise error(f"{key} must be finite", where=where, expected="a finite float", found=value)
    return float(value)


def check_pixels(height: int, width: int, images: int, *, max_pixels: int | None = None, where: Any = None) -> None:
    """Refuse a generation whose height x width x images passes `max_pixels` (default DEFAULT_MAX_PIXELS), before
    any latent is allocated."""
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    check_count(height, key="height", at_least=1, at_most=MAX_SIDE, where=where, error=InputError)
    check_count(width, key="width", at_least=1, at_most=MAX_SIDE, where=where, error=InputError)
    check_count(images, key="number of images", at_least=1, at_most=MAX_IMAGES_PER_PROMPT * 64, where=where,
                error=InputError)
    total = height * width * images
    if total > limit:
        raise InputError("the call would generate more pixels than the limit (pass max_pixels= to raise it)",
                         where=where, expected=f"height x width x images <= {limit}",
                         found=f"{height} x {width} x {images} = {total}")
