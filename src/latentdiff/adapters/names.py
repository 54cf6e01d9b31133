"""Which module of a pipeline each key of a LoRA / LyCORIS file names, and the file's keys grouped per module.

A file names a module in one of these spellings (one table per pipeline, built from its own modules, so a key
that names nothing is an error and never a guess):

    kohya / A1111, diffusers names   lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down
    kohya / A1111, CompVis names     lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down
                                     (through convert.unet_ldm's key table of the same UNet, not a second table)
    kohya text encoder               lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight (lora_te1_)
    kohya SDXL                       lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q (the original block
                                     numbers, from the UNet's own config), lora_te1_* (CLIP-L), lora_te2_* (bigG)
    diffusers / PEFT                 unet.down_blocks.0.attentions.0....attn1.to_q.lora_A.weight / lora_B.weight
                                     (text_encoder.*, and text_encoder_2.* on SDXL)
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

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_COMPONENTS = COMPONENTS[1:]
PATCHABLE = (nn.Linear, nn.Conv2d)
# the kohya prefixes of each text encoder: SD 1.x / 2.x files write lora_te_, SDXL files lora_te1_ and lora_te2_
# (diffusers reads lora_te_ as the first text encoder on SDXL too)
KOHYA_TEXT = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}


@dataclasses.dataclass(frozen=True)
class Target:
    """A module an adapter may change: the pipeline component ("unet" | "text_encoder" | "text_encoder_2") and
    its module name."""

    component: str
    name: str


def is_sdxl(pipe: object) -> bool:
    """Whether the pipeline has SDXL's second text encoder slot (`text_encoder_2`; the refiner's `text_encoder`
    is None)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def components(pipe: object) -> dict[str, Any]:
    """The networks adapters patch: the UNet and each text encoder's model (the transformer inside TextEncoder;
    None where the pipeline has no such encoder)."""
    text = getattr(pipe, "text_encoder", None)
    parts = {"unet": pipe.unet,  # type: ignore[attr-defined]  # every pipeline with adapters has a UNet
             "text_encoder": getattr(text, "model", text)}
    if is_sdxl(pipe):
        text_2 = pipe.text_encoder_2  # type: ignore[attr-defined]  # is_sdxl: it has one
        parts["text_encoder_2"] = getattr(text_2, "model", text_2)
    return parts


def transformers_name(model: nn.Module, name: str) -> str:
    """A text model's module name as transformers spells it: the tower under `text_model.` (latentdiff's
    CLIPTextModel has no such level), a projection model's `text_projection` beside it."""
    if name.startswith("text_model.") or hasattr(model, "text_model"):
        return name
    return "text_model." + name


