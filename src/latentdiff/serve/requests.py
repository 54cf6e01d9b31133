"""ImageRequest: one generation request, checked and in latentdiff's terms, whatever API it came through; the
units the engine batches, and what comes back.

A1111's seeds: image i (0-based, over batch_size x n_iter) has the seed `seed + i` (or `seed` for every image and
`subseed + i` as its variation seed when subseed_strength > 0), so `all_seeds` is what A1111 reports.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..adapters.tags import TAG
from ..errors import InputError
from .settings import ServeSettings


class RequestError(InputError):
    """A request the server refuses: HTTP `status` (422 for a bad field), `field` the JSON key at fault."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 422, **details: Any):
        super().__init__(message, where=details.pop("where", field), **details)
        self.field, self.status = field, status


@dataclasses.dataclass(frozen=True)
class Hires:
    """A1111's hires fix: a first pass at (height, width), `upscaler`, a second pass at the target size."""

    scale: float                    # target / first size (hr_resize_x/_y, when given, decide the target instead)
    upscaler: str                   # pipelines.hires.A1111_UPSCALERS key or a latentdiff upscaler name
    steps: int | None               # second pass steps (None: the first pass's)
    strength: float                 # denoising_strength of the second pass


@dataclasses.dataclass(frozen=True, eq=False)
class InitImages:
    """img2img / inpainting inputs, decoded and checked (PIL images)."""

    images: tuple[Any, ...]         # init_images (image i of a batch uses images[i % len(images)], as A1111)
    mask: Any | None                # "L" image, white = repaint (after inpainting_mask_invert and mask_blur)
    strength: float                 # denoising_strength
    resize_mode: int = 0            # A1111: 0 just resize, 1 crop and resize, 2 resize and fill
    inpainting_fill: int = 1        # A1111: 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class ImageRequest:
    model: str                      # the catalog's name of the checkpoint (ModelCatalog.resolve has checked it)
    prompt: str
    negative_prompt: str = ""
    width: int = 64
    height: int = 64
    steps: int = 20
    guidance: float = 7.0
    sampler: str | None = None      # latentdiff registry name (names.resolve_sampler); None: the model's own
    schedule: str | None = None     # sigma schedule name, None: the sampler's own
    # the settings an A1111 label fixes besides its schedule (names.SamplerName.options); (): the sampler's own
    sampler_options: tuple[tuple[str, Any], ...] = ()
    eta: float | None = None
    seed: int = 0                   # the first image's seed, never -1 (drawn by the API layer)
    subseed: int = 0
    subseed_strength: float = 0.0
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int | None = None    # A1111's numbering (1 or None: the last layer)
    vae: str | None = None          # catalog name of a VAE, None: the model's own
    hires: Hires | None = None
    init: InitImages | None = None
    refiner: str | None = None      # SDXL: the catalog name of the refiner that denoises after refiner_switch
    refiner_switch: float | None = None   # A1111's refiner_switch_at: the base's denoising_end, in (0, 1)
    control: tuple[Any, ...] = ()   # controlnet_units.ControlRequest of each enabled ControlNet unit
    cfg_truncation: float | None = None   # guidance for this fraction of each pass's steps (None: every step)
    save_images: bool = False
    send_images: bool = True
    ignored: tuple[str, ...] = ()   # request keys accepted and not used (the response's info lists them)
    origin: str = "a1111"           # "a1111", "openai", "page"

    @property
    def images(self) -> int:
        return self.batch_size * self.n_iter

    def seeds(self) -> list[int]:
        """all_seeds, as A1111 reports them."""
        if self.subseed_strength > 0:
            return [self.seed] * self.images
        return [self.seed + i for i in range(self.images)]

    def subseeds(self) -> list[int]:
        return [self.subseed + i for i in range(self.images)]

    def batch_key(self) -> tuple[Any, ...] | None:
        """Requests with equal keys can share one pipeline call; None: never shared (inputs images, hires, variation
        seeds, ControlNet units: run alone, as the Python API would)."""
        if self.init is not None or self.hires is not None or self.subseed_strength > 0 or self.control:
            return None
        # a call activates the <lora:...> tags of all its prompts: only requests with the same tags share one
        loras = tuple(TAG.findall(self.prompt)), tuple(TAG.findall(self.negative_prompt))
        return (self.model, self.vae, self.width, self.height, self.steps, self.guidance, self.sampler,
                self.schedule, self.eta, self.clip_skip, loras, self.refiner, self.refiner_switch,
                self.sampler_options, self.cfg_truncation)


@dataclasses.dataclass(frozen=True, eq=False)
class Unit:
    """One batch (A1111's n_iter index) of a request: images index*batch_size ... + batch_size - 1."""

    request: ImageRequest
    index: int

    @property
    def first(self) -> int:
        return self.index * self.request.batch_size

    @property
    def count(self) -> int:
        return self.request.batch_size

    def seeds(self) -> list[int]:
        return self.request.seeds()[self.first:self.first + self.count]

    def subseeds(self) -> list[int]:
        return self.request.subseeds()[self.first:self.first + self.count]


@dataclasses.dataclass(frozen=True, eq=False)
class GeneratedImage:
    image: Any                      # PIL.Image
    seed: int
    subseed: int
    params: dict[str, Any]          # the settings the PNG records (utils.images.save_image: latentdiff + A1111 text)


@dataclasses.dataclass(eq=False)
class JobResult:
    request: ImageRequest
    images: list[GeneratedImage]
    interrupted: bool = False       # stopped by /interrupt (the images are the partly denoised ones, as A1111)
    skipped: int = 0                # units skipped by /skip


# ---- what error messages may show (app.py's A1111-style errors, openai_api.py's OpenAI-style ones) ----------------
def server_folders(settings: ServeSettings | None) -> list[tuple[str, str]]:
    """(path, what a client is told instead), longest paths first: the folders of the flags, the package, home."""
    package = Path(__file__).resolve().parents[1]    # src/latentdiff (or site-packages/latentdiff)
    pairs = [(str(package), "<latentdiff>"), (str(Path.home()), "~")]
    if settings is not None:
        pairs += [(str(d), "<--lora-dir>") for d in settings.lora_dirs]
        pairs += [(str(d), "<--controlnet-dir>") for d in settings.controlnet_dirs]
        for flag, folder in (("--models-dir", settings.models_dir), ("--vae-dir", settings.vae_dir),
                             ("--embeddings-dir", settings.embeddings_dir), ("--outputs-dir", settings.outputs_dir)):
            if folder is not None:
                pairs.append((str(folder), f"<{flag}>"))
    return sorted(((path, name) for path, name in pairs if len(path) > 1), key=lambda pair: -len(pair[0]))


def redact(text: str, settings: ServeSettings | None) -> str:
    """`text` without the server's own paths: a client learns which flag's folder, never where it is."""
    for path, name in server_folders(settings):
        text = text.replace(path, name)
    return text
