"""The diffusers pipeline folder, read and written by one engine for every pipeline class.

A folder is `model_index.json` naming each part's (library, class), and one subfolder per part:

    root, index, source = open_folder("CompVis/ldm-celebahq-256", location=HubLocation())
    arguments = load_folder(UnconditionalPipeline, path, given={}, variant=None, torch_dtype=None,
                            device=None, location=HubLocation())       # -> UnconditionalPipeline(**arguments)

A pipeline class describes its folder as `FolderPart`s (`folder_layout(index)`: the text-to-image pipelines
pick theirs by the index's `_class_name`), and the engine checks the index against them, downloads only the
subfolders it will read, loads each part the caller did not pass, and reads the scheduler. Saving is the
reverse (`write_parts`). Any diffusers scheduler class loads (see `diffusion.scheduler_io`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeAlias

from ..config import read_json
from ..diffusion.noise_scheduler import NoiseScheduler
from ..diffusion.samplers import SamplerProtocol, SamplerSettings
from ..diffusion.scheduler_io import SCHEDULER_CONFIG_NAME, load_scheduler_folder, write_scheduler_folder
from ..errors import CheckpointError, ConfigError, describe
from ..hub import HubLocation, contained
from ..utils.devices import check_device
from ..utils.dtypes import resolve_torch_dtype

MODEL_INDEX = "model_index.json"
Entry: TypeAlias = tuple[str, str]   # a model_index.json (library, class) entry
Supported: TypeAlias = dict[str, Sequence[tuple[str | None, str | None]]]

# Parts of the real Hub folders that change no image latentdiff makes, by model_index.json key -> the classes they
# are known as: recognised by name, never downloaded, reported once (logging, info level), written back as null.
# Stable Diffusion v1's safety checker and its feature extractor (SD 2.x lists the extractor too), and the
# IP-Adapter image encoder diffusers saves with a pipeline. Any other class under these keys is still an error.
IGNORED_PARTS: dict[str, tuple[Entry, ...]] = {
    "safety_checker": (("stable_diffusion", "StableDiffusionSafetyChecker"),),
    "feature_extractor": (("transformers", "CLIPImageProcessor"), ("transformers", "CLIPFeatureExtractor")),
    "image_encoder": (("transformers", "CLIPVisionModelWithProjection"),),
}
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FolderPart:
    """One part of a pipeline folder: its model_index.json key (= subfolder), the constructor argument it fills,
    and the (library, class) entries it accepts -> the latentdiff class that loads them."""

    key: str
    argument: str
    classes: Mapping[Entry, type | None]   # None: read by another part's loader (the tokenizer, by its text encoder)
    optional: bool = False                 # a folder may lack it (the constructor has a default)
    load_options: tuple[tuple[str, Any], ...] = ()   # extra keywords of its from_pretrained


class WritesFiles(Protocol):
    """A part of a folder: a model (ModelMixin, IdentityFirstStage) writes its own subfolder."""

    def write_files(self, folder: Path, *, variant: str | None = None) -> None: ...


class LoadsFolders(Protocol):
    """What the engine asks of a pipeline class (DenoisingPipeline implements it)."""

    def folder_layout(self, index: Mapping[str, Any]) -> Sequence[FolderPart]: ...

    def check_model_index(self, index: dict[str, Any], *, source: str, supported: Supported) -> None: ...

    def load_part(self, key: str, part_class: Any, root: Path, **load: Any) -> Any: ...

    def read_options(self, index: Mapping[str, Any], *, source: str) -> dict[str, Any]: ...


# ---- finding the files ----------------------------------------------------------------------------------
def read_model_index(folder: Path) -> dict[str, Any]:
    """folder/model_index.json, its structure checked: `_class_name` a string, every component entry a
    [library, class] pair of strings (or nulls) under a plain name."""
    path = folder / MODEL_INDEX
    if not path.is_file():
        raise CheckpointError(f"no {MODEL_INDEX} in the pipeline folder", where=str(folder),
                              expected="a diffusers-format pipeline folder",
                              found=sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None)
    index = read_json(path)
    name = index.get("_class_name")
    if not isinstance(name, str):
        raise ConfigError("the pipeline class must be one name", where=f"{path}: _class_name",
                          expected="a string (a diffusers pipeline class)", found=describe(name))
    for key, value in index.items():
        if isinstance(value, list) and not key.startswith("_"):
            check_entry(index, key, source=str(path))
            contained(folder, key, file=path, entry=key, plain_name=True)   # its subfolder: a name inside
    return index


def check_entry(index: Mapping[str, Any], key: str, *, source: str) -> tuple[str | None, str | None]:
    """index[key] as a component entry: a [library, class] pair of strings, or [null, null]."""
    value = index[key]
    if not (isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)):
        raise ConfigError(f"component {key!r} is not a [library, class] entry", where=f"{source}: {key}",
                          expected='a pair such as ["diffusers", "UNet2DConditionModel"] (or [null, null])',
                          found=describe(value))
    return value[0], value[1]


def ignored_parts(index: Mapping[str, Any], *, supported: Supported) -> list[str]:
    """The index's parts latentdiff recognises and does not run (IGNORED_PARTS with a known class)."""
    return [key for key, value in index.items() if key not in supported and key in IGNORED_PARTS
            and isinstance(value, list) and tuple(value) in IGNORED_PARTS[key]]