def patchable(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_modules():
        if isinstance(child, PATCHABLE):
            yield name, child


def _compvis_name(table: tuple, name: str) -> str | None:
    hit = resolve(table, name + ".weight")
    outputs = hit.outputs() if hit is not None else []
    return outputs[0].removesuffix(".weight") if len(outputs) == 1 else None


def original_unet_names(unet: nn.Module) -> dict[str, str]:
    """{module name: its name in the original (CompVis / SGM) layout} for the UNet's patchable modules, from
    convert.unet_ldm's key table of this UNet's config (SDXL's input_blocks / output_blocks numbering follows from
    its levels without attention and its depths); empty for a UNet without an original layout."""
    try:
        compvis = invert(UNetArch.from_config(unet.config).keymap())  # type: ignore[arg-type]
    except (CheckpointError, AttributeError, TypeError):
        return {}
    found = {name: _compvis_name(compvis, name) for name, _ in patchable(unet)}
    return {name: original for name, original in found.items() if original is not None}


def module_table(pipe: object) -> dict[str, Target]:
    """Every spelling of every patchable module of the pipeline -> its Target."""
    table: dict[str, Target] = {}
    parts = components(pipe)
    unet = parts["unet"]
    originals = original_unet_names(unet)
    for name, _ in patchable(unet):
        target = Target("unet", name)
        table["lora_unet_" + name.replace(".", "_")] = target
        table["unet." + name] = target
        table[name] = target   # a PEFT file of the UNet alone
        if name in originals:
            table["lora_unet_" + originals[name].replace(".", "_")] = target
    for component in TEXT_COMPONENTS:
        model = parts.get(component)
        if model is None:
            continue
        for name, _ in patchable(model):
            target = Target(component, name)
            full = transformers_name(model, name)
            for spelled in {full, full.removeprefix("text_model.")}:   # with and without transformers' level
                for prefix in KOHYA_TEXT[component]:
                    table[prefix + spelled.replace(".", "_")] = target
                table[f"{component}.{spelled}"] = target
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


def group_keys(state: Mapping[str, torch.Tensor], table: Mapping[str, Target], *, source: str,
               pipeline: str = "") -> dict[Target, tuple[str, dict[str, torch.Tensor]]]:
    """state -> {target: (module spelling, {kohya suffix: tensor})}; a key naming no module of the pipeline is a
    CheckpointError naming the file, the key, the closest module names expected and `pipeline` (what it is)."""
    groups: dict[Target, tuple[str, dict[str, torch.Tensor]]] = {}
    for key in sorted(state):
        module, suffix = _split(key)
        target = table.get(module)
        if target is None:
            close = difflib.get_close_matches(module, list(table), n=3, cutoff=0.6)
            raise CheckpointError("an adapter key names no module of this pipeline's UNet or text encoders "
                                  "(a LoRA for another architecture?)", where=f"{source}: {key}",
                                  expected=(("a module such as " + ", ".join(close)) if close else
                                            "lora_unet_<module> / lora_te_<module> / unet.<module> / "
                                            "text_encoder.<module>") + (f", of {pipeline}" if pipeline else ""),
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
    """"sdxl" (a second text encoder) | "sd1" (CLIP width 768) | "sd2" (1024) | None (another width: no claim)."""
    if is_sdxl(pipe):
        return "sdxl"
    width = getattr(getattr(pipe, "text_encoder", None), "hidden_size", None)
    return {768: "sd1", 1024: "sd2"}.get(width) if isinstance(width, int) else None


# ---- the model family a file was made for, against the pipeline's -------------------------------------------
# the UNet's cross-attention width (the text context) names the family of the released models
CONTEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL base", 1280: "SDXL refiner"}
_CROSS_ATTENTION_KEYS = re.compile(r"attn2[._]to_[kv]$")


def describe_pipeline(pipe: object) -> str:
    """What a pipeline is, for errors: its text encoders and the UNet's cross-attention width."""
    width = getattr(getattr(pipe.unet, "config", None), "cross_attention_dim", None)  # type: ignore[attr-defined]
    family = f" ({CONTEXT_FAMILIES[width]})" if width in CONTEXT_FAMILIES else ""
    if not is_sdxl(pipe):
        encoders = "one text encoder (lora_te_ / text_encoder. keys)"
    elif getattr(pipe, "text_encoder", None) is None:
        encoders = "SDXL's second text encoder only (lora_te2_ / text_encoder_2. keys), as the refiner"
    else:
        encoders = "SDXL's two text encoders (lora_te1_ / text_encoder. and lora_te2_ / text_encoder_2. keys)"
    return f"a pipeline with {encoders} and a UNet of cross-attention width {width}{family}"


def check_family(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, pipe: object, *,
                 source: str) -> None:
    """A CheckpointError naming the file, the key and the pipeline where a file was made for another model family:
    kohya's `ss_base_model_version` naming another family, keys of SDXL's second text encoder on a pipeline with
    one, keys of a first text encoder the pipeline lacks (the SDXL refiner), or a cross-attention LoRA (attn2
    to_k / to_v) whose input width is not the UNet's context width (SD 1.x 768, SD 2.x 1024, SDXL 2048, the
    refiner 1280). Runs before any key is matched to a module, so the error says what is wrong rather than which
    module is missing."""
    wanted, have = base_family(metadata), pipeline_family(pipe)
    if wanted is not None and have is not None and wanted != have:
        raise CheckpointError("the LoRA was trained for another base model", where=f"{source}: ss_base_model_version",
                              expected=f"a LoRA for {have}: {describe_pipeline(pipe)}",
                              found=(metadata or {}).get("ss_base_model_version"))
    parts = components(pipe)
    width = getattr(getattr(parts["unet"], "config", None), "cross_attention_dim", None)
    for key in sorted(state):
        module, suffix = _split(key)
        if module.startswith((*KOHYA_TEXT["text_encoder_2"], "text_encoder_2.")) and not is_sdxl(pipe):
            raise CheckpointError("an SDXL LoRA (it changes SDXL's second text encoder, OpenCLIP bigG) on a pipeline "
                                  "with one text encoder", where=f"{source}: {key}",
                                  expected=f"a LoRA for {describe_pipeline(pipe)}",
                                  found="a key of text_encoder_2 (an SDXL LoRA)")
        if module.startswith((*KOHYA_TEXT["text_encoder"], "text_encoder.")) and parts["text_encoder"] is None:
            raise CheckpointError("the LoRA changes a first text encoder (CLIP-L), which this pipeline does not have "
                                  "(an SDXL refiner conditions on bigG only)", where=f"{source}: {key}",
                                  expected=f"UNet and text_encoder_2 keys only, for {describe_pipeline(pipe)}",
                                  found="a key of text_encoder (a LoRA for the SDXL base?)")
        tensor = state[key]
        if suffix == "lora_down.weight" and _CROSS_ATTENTION_KEYS.search(module) and isinstance(width, int) \
                and tensor.dim() == 2 and tensor.shape[1] != width:
            found = int(tensor.shape[1])
            family = f" ({CONTEXT_FAMILIES[found]})" if found in CONTEXT_FAMILIES else ""
            raise CheckpointError("a LoRA for another model family: its cross-attention input width differs from "
                                  "this UNet's context width", where=f"{source}: {key}",
                                  expected=f"input width {width}, for {describe_pipeline(pipe)}",
                                  found=f"input width {found}{family}")


__all__ = ["Target", "components", "patchable", "module_table", "group_keys", "base_family", "pipeline_family",
           "original_unet_names", "is_sdxl", "transformers_name", "describe_pipeline", "check_family", "COMPONENTS",
           "TEXT_COMPONENTS"]
