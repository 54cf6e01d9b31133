"""TencentARC's original T2I-Adapter files <-> latentdiff's `T2IAdapter` (diffusers' layout), both ways.

    adapter = T2IAdapter.from_single_file("t2iadapter_canny_sd14v1.pth")    # or .safetensors
    adapter.save_single_file("mine.safetensors")                            # back in TencentARC's layout

The original repository (ldm/modules/encoders/adapter.py) has two networks, told apart by their keys:

    Adapter        conv_in, then body.{k}: one flat list of `nums_rb` residual units per level (4 levels, one per
                   SD UNet level), body.{k}.in_conv on a level's first unit where the width changes
                   (sk=True, use_conv=False: the pooling has no weights) -> diffusers full_adapter,
                   body.{level}.resnets.{unit}
    Adapter_light  body.{i}.in_conv / body.{i}.body.{j} / body.{i}.out_conv, one extractor per level
                   -> diffusers light_adapter (one width fewer in `channels`: its last block repeats the width)

Both unshuffle the control image by 8 (so conv_in / the first in_conv reads in_channels x 64: 192 for RGB
hints, 64 for the sketch adapters' grey ones). The tables below are generated from the config (the flat unit
index is level * nums_rb + unit) and inverted for writing. Files written here carry their config in the
safetensors metadata, so any config (not only four levels) reads back as it was.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import hub
from ..errors import CheckpointError, ConfigError
from ..models.base import cast_state_dict
from ..models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from ..registry import SINGLE_FILE
from .keymap import Rename, Rule, apply_keymap, invert
from .single_file import load_single_file

ORIGINAL_LEVELS = 4          # TencentARC's full adapters: one feature per SD UNet level
ORIGINAL_UNSHUFFLE = 8       # nn.PixelUnshuffle(8) in both original networks
XL_UNSHUFFLE = 16            # diffusers' full_adapter_xl (TencentARC's SDXL adapters)
# diffusers' own keys in one file (TencentARC's SDXL adapters ship only as diffusers folders; ComfyUI and A1111 load
# their weights file alone): kept as they are
DIFFUSERS_KEYS = (Rename("adapter.{key*}", "adapter.{key}"),)
METADATA_KEY = "latentdiff_t2i_adapter"   # the config (diffusers config.json keys), JSON, in files written here
# keys of TencentARC networks that are no spatial adapter of these layouts
OTHER_NETWORKS = {"style_embedding": "a style adapter (CLIP image tokens, not spatial features)",
                  "task_embedding": "a CoAdapter fuser", "skep": "an adapter with sk=False skip convolutions"}
_BODY_UNIT = re.compile(r"^body\.(\d+)\.")


def original_table(config: T2IAdapterConfig) -> tuple[Rule, ...]:
    """The original -> diffusers key table of an adapter of `config` (full_adapter or light_adapter)."""
    if config.adapter_type == "light_adapter":
        return (Rename("body.{i}.in_conv.{p}", "adapter.body.{i}.in_conv.{p}"),
                Rename("body.{i}.body.{j}.{conv}.{p}", "adapter.body.{i}.resnets.{j}.{conv}.{p}"),
                Rename("body.{i}.out_conv.{p}", "adapter.body.{i}.out_conv.{p}"))
    if config.adapter_type != "full_adapter":
        raise ConfigError("TencentARC's original layout has no SDXL adapter (those ship as diffusers folders)",
                          where="adapter_type", expected=("full_adapter", "light_adapter"), found=config.adapter_type)
    rules: list[Rule] = [Rename("conv_in.{p}", "adapter.conv_in.{p}")]
    n = config.num_res_blocks
    for level in range(len(config.channels)):
        for unit in range(n):
            k = level * n + unit
            rules.append(Rename(f"body.{k}.{{conv:block1|block2}}.{{p}}",
                                f"adapter.body.{level}.resnets.{unit}.{{conv}}.{{p}}"))
        rules.append(Rename(f"body.{level * n}.in_conv.{{p}}", f"adapter.body.{level}.in_conv.{{p}}"))
    return tuple(rules)


def file_table(config: T2IAdapterConfig, *, diffusers_keys: bool) -> tuple[Rule, ...]:
    """The file -> diffusers key table: diffusers' own keys kept, else TencentARC's layout (`original_table`)."""
    return DIFFUSERS_KEYS if diffusers_keys else original_table(config)


def infer_diffusers_config(state: Mapping[str, torch.Tensor], *, source: str) -> T2IAdapterConfig:
    """The config of a diffusers T2IAdapter weights file without its config.json, from the shapes: light with an
    out_conv; a full adapter's unshuffle factor from its input width, as ComfyUI reads it (1 or 3 hint channels:
    x 256 is full_adapter_xl, by 16; otherwise x 64, by 8). Light adapters unshuffle by 8."""
    light = "adapter.body.0.out_conv.weight" in state
    first = "adapter.body.0.in_conv.weight" if light else "adapter.conv_in.weight"
    if first not in state or state[first].ndim != 4:
        raise CheckpointError("not a T2I-Adapter file (diffusers' keys without adapter.conv_in or a light "
                              "adapter's adapter.body.0.in_conv)", where=source, found=sorted(state)[:8])
    cin = int(state[first].shape[1])
    xl = not light and cin in (XL_UNSHUFFLE ** 2, 3 * XL_UNSHUFFLE ** 2)
    factor = XL_UNSHUFFLE if xl else ORIGINAL_UNSHUFFLE
    if cin % factor ** 2:
        raise CheckpointError(f"the adapter's input width is no multiple of {factor ** 2}", where=first,
                              expected=f"in_channels x {factor ** 2}", found=cin)
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("adapter.body.")})
    try:
        units = len({k.split(".")[4] for k in state if k.startswith("adapter.body.0.resnets.")})
        if light:
            outs = [int(state[f"adapter.body.{i}.out_conv.weight"].shape[0]) for i in blocks]
            widths = tuple(outs[:-1])
        else:
            widths = tuple(int(state[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0]) for i in blocks)
        return T2IAdapterConfig(in_channels=cin // factor ** 2, channels=widths, num_res_blocks=units,
                                downscale_factor=factor, adapter_type="light_adapter" if light else
                                "full_adapter_xl" if xl else "full_adapter")
    except KeyError as e:
        raise CheckpointError(f"incomplete T2I-Adapter file: no {e.args[0]}", where=source) from None
    except ConfigError as e:
        raise CheckpointError(f"the file's shapes make no valid T2I-Adapter: {e.message}", where=source,
                              expected=e.expected, found=e.found) from None


def infer_config(state: Mapping[str, torch.Tensor], *, source: str) -> T2IAdapterConfig:
    """The config of an original file, from its tensor shapes: the layout from the keys, the widths from the
    convolutions, in_channels from the unshuffled input width (x 64)."""
    for marker, what in OTHER_NETWORKS.items():
        if any(marker in key.split(".") for key in state):
            raise CheckpointError(f"this file holds {what}, which latentdiff does not load as a T2IAdapter",
                                  where=source, expected="a full or light T2I-Adapter (t2iadapter_*_sd14v1)")
    light = "body.0.in_conv.weight" in state and "body.0.out_conv.weight" in state
    first = "body.0.in_conv.weight" if light else "conv_in.weight"
    if first not in state or state[first].ndim != 4:
        raise CheckpointError("not a T2I-Adapter file (neither TencentARC's full nor light adapter layout)",
                              where=source, expected="conv_in.weight + body.{k}.block1.weight, or body.{i}.in_conv / "
                              "body.{i}.out_conv", found=sorted(state)[:8])
    unshuffled = state[first].shape[1]
    if unshuffled % ORIGINAL_UNSHUFFLE ** 2:
        raise CheckpointError("the adapter's input width is no multiple of 64 (8x8 unshuffled pixels)", where=first,
                              expected="in_channels x 64", found=unshuffled)
    units = sorted({int(m[1]) for key in state if (m := _BODY_UNIT.match(key))})
    try:
        if light:
            outs = [int(state[f"body.{i}.out_conv.weight"].shape[0]) for i in units]
            res = len({k.split(".")[3] for k in state if k.startswith("body.0.body.")})
            if len(outs) < 2 or outs[-1] != outs[-2]:
                raise CheckpointError("a light adapter's last two levels must have one width (diffusers' layout)",
                                      where=source, expected="equal last widths", found=outs)
            return T2IAdapterConfig(in_channels=unshuffled // 64, channels=tuple(outs[:-1]), num_res_blocks=res,
                                    adapter_type="light_adapter")
        if len(units) % ORIGINAL_LEVELS or units != list(range(len(units))):
            raise CheckpointError(f"a full adapter has {ORIGINAL_LEVELS} levels of equal unit counts",
                                  where=source, expected=f"body.0 ... body.{{{ORIGINAL_LEVELS} x units - 1}}",
                                  found=f"{len(units)} body units")
        n = len(units) // ORIGINAL_LEVELS
        widths = tuple(int(state[f"body.{level * n}.block1.weight"].shape[0]) for level in range(ORIGINAL_LEVELS))
        return T2IAdapterConfig(in_channels=unshuffled // 64, channels=widths, num_res_blocks=n,
                                adapter_type="full_adapter")
    except KeyError as e:
        raise CheckpointError(f"incomplete T2I-Adapter file: no {e.args[0]}", where=source) from None
    except ConfigError as e:
        raise CheckpointError(f"the file's shapes make no valid T2I-Adapter: {e.message}", where=source,
                              expected=e.expected, found=e.found) from None


@SINGLE_FILE.register("t2i_adapter_from_single_file")
def t2i_adapter_from_single_file(cls: type[T2IAdapter], path: str | os.PathLike, *,
                                 torch_dtype: torch.dtype | None = None, device: Any = None) -> T2IAdapter:
    """`T2IAdapter.from_single_file`: read, infer (or take the config a file written here carries), convert
    through the table, build strictly (a leftover or missing key is a CheckpointError naming it as the file does)."""
    raw, info = load_single_file(path)
    source = str(path)
    saved = info["metadata"].get(METADATA_KEY)
    diffusers_keys = any(k.startswith("adapter.") for k in raw)
    if saved is not None:   # a file written here: its config, which the shapes need not pin down
        try:
            config = cls.from_file_config(json.loads(saved), source=f"{source}: __metadata__.{METADATA_KEY}")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"unreadable adapter config in the metadata ({e})", where=source) from None
    else:
        config = (infer_diffusers_config if diffusers_keys else infer_config)(raw, source=source)
    origins: dict[str, str] = {}
    table = file_table(config, diffusers_keys=diffusers_keys)
    state = apply_keymap(raw, table, source=source, origins=origins)
    with torch.device("meta"):
        wanted = cls(config).state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:   # named as the file would name them
        names = apply_keymap({k: wanted[k] for k in missing}, invert(table), source=source)
        raise CheckpointError(f"the file lacks {len(missing)} tensor(s) of its adapter", where=source,
                              expected=f"a {config.adapter_type} of widths {list(config.channels)}",
                              found=f"missing: {sorted(names)[:8]}")
    return cls.from_state_dict(config, state, torch_dtype=torch_dtype, device=device, source=source,
                               key_names=origins)


@SINGLE_FILE.register("t2i_adapter_to_single_file")
def t2i_adapter_to_single_file(model: T2IAdapter, path: str | os.PathLike, *,
                               dtype: torch.dtype | None = None) -> Path:
    """`T2IAdapter.save_single_file`: TencentARC's key layout (SDXL adapters, which have none: diffusers' keys),
    the config in the metadata, written atomically."""
    table = invert(file_table(model.config, diffusers_keys=model.config.adapter_type == "full_adapter_xl"))
    state = apply_keymap(cast_state_dict(model.state_dict(), dtype=dtype), table, source=type(model).__name__)
    path = Path(path)
    hub.save_safetensors(state, path, metadata={"format": "pt",
                                                METADATA_KEY: json.dumps(model.to_file_config(), sort_keys=True)})
    return path

