"""`latentdiff generate` as A1111 users know it: samplers and schedules by any accepted name (registered,
A1111, diffusers: `diffusion.samplers.names`), and `--from` on an image that holds only A1111's parameters text
(a PNG, JPEG or WebP file made by the AUTOMATIC1111 web UI: `utils.infotext`).

A PNG records the canonical names (the registered sampler, its `sigma_schedule`), whatever name was typed.
The sampler tables import torch, so they are imported where a sampler is named, not when the command starts.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..builtin import DEFAULT_MODEL, builtin_names
from ..errors import ConfigError, UsageError
from ..generation.settings import with_schedule  # noqa: F401  (re-exported: it was defined here)
from ..utils.infotext import parse_infotext, settings_from_infotext

A1111_MODEL = "_a1111_model"        # keys of the dict `read_from_png` returns that are not settings
A1111_IGNORED = "_a1111_ignored"
A1111_REFINER = "_a1111_refiner"    # an A1111 PNG's "Refiner": a model of that machine, never a path here


def add_schedule_flag(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--schedule", default=None,
                     help="sigma schedule of the sampler: default, karras, exponential, sgm_uniform, simple, beta, "
                          "align_your_steps (A1111: Uniform, Karras, Exponential, SGM Uniform, Simple, Beta, Align "
                          "Your Steps, Automatic); only the sigma-space samplers have one (euler, heun, lms, dpm_2, "
                          "dpmpp_2m, dpmpp_sde ...: `latentdiff models`)")


def stored_from_infotext(text: str, *, where: str, recorded: tuple[str, ...]) -> dict[str, Any]:
    """The settings `--from` takes from an A1111 parameters text: those of `recorded` (the rest are listed under
    A1111_IGNORED, for one warning); the model only when it names a built-in one (else under A1111_MODEL)."""
    info = parse_infotext(text, where=where)
    known = (*recorded, "latentdiff")             # "Version: latentdiff X": note_from compares it with this one
    settings, ignored = settings_from_infotext(info, known=known, where=where)
    model = settings.pop("model", None)
    refiner = settings.pop("refiner", None)
    stored = {key: value for key, value in settings.items() if key in known and value is not None}
    if model is not None and model in builtin_names():
        stored["model"] = model
    elif model is not None:
        stored[A1111_MODEL] = model
    if refiner is not None:
        stored[A1111_REFINER] = refiner
    stored[A1111_IGNORED] = ignored
    return stored


def a1111_notes(path: str, stored: dict[str, Any], args: argparse.Namespace | None) -> list[str]:
    """The warning lines for what `--from` did not take from an A1111 text (printed by generate_settings.note_from)."""
    notes = []
    if stored.get(A1111_IGNORED):
        notes.append(f"{path}: A1111 settings latentdiff does not use, ignored: {', '.join(stored[A1111_IGNORED])}")
    if stored.get(A1111_MODEL) is not None:
        chosen = getattr(args, "model", None)
        using = f"--model {chosen}" if chosen else f"the default model {DEFAULT_MODEL} (pass --model to choose one)"
        notes.append(f"{path} was made with the A1111 model {stored[A1111_MODEL]!r}, not a latentdiff model: "
                     f"using {using}")
    return notes


def settle_sampler(values: dict[str, Any], origin: dict[str, str], warn: Any) -> None:
    """values["sampler"] / values["schedule"] (any accepted names) -> the registered sampler and its schedule,
    and values["sampler_options"]: the settings an A1111 label fixes (a latentdiff PNG's, read back with the
    registered name it records), in place; UsageErrors name the flag or file key. A schedule or options from a lower
    place than the sampler's (a --from file's, when --sampler is given) belonged to the sampler replaced and are
    dropped; a file's schedule on a sampler that has none (A1111 writes its Schedule type for DDIM too, and ignores
    it) is dropped with a warning."""
    from ..diffusion.samplers.names import check_schedule, has_schedule, resolve_sampler, resolve_schedule  # torch

    name, schedule = values["sampler"], values.get("schedule")
    sampler_flag = name is not None and origin.get("sampler") == "--sampler"
    schedule_flag = schedule is not None and origin.get("schedule") == "--schedule"
    stored_options = None if sampler_flag else values.get("sampler_options")
    if schedule is not None and sampler_flag and not schedule_flag:
        schedule = None
    values["sampler_options"] = None
    if name is None:        # the folder's own sampler: its schedule is checked once it is loaded
        values["schedule"] = None if schedule is None else resolve_schedule(schedule, where=origin["schedule"])
        return
    resolved = resolve_sampler(name, schedule=schedule, where=origin["sampler"], schedule_where=origin["schedule"])
    chosen = resolved.schedule
    where = origin["sampler"] if schedule is None else f"{origin['schedule']}, {origin['sampler']}"
    try:
        check_schedule(resolved.name, chosen, where=where)
    except UsageError:
        if schedule_flag or sampler_flag:
            raise
        warn(f"{where}: the {chosen} schedule is not implemented for the {resolved.name} sampler: using its own "
             "timesteps")
        chosen = None
    values["sampler"], values["schedule"] = resolved.name, chosen if has_schedule(resolved.name) else None
    options = dict(resolved.options) or stored_options
    if options is not None:
        check_sampler_options(resolved.name, options, where=origin.get("sampler_options", "sampler_options"))
    values["sampler_options"] = options or None


def check_sampler_options(name: str, options: Any, *, where: str) -> None:
    """A UsageError naming `where` unless `options` (a PNG's: untrusted) are settings the sampler `name` has, with
    values it takes."""
    from ..registry import SAMPLERS

    fields = {f.name for f in dataclasses.fields(SAMPLERS.get(name))} - {"sigma_schedule", "ays_model"}
    if not isinstance(options, dict) or not set(options) <= fields:
        raise UsageError(f"bad sampler options for the {name} sampler", where=where,
                         expected=f"an object of its settings ({', '.join(sorted(fields))})", found=repr(options)[:120])
    try:
        SAMPLERS.get(name)(**options)
    except (ConfigError, TypeError, ValueError) as exc:
        raise UsageError(f"bad sampler options for the {name} sampler", where=where, expected="values it takes",
                         found=repr(options)[:120], hint=str(exc)[:200]) from None
