"""The AUTOMATIC1111 web UI's "parameters" text (its "infotext"), written and read: pure text, no image code.

    a red circle on the left
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model: sd15

The prompt (any number of lines), then an optional "Negative prompt:" line (continued by the lines after it),
then one line of `Key: value` settings separated by ", ". A value holding a comma, a colon or a newline is
written as a JSON string (A1111 quotes them so); a setting whose value equals its key is written as the bare key.
`format_infotext` writes latentdiff's settings in that layout (the `parameters` chunk of every PNG `latentdiff
generate` writes, the EXIF UserComment of its JPEG / WebP files); `parse_infotext` reads any such text back,
A1111's own included, and `settings_from_infotext` maps it to latentdiff's setting names through one table,
`FIELDS`, used both ways.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import limits
from ..errors import UsageError

NEGATIVE = "Negative prompt:"
# latentdiff's registered sampler -> the label A1111 writes for the same method (diffusion.samplers.names reads
# this table the other way: the one table of A1111 labels of implemented samplers). DDPM has no A1111 label.
A1111_SAMPLER_LABELS: dict[str, str] = {
    "ddim": "DDIM", "ddpm": "DDPM", "plms": "PLMS", "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun",
    "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
    "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_3m_sde": "DPM++ 3M SDE", "lcm": "LCM",
    "uni_pc": "UniPC",    # A1111's UniPC: bh1, order 3 (its uni_pc_variant / uni_pc_order defaults)
}
# A1111 labels of a registered sampler with another setting than its own label's: label -> (sampler, settings)
A1111_VARIANT_LABELS: dict[str, tuple[str, dict[str, Any]]] = {
    "DPM++ 2M SDE Heun": ("dpmpp_2m_sde", {"solver_type": "heun"}),
}
# a sampler's `sigma_schedule` -> A1111's "Schedule type" ("Uniform" is k-diffusion's own grid, the default one)
A1111_SCHEDULE_LABELS: dict[str, str] = {"default": "Uniform", "karras": "Karras", "exponential": "Exponential",
                                         "sgm_uniform": "SGM Uniform", "simple": "Simple", "beta": "Beta",
                                         "align_your_steps": "Align Your Steps"}


@dataclass(frozen=True)
class Field:
    """One setting of the infotext: A1111's label, latentdiff's setting name(s), how the value reads."""

    label: str
    settings: tuple[str, ...]    # "Size" fills two: width, height
    kind: str                    # int | float | text | size | version | hashes


# The table, in the order A1111 writes its settings. A setting named here that `latentdiff generate` does not
# have (yet) is listed as ignored when read; adding one is a line here. "Clip skip" keeps A1111's numbering
# (2 = the penultimate layer). "Denoising strength" is the hires fix's strength when the text has "Hires upscale"
# (A1111's txt2img), else img2img's strength.
FIELDS: tuple[Field, ...] = (
    Field("Steps", ("steps",), "int"),
    Field("Sampler", ("sampler",), "text"),
    Field("Schedule type", ("schedule",), "text"),
    Field("CFG scale", ("guidance",), "float"),
    Field("Seed", ("seed",), "int"),
    Field("Size", ("width", "height"), "size"),
    Field("Model", ("model",), "text"),
    Field("Eta DDIM", ("eta",), "float"),
    Field("Denoising strength", ("strength",), "float"),
    Field("Clip skip", ("clip_skip",), "int"),
    Field("Hires upscale", ("hires_scale",), "float"),
    Field("Hires steps", ("hires_steps",), "int"),
    Field("Hires upscaler", ("hires_upscaler",), "text"),
    Field("Refiner", ("refiner",), "text"),                     # SDXL: A1111 writes "name [hash]"
    Field("Refiner switch at", ("refiner_switch",), "float"),
    Field("TI hashes", ("embedding",), "hashes"),   # written (token: sha256[:10], as A1111); read: ignored
    Field("Version", ("latentdiff",), "version"),
)
FIELD_BY_LABEL = {field.label: field for field in FIELDS}
# A1111's upscaler names -> the hires upscalers latentdiff has ("image": decode, resize with Lanczos, encode)
HIRES_UPSCALERS = {"Latent": "latent", "Latent (nearest)": "latent-nearest", "Latent (nearest-exact)": "latent-nearest",
                   "Lanczos": "image"}
VERSION_PREFIX = "latentdiff "
_KEY = re.compile(r"\w[\w .+\-/()]*")
_INT = re.compile(r"-?\d{1,30}")
_NUMBER = re.compile(r"-?(\d{1,30}(\.\d{0,30})?|\.\d{1,30})([eE][-+]?\d{1,3})?")
_SIZE = re.compile(r"(\d{1,9})x(\d{1,9})")


@dataclass(frozen=True)
class Infotext:
    """A parsed infotext: the prompt, the negative prompt ("" when none), the settings as written (label ->
    value, quotes removed), in order."""

    prompt: str
    negative: str
    fields: dict[str, str]


# ---- writing ------------------------------------------------------------------------------------------------------
def a1111_sampler_label(name: str, options: Mapping[str, Any] | None = None) -> str:
    """The label A1111 writes for the registered sampler `name` with `options` (its settings that an A1111 label fixes,
    GenerateSettings.sampler_options): a variant's ("DPM++ 2M SDE Heun"), else the sampler's own; `name` itself
    where A1111 has none."""
    for label, (variant, settings) in A1111_VARIANT_LABELS.items():
        if variant == name and isinstance(options, Mapping) and all(options.get(k) == v for k, v in settings.items()):
            return label
    return A1111_SAMPLER_LABELS.get(name, name)


def format_infotext(params: Mapping[str, Any]) -> str:
    """latentdiff's settings (`GenerateSettings` names: prompt, negative, steps, sampler, schedule, guidance, seed,
    width, height, model, eta, ..., latentdiff = the version) as A1111's parameters text. Settings that are None
    are left out, as A1111 leaves them out; eta 0 too (A1111 writes "Eta DDIM" only when it is not 0)."""
    lines = [str(params.get("prompt") or "") + lora_tags(params.get("lora"))]
    if params.get("negative"):
        lines.append(f"{NEGATIVE} {params['negative']}")
    settings = []
    if params.get("hires_scale") is not None and params.get("strength") is None:
        params = {**params, "strength": params.get("hires_strength")}   # A1111's one "Denoising strength"
    for field in FIELDS:
        values = [params.get(name) for name in field.settings]
        if any(value is None for value in values) or (field.label == "Eta DDIM" and values[0] == 0):
            continue
        if field.kind == "size":
            text = f"{values[0]}x{values[1]}"
        elif field.label == "Sampler":
            text = a1111_sampler_label(str(values[0]), params.get("sampler_options"))
        elif field.label == "Schedule type":
            text = A1111_SCHEDULE_LABELS.get(str(values[0]), str(values[0]))
        elif field.kind == "version":
            text = f"{VERSION_PREFIX}{values[0]}"
        elif field.kind == "hashes":   # A1111's "name: shorthash, ..." (a hash finds no file here: not read back)
            entries = values[0] if isinstance(values[0], (list, tuple)) else ()
            text = ", ".join(f"{e.get('token')}: {str(e.get('sha256'))[:10]}" for e in entries if isinstance(e, dict))
        elif field.label == "Hires upscaler":
            text = next((label for label, name in HIRES_UPSCALERS.items() if name == values[0]), str(values[0]))
        else:
            text = _number(values[0])
        settings.append(f"{field.label}: {quote(text)}")
    return "\n".join(lines + [", ".join(settings + lora_hashes(params.get("lora")))])


def _loras(value: Any) -> list[tuple[str, float, str]]:
    """`latentdiff generate --lora`'s record ([{"path", "weight", "sha256"}]) -> [(file stem, weight, sha256)]."""
    if not isinstance(value, list):
        return []
    return [(Path(str(e["path"])).stem, float(e["weight"]), str(e.get("sha256") or "")) for e in value
            if isinstance(e, dict) and "path" in e and isinstance(e.get("weight"), (int, float))]


