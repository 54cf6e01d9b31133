"""Which module of a pipeline each key of a LoRA / LyCORIS file names, and the file's keys grouped per module.

A file names a module in one of these spellings (one table per pipeline, built from its own modules, so a key
that names nothing is an error and never a guess):

    kohya / A1111, diffusers names   lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down
    kohya / A1111, CompVis names     lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down
                                     (through convert.unet_ldm's key table of the same UNet, not a second table)
    kohya text encoder               lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight (lora_te1_)
    diffusers / PEFT                 unet.down_blocks.0.attentions.0....attn1.to_q.lora_A.weight / lora_B.weight
    older diffusers                  unet....attn1.processor.to_q_lora.up.weight, ....to_q.lora_linear_layer.up.weight

kohya names replace every dot by "_", which makes them ambiguous to parse; they are therefore never parsed, but
looked up in a table made by spelling every module of the pipeline that way.

Every group is returned in kohya's suffixes ("lora_down.weight", "lora_up.weight", "alpha", "hada_w1_a" ...), so
one builder per kind (`delta.delta_from_group`) reads every spelling.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..convert.keymap import invert, resolve
from ..convert.unet_ldm import UNetArch
from ..errors import CheckpointError

COMPONENTS = ("unet", "text_encoder")
PATCHABLE = (nn.Linear, nn.Conv2d)


@dataclasses.dataclass(frozen=True)
class Target:
    """A module an adapter may change: the pipeline component ("unet" | "text_encoder") and its module name."""

    component: str
    name: str


def components(pipe: object) -> dict[str, Any]:
    """The networks adapters patch: the UNet and the text encoder's model (the transformer inside TextEncoder)."""
    text = getattr(pipe, "text_encoder", None)
    return {"unet": pipe.unet,  # type: ignore[attr-defined]  # every pipeline with adapters has a UNet
            "text_encoder": getattr(text, "model", text)}


