"""What every pipeline shares: typed component fields, the diffusers folder layout, atomic saves.

A pipeline folder is the diffusers layout: `model_index.json` naming each component's class, and
one subfolder per component. Loading maps the foreign class names to latentdiff's registered parts;
a class latentdiff lacks is an error naming it. Scheduler classes are looser: the noise schedule is
what matters, so the common diffusers samplers latentdiff lacks (PNDM, LMS, Euler, DPM-Solver ...) load
their schedule with DDIM and a warning; see `diffusion.scheduler_io`.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from .. import __version__, hub
from ..config import read_json
from ..errors import CheckpointError, ConfigError, InputError

MODEL_INDEX = "model_index.json"
# The version of the diffusers folder format we write and test against (see pyproject's test pins).
DIFFUSERS_FORMAT_VERSION = "0.42.1"


@dataclass
class PipelineOutput:
    """`images`: a list of PIL images, an (N, H, W, 3) float array, an (N, 3, H, W) tensor in [0, 1], or latents."""

    images: Any


class Pipeline:
    """Base class: subclasses declare `diffusers_class_names` and implement `_load_components` / `_write`."""

    diffusers_class_names: ClassVar[tuple[str, ...]] = ()
    component_names: ClassVar[tuple[str, ...]] = ()

    # ---- loading -------------------------------------------------------------------------
    @staticmethod
    def read_model_index(folder: Path) -> dict[str, Any]:
        path = folder / MODEL_INDEX
        if not path.is_file():
            raise CheckpointError(f"no {MODEL_INDEX} in the pipeline folder", where=str(folder),
                                  expected="a diffusers-format pipeline folder",
                                  found=sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None)
        return read_json(path)

    @classmethod
    def check_model_index(cls, index: dict[str, Any], *, source: str,
                          supported: dict[str, Sequence[tuple[str | None, str | None]]]) -> None:
        """Check the pipeline class and each component's (library, class) entry against what we implement."""
        name = index.get("_class_name")
        if cls.diffusers_class_names and name not in cls.diffusers_class_names:
            raise ConfigError(f"{cls.__name__} cannot load this pipeline class", where=f"{source}: _class_name",
                              expected=list(cls.diffusers_class_names), found=name)
        for key, value in index.items():
            if key.startswith("_") or not isinstance(value, list):
                continue
            entry = tuple(value)
            if key not in supported:
                if entry == (None, None):
                    continue  # an absent optional part (safety_checker, feature_extractor ...)
                raise ConfigError(f"pipeline component {key!r} is not supported by {cls.__name__}",
                                  where=f"{source}: {key}", expected=sorted(supported), found=list(entry))
            if entry not in supported[key]:
                raise ConfigError(f"component {key!r} has a class latentdiff does not implement",
                                  where=f"{source}: {key}", expected=[list(e) for e in supported[key]],
                                  found=list(entry))

    @staticmethod
    def resolve_folder(path_or_id: str | os.PathLike, *, variant: str | None, revision: str | None,
                       cache_dir: Any, token: Any, local_files_only: bool | None,
                       subfolders: Sequence[str]) -> Path:
        """A local folder, or a Hub snapshot of only the files a pipeline needs (configs, tokenizer, safetensors)."""
        suffix = f".{variant}" if variant else ""
        patterns = [MODEL_INDEX]
        for sub in subfolders:
            patterns += [f"{sub}/*.json", f"{sub}/*.txt", f"{sub}/*.model",
                         f"{sub}/*{suffix}.safetensors", f"{sub}/*{suffix}.safetensors.index.json"]
        return hub.resolve(path_or_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir,
                           token=token, local_files_only=local_files_only)

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

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload pipeline with latentdiff", variant: str | None = None) -> str:
        """Save to a temporary folder and upload it to the Hub repository `repo_id` (created if needed)."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "pipeline", variant=variant)
            return hub.push_folder_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message)


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
