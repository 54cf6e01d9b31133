"""What every pipeline shares: typed component fields, the diffusers folder layout, atomic saves.

A pipeline folder is the diffusers layout: `model_index.json` naming each component's class, and
one subfolder per component. Loading maps the foreign class names to latentdiff's registered parts;
a class latentdiff lacks is an error naming it. Scheduler classes are looser: the noise schedule is
what matters, so PNDM, Euler, Euler ancestral, Heun, LMS and DPM-Solver
multistep load as latentdiff's samplers of that kind; the classes latentdiff lacks (UniPC, KDPM2,
DEIS, ...) load their schedule with DDIM and a warning; see `diffusion.scheduler_io`.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .. import hub
from ..errors import ConfigError, InputError, RegistryError
from ..hub_files import local_file
from ..registry import PIPELINES, SINGLE_FILE
from ..version import __version__
from .folder import IGNORED_PARTS, Supported, open_folder

# The version of the diffusers folder format we write and test against (see pyproject's test pins).
DIFFUSERS_FORMAT_VERSION = "0.42.1"


@dataclass
class PipelineOutput:
    """`images`: a list of PIL images, an (N, H, W, 3) float array, an (N, 3, H, W) tensor in [0, 1], or latents."""

    images: Any


class Pipeline:
    """Base class of the task pipelines; `Pipeline.from_pretrained(path)` picks the right one for a folder.

    Subclasses are registered in PIPELINES and declare `diffusers_class_names`, the model_index.json
    `_class_name` values they stand for (each name belongs to one class), and may load folders of
    further classes with compatible parts (`loadable_class_names`: an SD text-to-image folder loads as
    image-to-image too, as in diffusers). They implement `from_pretrained` (with `pipelines.folder`'s engine)
    and `write_files`.
    """

    diffusers_class_names: ClassVar[tuple[str, ...]] = ()
    loadable_class_names: ClassVar[tuple[str, ...]] = ()   # () = diffusers_class_names
    component_names: ClassVar[tuple[str, ...]] = ()
    registry_name: ClassVar[str]

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **kwargs: Any) -> Pipeline:
        """Load a diffusers-layout folder or Hub repo as the pipeline class its model_index.json names.

        `Pipeline.from_pretrained(path)` reads `_class_name` and hands every keyword to that class's
        `from_pretrained` (torch_dtype, device, variant, revision, cache_dir, token, local_files_only, parts).
        """
        if cls is not Pipeline:
            raise NotImplementedError(f"{cls.__name__} must implement from_pretrained")
        _, index, source = open_folder(path_or_id, location=hub.HubLocation.from_kwargs(kwargs))
        target = pipeline_class(index.get("_class_name"), source=source)
        return target.from_pretrained(path_or_id, **kwargs)

    @classmethod
    def check_model_index(cls, index: dict[str, Any], *, source: str,
                          supported: Supported) -> None:
        """Check the pipeline class and each component's (library, class) entry against what we implement."""
        name = index.get("_class_name")
        loadable = cls.loadable_class_names or cls.diffusers_class_names
        if loadable and name not in loadable:
            raise ConfigError(f"{cls.__name__} cannot load this pipeline class", where=f"{source}: _class_name",
                              expected=list(loadable), found=name)
        for key, value in index.items():
            if key.startswith("_") or not isinstance(value, list):
                continue
            entry = tuple(value)
            if key not in supported:
                if entry == (None, None) or entry in IGNORED_PARTS.get(key, ()):
                    continue  # an absent optional part, or one latentdiff does not run (a safety checker ...)
                raise ConfigError(f"pipeline component {key!r} is not supported by {cls.__name__}",
                                  where=f"{source}: {key}", expected=sorted(supported), found=list(entry))
            if entry not in supported[key]:
                raise ConfigError(f"component {key!r} has a class latentdiff does not implement",
                                  where=f"{source}: {key}", expected=[list(e) for e in supported[key]],
                                  found=list(entry))

    # ---- saving --------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, variant: str | None = None) -> Path:
        """Write a diffusers-layout folder atomically: an interrupted save leaves the previous folder intact."""
        with hub.atomic_folder(save_directory) as tmp:
            self.write_files(tmp, variant=variant)
        return Path(save_directory)

    def write_files(self, folder: Path, *, variant: str | None = None) -> None:
        raise NotImplementedError

    def model_index(self) -> dict[str, Any]:
        return {"_diffusers_version": DIFFUSERS_FORMAT_VERSION, "_latentdiff_version": __version__}

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, original_config: Any = None, **options: Any) -> Pipeline:
        """An original single file (CompVis / Stability AI .ckpt / .safetensors). `Pipeline.from_single_file`
        picks the class from the file's family; `SomePipeline.from_single_file` checks the file fits it.
        Components passed as keywords replace the file's (e.g. `tokenizer=`); other options: see
        `latentdiff.convert.api.pipeline_from_single_file` (reached through `registry.SINGLE_FILE`)."""
        path = local_file(path, **{k: options[k] for k in ("revision", "cache_dir", "token", "local_files_only")
                                   if k in options})
        return SINGLE_FILE.get("pipeline_from_single_file")(path, original_config=original_config,
                                                            pipeline_class=None if cls is Pipeline else cls, **options)

    def save_single_file(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
        """Write the pipeline as one original-layout .safetensors file (atomic, configs in the metadata)."""
        return SINGLE_FILE.get("pipeline_to_single_file")(self, path, dtype=dtype)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload pipeline with latentdiff", variant: str | None = None) -> str:
        """Save to a temporary folder and upload it to the Hub repository `repo_id` (created if needed)."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "pipeline", variant=variant)
            return hub.push_folder_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message)


# ---- finding the class of a folder -----------------------------------------------------------
# Modules whose import registers the pipelines (imported on the first look-up, like registry._BUILTIN_MODULES).
def pipeline_classes() -> dict[str, type[Pipeline]]:
    """diffusers `_class_name` -> the registered latentdiff pipeline class that stands for it."""
    table: dict[str, type[Pipeline]] = {}
    for registered in PIPELINES.names():
        cls = PIPELINES.get(registered)
        for name in getattr(cls, "diffusers_class_names", ()):
            if name in table and table[name] is not cls:
                raise RegistryError(f"two pipelines claim the diffusers class {name!r}", where=cls.__qualname__,
                                    found=table[name].__qualname__)
            table[name] = cls
    return table


def pipeline_class(class_name: Any, *, source: str) -> type[Pipeline]:
    """The pipeline class for a model_index.json `_class_name`; a ConfigError listing the supported ones."""
    table = pipeline_classes()
    if class_name not in table:
        raise ConfigError("latentdiff has no pipeline for this class", where=f"{source}: _class_name",
                          expected=sorted(table), found=class_name)
    return table[class_name]


# ---- model adapters shared by the pipelines ----------------------------------------------------
def concat_conditioning(model: Callable[..., torch.Tensor], extra: torch.Tensor) -> Callable[..., torch.Tensor]:
    """model(x, t, **kw) -> model(cat([x, extra], dim=1), t, **kw): inputs the UNet sees beside x_t.

    LDM's "concat" conditioning (Rombach et al. 2022, sec. 3.3 and app. D): the inpainting mask and
    masked-image latents, or the low-resolution image of super-resolution, are stacked onto the
    channels of x_t at every step. extra: (B, C', h, w), one row per sample; with classifier-free
    guidance the model sees the doubled batch, so a doubled copy is built once, not per step.
    """
    doubled = torch.cat([extra, extra])

    def with_extra(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return model(torch.cat([x, extra if x.shape[0] == extra.shape[0] else doubled], dim=1), t, **kwargs)

    return with_extra


def to_output(images: torch.Tensor, output_type: str) -> Any:
    """images: (N, 3, H, W) in [-1, 1] -> 'pt' (N, 3, H, W) in [0, 1], 'np' (N, H, W, 3), or 'pil' list."""
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise InputError("unknown output_type", where="output_type", expected=list(OUTPUT_TYPES), found=output_type)
