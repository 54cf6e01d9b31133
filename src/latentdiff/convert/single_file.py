"""One-file checkpoints in the original layout (`.ckpt`, `.safetensors`): read, split into parts, write back.

    parts = read_single_file("v1-5-pruned-emaonly.safetensors")    # {"unet": (config, state), ...}
    state = to_single_file(parts)                                  # the original layout again, bit for bit
    write_single_file("model.safetensors", parts)                  # + latentdiff's configs in the metadata

A *parts* dict maps a part name to `(config, state_dict)`:

    "unet"            diffusers UNet2DConditionModel (SD, text/class LDMs) or UNet2DModel (other LDMs)
    "vae" / "vqvae"   diffusers AutoencoderKL / VQModel
    "text_encoder"    transformers CLIPTextModel (SD 1.x / 2.x, SDXL's CLIP-L), diffusers LDMBertModel (LDM
                      text-to-image)
    "text_encoder_2"  transformers CLIPTextModelWithProjection (SDXL's OpenCLIP bigG, every layer)
    "class_embedder"  LDM's ClassEmbedder: {"embedding.weight": (classes, width)}
    "scheduler"       (DDIMScheduler config, {})
    "extras"          ({"family": ...}, tensors of the file that are no network's weights: schedule buffers,
                      position_ids, OpenCLIP's unused last layer ...; written back verbatim)

Configs are diffusers' config.json dicts (transformers' for text encoders). Pickles are read with
`weights_only=True`: nothing in a file is executed; the one non-tensor name old Lightning checkpoints
need (a callback class used as a dict key) is allowed by name and resolves to an inert stand-in.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeAlias

import torch

from .. import hub, limits
from ..diffusion.scheduler_io import read_scheduler_config
from ..errors import CheckpointError, ConfigError, InputError, describe
from .infer import cond_kind, infer_layout, scale_factor_of
from .keymap import apply_keymap, invert, prefixed
from .layout import (
    COND_STAGE_PREFIX,
    CONDITIONER_PREFIX,
    FAMILIES,
    FIRST_STAGE_PREFIX,
    SCHEDULE_BUFFERS,
    SEPARATOR,
    FileLayout,
)
from .original_config import layout_from_original_config
from .sdxl_ldm import embedder_indices, is_sdxl_file, sdxl_conditioning
from .unet_ldm import UNET_PREFIX, select_ema

INPUT_BLOCKS = UNET_PREFIX + "input_blocks."
METADATA_KEY = "latentdiff"  # safetensors metadata entry holding the configs (JSON)
FORMAT_VERSION = 1
NETWORK_PARTS = ("unet", "vae", "vqvae", "text_encoder", "text_encoder_2", "class_embedder")
OTHER_PARTS = ("scheduler", "extras")
# Lightning <= 1.4 keyed callback states by the callback class; unpickling the key needs the name only.
LIGHTNING_CALLBACK_KEYS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                           "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint")
Parts: TypeAlias = dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]
PartOf: TypeAlias = tuple[Mapping[str, Any], Mapping[str, torch.Tensor]]  # (config, state) of one part, read-only
# The part of an original single file a model class is, by its diffusers class name (or its own name).
SINGLE_FILE_PARTS = {"UNet2DConditionModel": "unet", "UNet2DModel": "unet", "AutoencoderKL": "vae",
                     "VQModel": "vqvae", "LDMBert": "text_encoder", "ClassEmbedder": "class_embedder"}
# lllyasviel's ControlNet files: the ControlNet's keys (beside the SD model in v1.0 files, alone in v1.1 files)
CONTROL_PREFIX = "control_model."
# TextEncoderConfig (clip skip and the like) inside a single file's "text_encoder" part config
SINGLE_FILE_SETTINGS_KEY = "_latentdiff_text_encoder"


# Where each network part's tensors are in an original file (a stand-alone autoencoder has no prefix).
PART_PREFIXES = {"unet": UNET_PREFIX, "vae": FIRST_STAGE_PREFIX, "vqvae": FIRST_STAGE_PREFIX,
                 "text_encoder": COND_STAGE_PREFIX, "class_embedder": COND_STAGE_PREFIX,
                 "text_encoder_2": CONDITIONER_PREFIX}  # SDXL's text encoders: `sdxl_only_parts`


class PartState(dict):  # type: ignore[type-arg]
    """A part's state dict (latentdiff's names), with `origins`: each key's name in the file, for error messages."""

    origins: dict[str, str]

    def __init__(self, *args: Any, origins: Mapping[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.origins = dict(origins or {})


class CallbackKey:
    """Inert stand-in for a Lightning callback class found in a checkpoint (used there as a dict key)."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass


def class_name(cls: type) -> str:
    """The `_class_name` a part config gives a model class: its diffusers twin's, else its own name."""
    return getattr(cls, "diffusers_class_name", None) or cls.__name__


def single_file_part(cls: type) -> str | None:
    """The part of an original single file model class `cls` loads ("unet", "vae", "vqvae" ...), or None."""
    return SINGLE_FILE_PARTS.get(class_name(cls))


# ---- reading ----------------------------------------------------------------------------------------------
def load_single_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The raw tensors of a `.safetensors` or `.ckpt` file, and {"metadata": {...}, "global_step": int | None}.

    A Lightning checkpoint is unwrapped (`state_dict`); anything else that is not tensors is refused.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError("expected a single checkpoint file, found a folder", where=str(path),
                              expected="a .safetensors or .ckpt file (a diffusers folder loads with from_pretrained)",
                              found="a folder")
    if not path.is_file():
        raise CheckpointError("checkpoint file not found", where=str(path))
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
        header = hub.check_safetensors_header(path)
        return hub.load_safetensors(path), {"metadata": dict(header.get("__metadata__") or {}), "global_step": None}
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":  # torch.save's zip format / the legacy pickle format
        stand_ins: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
            (CallbackKey, name) for name in LIGHTNING_CALLBACK_KEYS]
        try:
            with torch.serialization.safe_globals(stand_ins):
                obj = hub.load_torch_pickle(path)
        except CheckpointError:
            raise
        except Exception as e:  # a malformed pickle can fail in many ways; none of them may escape unnamed
            raise CheckpointError(f"unreadable checkpoint ({type(e).__name__}: {e})", where=str(path)) from None
        return _unwrap(obj, path)
    if head[:2] == b"PK":
        raise CheckpointError("truncated or corrupt checkpoint (a zip archive without its directory)", where=str(path))
    raise CheckpointError("not a checkpoint: neither safetensors nor a PyTorch file", where=str(path),
                          expected=".safetensors, or a .ckpt written by torch.save", found=f"starts with {head[:8]!r}")


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(obj, dict):
        raise CheckpointError("not a state dict", where=str(path), found=describe(obj))
    step = obj.get("global_step")
    state = obj.get("state_dict", obj)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # some trainers nest it twice
    if not isinstance(state, dict):
        raise CheckpointError("the checkpoint's state_dict is not a dict of tensors", where=f"{path}: state_dict",
                              expected="a dict of name -> tensor", found=describe(state))
    bad = sorted(str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError("the state dict holds entries that are not named tensors", where=str(path),
                              found=bad[:20])
    return state, {"metadata": {}, "global_step": step if isinstance(step, int) else None}


def read_single_file(path: str | os.PathLike, *, use_ema: bool = True,
                     original_config: str | os.PathLike | Mapping[str, Any] | None = None,
                     prediction_type: str | None = None, only: Collection[str] | None = None) -> Parts:
    """Read an original checkpoint and split it into parts (see the module doc).

    The architecture comes from `original_config` if given, else from latentdiff's configs in the file's
    metadata (files written by `write_single_file`), else from the tensor shapes (see `infer`). `only`: the
    network parts wanted (None: all); the others are neither inferred nor converted.
    """
    state, info = load_single_file(path)
    configs = family = None
    if original_config is None and METADATA_KEY in info["metadata"]:
        configs, family = saved_metadata(info["metadata"][METADATA_KEY], where=f"{path}: __metadata__.{METADATA_KEY}")
    return split_single_file(state, original_config=original_config, use_ema=use_ema, prediction_type=prediction_type,
                             global_step=info["global_step"], configs=configs, family=family, source=str(path),
                             only=only)


def saved_metadata(text: str, *, where: str) -> tuple[dict[str, dict[str, Any]], str | None]:
    """(configs, family) of latentdiff's metadata entry in a file, its structure checked: a JSON object whose
    `configs` maps part names to config objects and whose `family` is a name (or absent)."""
    try:
        saved = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"unreadable latentdiff metadata ({e})", where=where, expected="JSON") from None
    if not isinstance(saved, dict) or "configs" not in saved:
        raise CheckpointError("latentdiff metadata without configs", where=where,
                              expected='a JSON object {"configs": {...}, "family": ...}', found=describe(saved))
    configs, family = saved["configs"], saved.get("family")
    if not isinstance(configs, dict) or not configs:
        raise CheckpointError("latentdiff metadata: configs is not an object of part configs", where=f"{where}.configs",
                              expected=f"a JSON object of part name ({', '.join(NETWORK_PARTS + OTHER_PARTS[:1])}) "
                                       "-> config object", found=describe(configs))
    for part, config in configs.items():
        if part not in NETWORK_PARTS + OTHER_PARTS[:1]:
            raise CheckpointError("latentdiff metadata names an unknown part", where=f"{where}.configs",
                                  expected=list(NETWORK_PARTS + OTHER_PARTS[:1]), found=part)
        if not isinstance(config, dict):
            raise CheckpointError("latentdiff metadata: a part config is not an object",
                                  where=f"{where}.configs.{part}", expected="a JSON object", found=describe(config))
    if family is not None and family not in FAMILIES:
        raise CheckpointError("latentdiff metadata: unknown family", where=f"{where}.family",
                              expected=f"one of {', '.join(FAMILIES)}, or null",
                              found=family if isinstance(family, str) else describe(family))
    return configs, family


def file_layout(state: Mapping[str, torch.Tensor], *, original_config: Any = None,
                configs: Mapping[str, dict] | None = None, family: str | None = None,
                prediction_type: str | None = None, global_step: int | None = None,
                source: str = "checkpoint", conditioning: str | None = None,
                pooled: int | None = None) -> FileLayout:
    """The layout of `state`: from a YAML, else from saved configs, else inferred from the shapes."""
    if original_config is not None:
        return layout_from_original_config(original_config, prediction_type=prediction_type,
                                           scale_factor=scale_factor_of(state, source=source))
    if configs is not None:
        try:
            layout = FileLayout.from_configs(dict(configs), family=family)
        except (CheckpointError, ConfigError) as e:  # name the file and the metadata entry, not just the part
            raise CheckpointError(f"latentdiff metadata: {e.message}", where=f"{source}: __metadata__.{METADATA_KEY}"
                                  f".configs.{e.where}", expected=e.expected, found=e.found) from None
        if prediction_type is not None and layout.scheduler is not None:
            layout = dataclasses.replace(layout, scheduler={**layout.scheduler, "prediction_type": prediction_type})
        return layout
    return infer_layout(state, prediction_type=prediction_type, global_step=global_step, source=source,
                        conditioning=conditioning, pooled=pooled)


def check_schedule_buffers(state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """The schedule buffers (`betas`, `alphas_cumprod` ...) hold one value per training step: checked by shape
    before any is read (a 200 MB `betas` would cost 3.3 GB and half a minute in `tolist()`)."""
    for name in SCHEDULE_BUFFERS:
        value = state.get(name)
        if isinstance(value, torch.Tensor) and (value.ndim != 1 or value.numel() > limits.MAX_TRAIN_TIMESTEPS):
            raise CheckpointError(f"the schedule buffer {name!r} must hold one value per training timestep",
                                  where=f"{name} in {source}",
                                  expected=f"a 1-D tensor of at most {limits.MAX_TRAIN_TIMESTEPS} values "
                                           "(limits.MAX_TRAIN_TIMESTEPS)", found=f"shape {tuple(value.shape)}")


def check_unet_blocks(state: Mapping[str, torch.Tensor], layout: FileLayout, *, source: str) -> None:
    """The UNet a YAML or metadata describes has as many `input_blocks` as the file's weights (counted from the
    keys), checked before its key table is built: a layer count is never trusted beyond the weights present."""
    if layout.unet is None:
        return
    found = {key[len(INPUT_BLOCKS):].split(".", 1)[0] for key in state if key.startswith(INPUT_BLOCKS)}
    expected = 1 + sum(layout.unet.layers_per_level) + len(layout.unet.channels) - 1
    if found and len(found) != expected:
        raise CheckpointError("the UNet's description does not match its weights (num_res_blocks / channel_mult)",
                              where=f"{INPUT_BLOCKS}* in {source}",
                              expected=f"{expected} input blocks (1 + layers per level {layout.unet.layers_per_level}"
                                       f" + {len(layout.unet.channels) - 1} downsamplers)",
                              found=f"{len(found)} input blocks in the file")


def split_single_file(state: Mapping[str, torch.Tensor], *, original_config: Any = None, use_ema: bool = True,
                      prediction_type: str | None = None, global_step: int | None = None,
                      configs: Mapping[str, dict] | None = None, family: str | None = None,
                      source: str = "checkpoint", only: Collection[str] | None = None) -> Parts:
    """An original-layout state dict -> parts. Every tensor lands in a part; an unknown key is an error.

    `use_ema`: when the file has LitEma weights (`model_ema.*`), the UNet gets them (default) or the live
    weights; the other copy is left out. `only`: the network parts wanted (None: all); the tensors of the
    others are left out before anything is inferred or converted (a UNet loads from a file whose text encoder
    latentdiff cannot read), only the kind of conditioning is kept (it sets UNet conventions and the task).
    """
    check_schedule_buffers(state, source=source)
    state = without_controlnet(state, source=source)
    state = select_ema(state, use_ema=use_ema, source=source)
    conditioning = pooled = None
    if only is not None:
        state, conditioning, pooled = only_parts(state, only, source=source)
    layout = file_layout(state, original_config=original_config, configs=configs, family=family,
                         prediction_type=prediction_type, global_step=global_step, source=source,
                         conditioning=conditioning, pooled=pooled)
    check_unet_blocks(state, layout, source=source)
    extras: dict[str, torch.Tensor] = {}
    origins: dict[str, str] = {}
    mapped = apply_keymap(state, layout.keymap(), source=source, dropped=extras, origins=origins)
    by_part: dict[str, PartState] = {}
    for key, value in mapped.items():
        part, _, rest = key.partition(SEPARATOR)
        by_part.setdefault(part, PartState()).update({rest: value})
        by_part[part].origins[rest] = origins[key]
    parts: Parts = {}
    # configs saved by write_single_file are taken verbatim (the layout keeps only what shapes tensors)
    saved = {p: c for p, c in (configs or {}).items() if not (p == "scheduler" and prediction_type is not None)}
    for part, config in layout.configs(saved=saved).items():
        if part == "scheduler":
            # checked now (num_train_timesteps bounded ...), not when a pipeline is finally built from it
            read_scheduler_config(config, source=f"{source}: scheduler", warn=False)
            parts[part] = (config, {})
        elif part in by_part:  # a part the config names but the file lacks (e.g. a UNet-only file) is omitted
            parts[part] = (config, by_part[part])
    parts["extras"] = ({"family": layout.family} | ({"conditioning": conditioning} if conditioning else {}),
                       extras)
    return parts


def without_controlnet(state: Mapping[str, torch.Tensor], *, source: str) -> Mapping[str, torch.Tensor]:
    """`state` without the ControlNet a v1.0 ControlNet file holds beside its SD model (`control_model.*`: read by
    ControlNet.from_single_file); a file holding a ControlNet alone is a CheckpointError saying how to load it."""
    control = [k for k in state if k.startswith(CONTROL_PREFIX)]
    if not control:
        return state
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise CheckpointError("a ControlNet file holds no Stable Diffusion model: load it with "
                              "ControlNet.from_single_file", where=source, expected=f"{UNET_PREFIX}* keys",
                              found=control[:3])
    return {k: v for k, v in state.items() if not k.startswith(CONTROL_PREFIX)}


def only_parts(state: Mapping[str, torch.Tensor], parts: Collection[str], *, source: str = "checkpoint",
               ) -> tuple[dict[str, torch.Tensor], str | None, int | None]:
    """(`state` without the tensors of the network parts not in `parts`, the kind of its conditioning stage:
    "clip", "openclip", "ldmbert", "class", SDXL's "sdxl" / "sdxl-refiner", or None when it has none or one
    latentdiff cannot tell; SDXL's pooled text width, which shapes its UNet, or None)."""
    if is_sdxl_file(state):
        return sdxl_only_parts(state, parts, source=source)
    try:
        kind = cond_kind(prefixed(COND_STAGE_PREFIX, state))
    except CheckpointError:
        kind = None
    # a prefix two parts share (the conditioning stage: text encoder or class embedder; the first stage: KL or
    # VQ) is read when both are wanted
    drop = tuple({PART_PREFIXES[p] for p in NETWORK_PARTS if p not in parts and p != "text_encoder_2"})
    return {k: v for k, v in state.items() if not k.startswith(drop)}, kind, None


def sdxl_only_parts(state: Mapping[str, torch.Tensor], parts: Collection[str], *,
                    source: str) -> tuple[dict[str, torch.Tensor], str | None, int | None]:
    """`only_parts` of an SDXL file: its text encoders are told apart by their embedder index, and the file's
    conditioner is checked whole (a UNet of a file with a broken conditioner is not read as the base's)."""
    conditioning = sdxl_conditioning(state, source=source)
    index = embedder_indices(conditioning)
    drop = tuple({PART_PREFIXES[p] for p in ("unet", "vae", "vqvae") if p not in parts} |
                 {f"{CONDITIONER_PREFIX}{i}." for part, i in index.items() if part not in parts})
    # the pooled width from its tensor's shape: the encoders' configs may be the file's metadata, not the shapes'
    projection = state.get(f"{CONDITIONER_PREFIX}{index.get('text_encoder_2')}.model.text_projection")
    pooled = int(projection.shape[-1]) if isinstance(projection, torch.Tensor) and projection.ndim == 2 else None
    return {k: v for k, v in state.items() if not k.startswith(drop)}, conditioning, pooled


# ---- writing ----------------------------------------------------------------------------------------------
def to_single_file(parts: Mapping[str, PartOf]) -> dict[str, torch.Tensor]:
    """Parts -> one state dict in the original layout (the inverse of `split_single_file`).

    Tensors are not copied except where fused ones are rebuilt (OpenCLIP in_proj, LDM qkv); dtypes are kept.
    A text encoder state may use transformers 4's `text_model.` prefix or transformers 5's flat names.
    """
    unknown = sorted(set(parts) - set(NETWORK_PARTS) - set(OTHER_PARTS))
    if unknown:
        raise InputError("unknown part names", where="parts", expected=NETWORK_PARTS + OTHER_PARTS, found=unknown)
    configs = {name: dict(config) for name, (config, _) in parts.items() if name != "extras"}
    if not set(configs) & set(NETWORK_PARTS):
        raise InputError("no network part to write", where="parts", expected=NETWORK_PARTS, found=sorted(parts))
    extras_config, extras = parts.get("extras", ({}, {}))
    layout = FileLayout.from_configs(configs, family=extras_config.get("family"))
    flat: dict[str, torch.Tensor] = {}
    for name in NETWORK_PARTS:
        if name in parts:
            state = parts[name][1]
            if name == "text_encoder" and state and all(k.startswith("text_model.") for k in state):
                state = {k[len("text_model."):]: v for k, v in state.items()}
            flat.update({name + SEPARATOR + k: v for k, v in state.items()})
    out = apply_keymap(flat, invert(layout.keymap()), source="to_single_file")
    clash = sorted(set(out) & set(extras))
    if clash:
        raise CheckpointError("extras collide with converted weights", where="parts['extras']", found=clash[:20])
    out.update(extras)
    return out


def write_single_file(path: str | os.PathLike, parts: Mapping[str, PartOf], *,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write parts as one original-layout `.safetensors` file (atomically), with latentdiff's configs as JSON
    in the metadata so that `read_single_file` needs neither a YAML nor shape inference to read it back."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError("single files are written as safetensors", where=str(path), expected="*.safetensors")
    user = dict(metadata or {})
    if METADATA_KEY in user or not all(isinstance(k, str) and isinstance(v, str) for k, v in user.items()):
        raise InputError("metadata must map str to str and not use latentdiff's own key", where="metadata",
                         found=sorted(map(str, user)))
    state = to_single_file(parts)
    configs = {name: config for name, (config, _) in parts.items() if name != "extras"}
    family = dict(parts.get("extras", ({}, {}))[0]).get("family")
    described = {"format_version": FORMAT_VERSION, "family": family, "configs": configs}
    hub.save_safetensors(state, path, metadata={**user, "format": "pt",
                                                METADATA_KEY: json.dumps(described, sort_keys=True)})
    return path