def lora_tags(value: Any) -> str:
    """A1111 writes the LoRAs of a generation as `<lora:NAME:W>` tags in the prompt itself."""
    return "".join(f" <lora:{stem}:{_number(weight)}>" for stem, weight, _ in _loras(value))


def lora_hashes(value: Any) -> list[str]:
    """A1111's "Lora hashes" setting: NAME: the first 12 hex digits of the file's sha256, for each LoRA."""
    hashes = ", ".join(f"{stem}: {digest[:12]}" for stem, _, digest in _loras(value) if digest)
    return [f"Lora hashes: {quote(hashes)}"] if hashes else []


def _number(value: Any) -> str:
    """A float as A1111 shows it: 7 rather than 7.0; anything else as str()."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def quote(text: str) -> str:
    """`text` as a JSON string when it holds a comma, colon or newline (which would end or split the setting)."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


# ---- reading ------------------------------------------------------------------------------------------------------
def parse_infotext(text: Any, *, where: str) -> Infotext:
    """Split A1111's parameters text into prompt, negative prompt and settings; a UsageError naming `where` when
    it is not such a text (not a string, too long, no settings line, a setting that does not read)."""
    if not isinstance(text, str):
        raise UsageError("the A1111 parameters are not text", where=where, expected="a string",
                         found=type(text).__name__)
    if len(text) > limits.MAX_INFOTEXT_CHARS:
        raise UsageError("the A1111 parameters text is too long", where=where,
                         expected=f"at most {limits.MAX_INFOTEXT_CHARS} characters (limits.MAX_INFOTEXT_CHARS)",
                         found=f"{len(text)} characters")
    if "\x00" in text:
        raise UsageError("the A1111 parameters text holds a NUL character", where=where,
                         expected="text", found=repr(text[:80]))
    *lines, last = text.replace("\r\n", "\n").strip().split("\n")
    fields = _settings_line(last, where=where)
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    return Infotext("\n".join(prompt), "\n".join(negative), fields)


