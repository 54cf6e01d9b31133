"""Whole checkpoints from one format to the other: what `latentdiff convert SRC DST` runs.

    convert_checkpoint("v1-5-pruned-emaonly.safetensors", "sd15/")          # -> a diffusers pipeline folder
    convert_checkpoint("sd15/", "sd15.safetensors", dtype=torch.float16)   # -> one original-layout file

single file -> diffusers: the file's pipeline (or, for a stand-alone autoencoder file, the autoencoder) built
strictly, then `save_pretrained` (atomic: a failure leaves no folder). SD files need a tokenizer (see
`tokenizers`). diffusers -> single file: each component of `model_index.json` loaded strictly as a model (no
tokenizer needed), then `write_single_file` (atomic). Floating-point tensors keep the dtype they have (the
source's, per part) unless `dtype` is given. Everything is read and checked before anything is written.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, InputError, UsageError
from ..models.base import ModelMixin
from ..models.text_encoder import CONFIG_FILE as TEXT_SETTINGS
from .api import model_part, module_from_part, pipeline_from_parts, read_parts
from .controlnet_ldm import is_controlnet_file
from .single_file import NETWORK_PARTS, Parts, single_file_part, write_single_file
from .single_file import SINGLE_FILE_SETTINGS_KEY as SETTINGS_KEY

DIRECTIONS = ("diffusers", "single-file")
# model_index.json component -> single-file part (LDM text-to-image folders call their text encoder `bert`).
FOLDER_PARTS = {"unet": "unet", "vae": "vae", "vqvae": "vqvae", "text_encoder": "text_encoder", "bert": "text_encoder",
                "text_encoder_2": "text_encoder_2", "scheduler": "scheduler"}
# Components with no place in an original file (the original code builds them itself, or has none).
NOT_IN_SINGLE_FILES = ("tokenizer", "tokenizer_2", "safety_checker", "feature_extractor", "image_encoder")


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, to: str | None = None,
                       dtype: torch.dtype | None = None, original_config: Any = None, use_ema: bool = True,
                       prediction_type: str | None = None, tokenizer: Any = None, tokenizer_2: Any = None,
                       overwrite: bool = False, progress: bool = True) -> Path:
    """Convert `src` (a single file or a diffusers folder) to `dst` in the other format; returns `dst`.

    `to` defaults to the other format than `src`'s. `original_config`, `use_ema`, `prediction_type`, `tokenizer`
    and `tokenizer_2` (SDXL's second) apply to reading a single file. `dst` must not exist unless `overwrite`.
    `src` may also name a built-in model ("latentdiff/shapes-64"): its packaged folder is converted.
    """
    from ..builtin import builtin_path

    packaged = None if Path(src).exists() else builtin_path(str(src))
    src, dst = (packaged or Path(src)), Path(dst)
    direction = check_arguments(src, dst, to=to, overwrite=overwrite)
    if direction == "diffusers":
        if not src.is_file() and src.exists():
            raise InputError("--to diffusers converts a single file, not a folder", where=str(src))
        if is_controlnet_file(src):   # v1.0 / v1.1 / bare ControlNet files: the ControlNet's folder
            if any(x is not None for x in (prediction_type, tokenizer, tokenizer_2)) or not use_ema:
                raise InputError("prediction_type, tokenizer(_2) and use_ema are for SD files, not ControlNets",
                                 where=str(src), expected="none of these options for a ControlNet file")
            return controlnet_to_folder(src, dst, dtype=dtype, original_config=original_config)
        parts = read_parts(src, use_ema=use_ema, original_config=original_config, prediction_type=prediction_type)
        return single_file_to_folder(parts, dst, dtype=dtype, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                     source=str(src), progress=progress)
    if any(x is not None for x in (original_config, prediction_type, tokenizer, tokenizer_2)) or not use_ema:
        raise InputError("original_config, prediction_type, tokenizer(_2) and use_ema are for reading single files",
                         where=str(src), expected="a single file as the source, or none of these options")
    if is_controlnet_folder(src):
        return controlnet_folder_to_file(src, dst, dtype=dtype)
    parts = read_diffusers_folder(src, dtype=dtype, progress=progress)
    return write_single_file(dst, parts, metadata={"converted_from": src.name})


def check_arguments(src: Path, dst: Path, *, to: str | None, overwrite: bool) -> str:
    """The direction; every argument error raised before anything is read."""
    if not src.exists():
        raise InputError("the source does not exist", where=str(src),
                         expected="a .safetensors / .ckpt file, or a diffusers folder")
    direction = to or ("single-file" if src.is_dir() else "diffusers")
    if direction not in DIRECTIONS:
        raise InputError("unknown target format", where="to", expected=DIRECTIONS, found=direction)
    if direction == "single-file" and not src.is_dir():
        raise InputError("--to single-file converts a diffusers folder, not a file", where=str(src),
                         expected="a folder with model_index.json (or a model folder with config.json)")
    if direction == "single-file" and dst.suffix != ".safetensors":
        raise InputError("single files are written as safetensors", where=str(dst), expected="DST ending .safetensors")
    if dst.exists() and not overwrite:
        raise InputError("the destination exists", where=str(dst), expected="a new path (or --overwrite)")
    source, target = src.resolve(), dst.resolve()
    if target == source:
        raise InputError("source and destination are the same", where=str(dst))
    if target in source.parents:   # replacing DST would delete SRC with it
        raise UsageError("the destination contains the source: writing it would delete the source",
                         where=str(dst), expected="a destination outside the source's folders", found=str(source),
                         hint="choose a new DST, e.g. beside the source")
    if source in target.parents:
        raise UsageError("the destination lies inside the source folder", where=str(dst),
                         expected="a destination outside the source", found=str(source),
                         hint="choose a DST outside SRC")
    return direction


def controlnet_to_folder(src: Path, dst: Path, *, dtype: torch.dtype | None, original_config: Any) -> Path:
    """An original ControlNet file -> a diffusers ControlNetModel folder (the SD model beside a v1.0 file's
    ControlNet is not converted: convert it with the pipeline of a plain SD file). Floating-point weights keep the
    file's dtype unless `dtype` is given."""
    from ..models.controlnet import ControlNet
    from .single_file import load_single_file

    if dtype is None:
        dtype = next((v.dtype for v in load_single_file(src)[0].values() if v.is_floating_point()), torch.float32)
    ControlNet.from_single_file(src, original_config=original_config, torch_dtype=dtype).save_pretrained(dst)
    return dst


def is_controlnet_folder(src: Path) -> bool:
    """A diffusers ControlNetModel folder (config.json naming the class)."""
    from ..config import read_json
    from ..models.base import CONFIG_NAME

    config = src / CONFIG_NAME
    return config.is_file() and read_json(config).get("_class_name") == "ControlNetModel"


def controlnet_folder_to_file(src: Path, dst: Path, *, dtype: torch.dtype | None) -> Path:
    """A diffusers ControlNetModel folder -> one original v1.1 file (`control_model.*`), atomically; the weights
    keep their dtype unless `dtype` is given."""
    from ..models.base import load_weights
    from ..models.controlnet import ControlNet

    if dtype is None:
        dtype = next((v.dtype for v in load_weights(src, ControlNet.weights_name).values() if v.is_floating_point()),
                     torch.float32)
    return ControlNet.from_pretrained(src, torch_dtype=dtype).save_single_file(dst)


def single_file_to_folder(parts: Parts, dst: Path, *, dtype: torch.dtype | None, tokenizer: Any, source: str,
                          tokenizer_2: Any = None, progress: bool = True) -> Path:
    """Parts of a single file -> a diffusers folder: the pipeline, or the autoencoder of a first-stage file."""
    dtype = dtype or float_dtype(parts)
    model: Any  # the autoencoder, or the pipeline: both save_pretrained(folder)
    with _bar(parts, progress) as bar:
        if "unet" not in parts:
            networks = [p for p in parts if p in NETWORK_PARTS]
            if len(networks) != 1 or networks[0] not in ("vae", "vqvae"):
                raise CheckpointError("a file without a denoiser converts only when it is one autoencoder",
                                      where=source, found=networks)
            model = module_from_part(networks[0], *parts[networks[0]], torch_dtype=dtype, source=source)
            bar.update(len(parts[networks[0]][1]))
        else:
            given = {"tokenizer_2": tokenizer_2} if tokenizer_2 is not None else {}   # SDXL's second
            model = pipeline_from_parts(parts, source=source, torch_dtype=dtype, tokenizer=tokenizer,
                                        on_part=lambda name, n: bar.update(n), **given)
        bar.set_description("writing")
        model.save_pretrained(dst)
    return dst


def read_diffusers_folder(folder: Path, *, dtype: torch.dtype | None = None, progress: bool = True) -> Parts:
    """A diffusers pipeline folder (or one model folder) -> parts, each built as a model first (strict)."""
    from ..config import read_json
    from ..diffusion.scheduler_io import SCHEDULER_CONFIG_NAME
    from ..models.base import CONFIG_NAME, load_weights

    if (folder / "model_index.json").is_file():
        index = read_json(folder / "model_index.json")
        names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and any(v)]
    elif (folder / CONFIG_NAME).is_file():
        names = ["."]  # a model folder (unet/, vae/ ...) on its own
    else:
        raise CheckpointError("not a diffusers folder: no model_index.json or config.json", where=str(folder),
                              found=sorted(p.name for p in folder.iterdir())[:20])
    unknown = [n for n in names if n != "." and n not in FOLDER_PARTS and n not in NOT_IN_SINGLE_FILES]
    if unknown:
        raise CheckpointError("components with no place in an original single file", where=str(folder),
                              expected=sorted(FOLDER_PARTS), found=unknown)
    parts: Parts = {}
    from tqdm.auto import tqdm

    for name in tqdm([n for n in names if n == "." or n in FOLDER_PARTS], desc="reading", unit="part",
                     disable=not progress):
        sub = folder / name
        if FOLDER_PARTS.get(name) == "scheduler":
            parts["scheduler"] = (read_json(sub / SCHEDULER_CONFIG_NAME), {})
            continue
        config = read_json(sub / CONFIG_NAME)
        part = FOLDER_PARTS.get(name) or _part_of_config(config, source=str(sub))
        if part in ("vae", "vqvae"):   # the class decides, not the folder's name (LDM folders keep a KL in vqvae/)
            part = _part_of_config(config, source=str(sub))
        text = part in ("text_encoder", "text_encoder_2")
        if text and (sub / TEXT_SETTINGS).is_file():  # clip skip and the like
            settings = read_json(sub / TEXT_SETTINGS)
            config[SETTINGS_KEY] = {k: v for k, v in settings.items() if not k.startswith("_")}
        weights = "diffusion_pytorch_model" if not text else \
            "model" if any(sub.glob("model*.safetensors*")) else "pytorch_model"
        state = load_weights(sub, weights)
        model = module_from_part(part, config, state, torch_dtype=dtype or float_dtype({part: (config, state)}),
                                 source=str(sub))
        if isinstance(model, ModelMixin):
            parts[part] = model_part(model)
        else:  # transformers' CLIPTextModel
            text_config: Any = model.config
            parts[part] = (text_config.to_dict(), dict(model.state_dict()))
        if SETTINGS_KEY in config:
            parts[part][0][SETTINGS_KEY] = config[SETTINGS_KEY]
    return parts


def _part_of_config(config: dict[str, Any], *, source: str) -> str:
    from .api import component_class

    cls = component_class(config.get("_class_name", ""))
    part = single_file_part(cls) if cls is not None else "text_encoder" if config.get("model_type") else None
    if part is None:
        raise CheckpointError("this model has no original single-file layout", where=source,
                              found=config.get("_class_name"))
    return part


def float_dtype(parts: Parts) -> torch.dtype:
    """The dtype of the first floating-point tensor of the networks (float32 if none)."""
    for name in NETWORK_PARTS:
        for tensor in parts.get(name, ({}, {}))[1].values():
            if tensor.is_floating_point():
                return tensor.dtype
    return torch.float32


def _bar(parts: Parts, progress: bool) -> Any:
    from tqdm.auto import tqdm

    total = sum(len(parts[p][1]) for p in parts if p in NETWORK_PARTS)
    return tqdm(total=total, desc="converting", unit="tensor", disable=not progress)