def patchable(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_modules():
        if isinstance(child, PATCHABLE):
            yield name, child


def _compvis_name(table: tuple, name: str) -> str | None:
    hit = resolve(table, name + ".weight")
    outputs = hit.outputs() if hit is not None else []
    return outputs[0].removesuffix(".weight") if len(outputs) == 1 else None


def module_table(pipe: object) -> dict[str, Target]:
    """Every spelling of every patchable module of the pipeline -> its Target."""
    table: dict[str, Target] = {}
    parts = components(pipe)
    unet = parts["unet"]
    compvis: tuple = ()
    try:
        compvis = invert(UNetArch.from_config(unet.config).keymap())  # type: ignore[arg-type]
    except (CheckpointError, AttributeError, TypeError):
        compvis = ()   # a UNet without an original layout: diffusers-style names only
    for name, _ in patchable(unet):
        target = Target("unet", name)
        table["lora_unet_" + name.replace(".", "_")] = target
        table["unet." + name] = target
        table[name] = target   # a PEFT file of the UNet alone
        original = _compvis_name(compvis, name) if compvis else None
        if original is not None:
            table["lora_unet_" + original.replace(".", "_")] = target
    if parts["text_encoder"] is not None:
        for name, _ in patchable(parts["text_encoder"]):
            target = Target("text_encoder", name)
            bare = name.removeprefix("text_model.")
            for prefix in ("lora_te_", "lora_te1_"):
                table[prefix + "text_model_" + bare.replace(".", "_")] = target
                table[prefix + bare.replace(".", "_")] = target
            table["text_encoder.text_model." + bare] = target
            table["text_encoder." + bare] = target
    return table


# ---- grouping a file's keys per module ------------------------------------------------------------------------
# (pattern, module name template, kohya suffix): the diffusers / PEFT spellings; kohya keys split at the first dot
_FOREIGN = (
    (re.compile(r"^(.+)\.lora_A(?:\.default)?\.weight$"), r"\1", "lora_down.weight"),
    (re.compile(r"^(.+)\.lora_B(?:\.default)?\.weight$"), r"\1", "lora_up.weight"),
    (re.compile(r"^(.+)\.lora_linear_layer\.down\.weight$"), r"\1", "lora_down.weight"),
    (re.compile(r"^(.+)\.lora_linear_layer\.up\.weight$"), r"\1", "lora_up.weight"),
    (re.compile(r"^(.+)\.processor\.(to_[qkv])_lora\.down\.weight$"), r"\1.\2", "lora_down.weight"),
    (re.compile(r"^(.+)\.processor\.(to_[qkv])_lora\.up\.weight$"), r"\1.\2", "lora_up.weight"),
    (re.compile(r"^(.+)\.processor\.to_out_lora\.down\.weight$"), r"\1.to_out.0", "lora_down.weight"),
    (re.compile(r"^(.+)\.processor\.to_out_lora\.up\.weight$"), r"\1.to_out.0", "lora_up.weight"),
    (re.compile(r"^(.+)\.lora\.down\.weight$"), r"\1", "lora_down.weight"),
    (re.compile(r"^(.+)\.lora\.up\.weight$"), r"\1", "lora_up.weight"),
    (re.compile(r"^(.+?)(?:\.processor\.(to_[qkv]|to_out)_lora)?\.alpha$"), None, "alpha"),
)


def _split(key: str) -> tuple[str, str]:
    """key -> (module spelling, kohya suffix)."""
    if key.startswith("lora_"):
        module, _, suffix = key.partition(".")
        return module, suffix
    for pattern, template, suffix in _FOREIGN:
        m = pattern.match(key)
        if m is None:
            continue
        if template is None:   # ".alpha" of any spelling
            module = m.group(1) + ("" if m.group(2) is None else
                                   "." + ("to_out.0" if m.group(2) == "to_out" else m.group(2)))
            return module, suffix
        return m.expand(template), suffix
    module, _, suffix = key.rpartition(".")
    return module, suffix


def group_keys(state: Mapping[str, torch.Tensor], table: Mapping[str, Target], *,
               source: str) -> dict[Target, tuple[str, dict[str, torch.Tensor]]]:
    """state -> {target: (module spelling, {kohya suffix: tensor})}; a key naming no module of the pipeline is a
    CheckpointError naming the file, the key and the closest module names expected."""
    groups: dict[Target, tuple[str, dict[str, torch.Tensor]]] = {}
    for key in sorted(state):
        module, suffix = _split(key)
        target = table.get(module)
        if target is None:
            close = difflib.get_close_matches(module, list(table), n=3, cutoff=0.6)
            raise CheckpointError("an adapter key names no module of this pipeline's UNet or text encoder "
                                  "(a LoRA for another architecture?)", where=f"{source}: {key}",
                                  expected=("a module such as " + ", ".join(close)) if close else
                                  "lora_unet_<module> / lora_te_<module> / unet.<module> / text_encoder.<module>",
                                  found=module)
        spelled, group = groups.setdefault(target, (module, {}))
        if suffix in group:
            raise CheckpointError("two keys of an adapter file name the same module and part",
                                  where=f"{source}: {key}", expected="one tensor per module and part",
                                  found=f"{spelled} and {module}")
        group[suffix] = state[key]
    return groups


# ---- kohya's base-model metadata --------------------------------------------------------------------------------
def base_family(metadata: Mapping[str, str] | None) -> str | None:
    """kohya's `ss_base_model_version` ("sd_v1", "sd_v2_768_v", "sdxl_base_v1-0" ...) -> "sd1" | "sd2" | "sdxl"."""
    version = (metadata or {}).get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v2"):
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    return None


def pipeline_family(pipe: object) -> str | None:
    """"sd1" (CLIP width 768) | "sd2" (1024) | None (another width: no claim either way)."""
    width = getattr(getattr(pipe, "text_encoder", None), "hidden_size", None)
    return {768: "sd1", 1024: "sd2"}.get(width) if isinstance(width, int) else None


__all__ = ["Target", "components", "patchable", "module_table", "group_keys", "base_family", "pipeline_family"]