def _settings_line(line: str, *, where: str) -> dict[str, str]:
    """`Key: value, Key: "quoted, value", Bare` -> {key: value}; a UsageError when the line is not one."""
    fields: dict[str, str] = {}
    keyed = 0                              # settings with a "Key: value" (a prompt line "a, b, c" has none)
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] in " ,":
            i += 1
        if i >= n:
            break
        end = _segment_end(line, i)
        colon = line.find(":", i, end)
        key = line[i:colon if colon >= 0 else end].strip()
        if not _KEY.fullmatch(key):
            raise _no_settings(where, line)
        if colon < 0:                      # a bare key: A1111 writes "Key" for Key: Key
            fields[key], i = key, end
            continue
        j = colon + 1
        while j < n and line[j] == " ":
            j += 1
        if j < n and line[j] == '"':
            try:
                value, j = json.JSONDecoder().raw_decode(line, j)
            except ValueError:
                raise UsageError(f"the A1111 setting {key!r} has a broken quoted value", where=f"{where}: {key}",
                                 expected="a JSON string", found=line[j:j + 80]) from None
            while j < n and line[j] == " ":
                j += 1
            if not isinstance(value, str) or line[j:j + 1] not in ("", ","):
                raise UsageError(f"the A1111 setting {key!r} has a broken quoted value", where=f"{where}: {key}",
                                 expected='"text", then a comma', found=line[colon + 1:j + 20].strip())
        else:
            value, j = line[j:end].strip(), end
        fields[key], keyed = value, keyed + 1
        i = j
    if "Steps" not in fields and keyed < 3:
        raise _no_settings(where, line)
    return fields


def _segment_end(line: str, start: int) -> int:
    """The index of the comma that ends the setting starting at `start` (the line's end if none), a quoted value
    being read whole by the caller."""
    comma = line.find(",", start)
    return len(line) if comma < 0 else comma


def _no_settings(where: str, line: str) -> UsageError:
    return UsageError("no A1111 settings line (Steps: ..., Sampler: ..., Seed: ...) at the end of the parameters",
                      where=where, expected="the text the AUTOMATIC1111 web UI writes", found=repr(line[:120]))


def settings_from_infotext(info: Infotext, *, known: Collection[str], where: str) -> tuple[dict[str, Any], list[str]]:
    """(latentdiff settings, the labels not used) from a parsed infotext: the prompt, the negative prompt (None when
    empty), and each setting of FIELDS whose setting names are all in `known`, its value read by its kind (a
    UsageError naming the label when it does not read). A label FIELDS does not have, or whose setting is not
    known, goes to the second list."""
    settings: dict[str, Any] = {"prompt": info.prompt, "negative": info.negative or None}
    ignored: list[str] = []
    for label, value in info.fields.items():
        field = FIELD_BY_LABEL.get(label)
        names = field.settings if field is not None else ()
        if label == "Denoising strength" and "Hires upscale" in info.fields:
            names = ("hires_strength",)
        if field is None or not all(name in known for name in names):
            ignored.append(label)
            continue
        read = _read(field, value, where=f"{where}: {label}")
        if read is None:
            if field.kind != "version":    # another program's version: not a setting
                ignored.append(label)
            continue
        settings.update(zip(names, read, strict=True))
    return settings, ignored


def _read(field: Field, value: str, *, where: str) -> tuple[Any, ...] | None:
    """The value(s) of one setting, or None when latentdiff has no equivalent of this value."""
    def bad(expected: str) -> UsageError:
        return UsageError(f"bad value for the A1111 setting {field.label!r}", where=where, expected=expected,
                          found=repr(value[:80]))

    if field.kind == "int":
        if not _INT.fullmatch(value):
            raise bad("an integer")
        return (int(value),)
    if field.kind == "float":
        if not _NUMBER.fullmatch(value):
            raise bad("a number")
        return (float(value),)
    if field.kind == "size":
        match = _SIZE.fullmatch(value)
        if match is None:
            raise bad("WIDTHxHEIGHT, e.g. 512x768")
        return int(match.group(1)), int(match.group(2))
    if field.kind == "version":
        return (value[len(VERSION_PREFIX):],) if value.startswith(VERSION_PREFIX) else None
    if field.kind == "hashes":
        return None
    if field.label == "Hires upscaler":
        upscaler = HIRES_UPSCALERS.get(value)
        return None if upscaler is None else (upscaler,)
    return (value,)