def open_folder(path_or_id: str | os.PathLike, *, location: HubLocation) -> tuple[Path, dict[str, Any], str]:
    """(root, model_index.json, its name for messages): a local folder, or a Hub snapshot of the index alone."""
    root = location.resolve(path_or_id, allow_patterns=[MODEL_INDEX])
    return root, read_model_index(root), str(root / MODEL_INDEX)


def resolve_folder(path_or_id: str | os.PathLike, *, subfolders: Sequence[str], variant: str | None,
                   location: HubLocation) -> Path:
    """A local folder, or a Hub snapshot of only the files a pipeline needs (configs, tokenizer, safetensors).

    A model subfolder (one with a config.json) that has no safetensors on the Hub - older repos such as
    CompVis/ldm-text2im-large-256's `bert/` - gets its pickled weights (`*.bin`, loaded weights-only).
    """
    suffix = f".{variant}" if variant else ""
    patterns = [MODEL_INDEX]
    for sub in subfolders:
        patterns += [f"{sub}/*.json", f"{sub}/*.txt", f"{sub}/*.model",
                     f"{sub}/*{suffix}.safetensors", f"{sub}/*{suffix}.safetensors.index.json"]
    root = location.resolve(path_or_id, allow_patterns=patterns)
    if Path(path_or_id).expanduser().is_dir():
        return root
    legacy = [sub for sub in subfolders if (root / sub / "config.json").is_file()
              and not any((root / sub).glob("*.safetensors"))]
    if legacy:
        pickles = [f"{sub}/*{suffix}.bin" for sub in legacy]
        root = location.resolve(path_or_id, allow_patterns=patterns + pickles)
    return root


# ---- loading ------------------------------------------------------------------------------------------------
def load_folder(pipeline: LoadsFolders, path_or_id: str | os.PathLike, *, given: Mapping[str, Any],
                variant: str | None, torch_dtype: Any, device: Any, location: HubLocation) -> dict[str, Any]:
    """The constructor arguments of `pipeline` for a folder: `given` as passed (a None part is loaded), the
    folder's options (`read_options`), each missing part loaded from its subfolder, and the scheduler."""
    check_device(device)  # before anything is read or downloaded
    torch_dtype, reason = resolve_torch_dtype(torch_dtype, device=device, model=str(path_or_id))
    if reason != "as given":
        logger.info("%s: torch_dtype='auto' -> %s", path_or_id, reason)
    root, index, source = open_folder(path_or_id, location=location)
    parts = pipeline.folder_layout(index)
    for key in [part.key for part in parts] + ["scheduler"]:
        if key in index:   # a component's entry: a pair, also where a string or a number stands
            check_entry(index, key, source=source)
    for key in IGNORED_PARTS:
        if index.get(key) is not None:   # null: absent, as [null, null]
            check_entry(index, key, source=source)
    supported: Supported = {part.key: list(part.classes) for part in parts}
    # the caller's own part: any class (a registered custom UNet saved with the pipeline, passed as unet=)
    supported |= {part.key: [tuple(index[part.key])] for part in parts
                  if given.get(part.argument) is not None and part.key in index}
    # any diffusers scheduler class: its noise schedule is read, the sampler mapped (DDIM fallback)
    pipeline.check_model_index(index, source=source, supported=supported | {
        "scheduler": [tuple(index.get("scheduler", (None, None)))]})
    ignored = ignored_parts(index, supported=supported)
    if ignored:
        logger.info("%s: not loaded: %s (latentdiff does not run them; their folders are not downloaded)",
                    source, ", ".join(f"{key} ({index[key][1]})" for key in ignored))
    wanted = [part for part in parts if given.get(part.argument) is None]
    keys = [part.key for part in wanted]
    if given.get("noise_scheduler") is None or given.get("sampler") is None:
        keys.append("scheduler")
    optional = {part.key for part in parts if part.optional}
    absent = [key for key in keys if key not in index and key not in optional]
    if absent:
        raise ConfigError("model_index.json lacks a component the pipeline needs", where=source,
                          expected=sorted(supported) + ["scheduler"], found=f"no entry for {absent}")
    root = resolve_folder(path_or_id, subfolders=[key for key in keys if key in index], variant=variant,
                          location=location)
    for key in keys:   # a subfolder (or a link) that leads out of the folder is refused
        if key in index:
            contained(root, key, file=source, entry=key, plain_name=True)
    arguments = pipeline.read_options(index, source=source) | dict(given)
    for part in wanted:
        part_class = part.classes[tuple(index[part.key])] if part.key in index else None
        if part_class is not None:
            arguments[part.argument] = pipeline.load_part(part.key, part_class, root, **dict(part.load_options),
                                                          variant=variant, torch_dtype=torch_dtype, device=device)
    arguments["noise_scheduler"], arguments["sampler"] = load_schedule(root, given.get("noise_scheduler"),
                                                                       given.get("sampler"))
    return arguments


def load_schedule(root: Path, noise_scheduler: NoiseScheduler | None,
                  sampler: SamplerProtocol | None) -> tuple[NoiseScheduler, SamplerProtocol | SamplerSettings]:
    """The parts given, the folder's scheduler/ for those that are None."""
    if noise_scheduler is not None and sampler is not None:
        return noise_scheduler, sampler
    loaded_schedule, loaded_sampler = load_scheduler_folder(root / "scheduler")
    return noise_scheduler or loaded_schedule, sampler if sampler is not None else loaded_sampler


# ---- saving -------------------------------------------------------------------------------------------------
def library_entry(module: object) -> list[str]:
    """A part's model_index.json entry: ["diffusers", its diffusers class] where diffusers has one (so diffusers
    loads the folder), else ["latentdiff", its class] (IdentityFirstStage, ClassEmbedder, SpatialRescaler)."""
    name = getattr(type(module), "diffusers_class_name", None)
    return ["diffusers", name] if name else ["latentdiff", type(module).__name__]


def write_parts(folder: Path, parts: Mapping[str, WritesFiles], *, noise_scheduler: NoiseScheduler,
                sampler: SamplerProtocol, variant: str | None = None) -> dict[str, list[str]]:
    """Write each part to folder/<key>/ and the scheduler to folder/scheduler/; -> their model_index.json entries."""
    for key, module in parts.items():
        module.write_files(folder / key, variant=variant)
    # scheduler_io writes the registered samplers (SamplerSettings) and refuses others with a ConfigError
    write_scheduler_folder(folder / "scheduler", noise_scheduler, sampler)  # type: ignore[arg-type]
    scheduler_class = read_json(folder / "scheduler" / SCHEDULER_CONFIG_NAME)["_class_name"]
    return {key: library_entry(module) for key, module in parts.items()} | {"scheduler": ["diffusers", scheduler_class]}
