"""Samplers by the names people type: latentdiff's registered names, the AUTOMATIC1111 web UI's labels (its
k-diffusion aliases and the older combined labels such as "DPM++ 2M Karras" too), diffusers' scheduler class names,
and the sigma schedules by A1111's "Schedule type" names.

    resolve_sampler("DPM++ 2M Karras")                  SamplerName(name='dpmpp_2m', schedule='karras', ...)
    resolve_sampler("DPM++ 2M SDE Heun")                ... name='dpmpp_2m_sde', schedule='exponential',
                                                        options=(('noise_type', 'brownian'), ('solver_type', 'heun'))
    resolve_sampler("DPM++ 2M", schedule="Exponential") SamplerName(name='dpmpp_2m', schedule='exponential', ...)
    resolve_sampler("EulerAncestralDiscreteScheduler")  SamplerName(name='euler_ancestral', schedule=None, ...)
    sampler_from_name("euler_ancestral", base=pipe.sampler)  EulerAncestralSampler keeping the folder's spacing
    sampler_from_name("Euler a", base=pipe.sampler)     EulerAncestralSampler on A1111's grid, whatever the folder's

Matching ignores case, spaces and punctuation ("dpm++ 2m" = "DPMPP_2M" = "dpmpp_2m"; "++" reads as "pp"). What
each name means is what the tool it comes from computes:

* an A1111 label is A1111's sampler with A1111's "Automatic" schedule, that sampler's own default (since A1111 1.9:
  karras for DPM++ 2M, exponential for DPM++ 2M SDE, k-diffusion's uniform grid for the others); a schedule suffix
  ("DPM++ 2M Karras", A1111 before 1.9) or `schedule=` chooses another. A label of a sampler A1111 runs through
  k-diffusion also fixes A1111's grid (A1111_GRID: the model's sigmas alone, whatever spacing and offset the
  sampler it replaces had; "Uniform" interpolated in log sigma), and the sampler's other A1111 options
  (`SamplerName.options`, A1111_OPTIONS): Brownian-tree noise for the SDE samplers (A1111's
  `brownian_noise`), the next-to-last sigma dropped for DPM2, DPM2 a and DPM++ 3M SDE (`discard_next_to_last_sigma`),
  and "DPM++ 2M SDE Heun" is dpmpp_2m_sde with solver_type "heun";
* a diffusers class name, a registered name as spelled (`euler`, while "Euler" is A1111's) or a latentdiff class
  name is that sampler with the schedule it is
  switched from (diffusers' `from_config`: a folder's `use_karras_sigmas` is kept) unless `schedule=` says;
* ComfyUI's sampler names are registered names where latentdiff has the sampler ("uni_pc" and "uni_pc_bh2": UniPC
  with bh1 / bh2 at third order, ComfyUI's; "deis"); "UniPC" in any other spelling is A1111's, which is ComfyUI's
  uni_pc, while `unipc` as spelled is diffusers' UniPCMultistepScheduler with its defaults (bh2, second order);
* a name A1111 or diffusers has and latentdiff does not implement yet (DPM fast, Restart ...) is a
  UsageError saying so and naming the closest sampler latentdiff has; any other name is a UsageError listing the
  accepted ones (`accepted_names`).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

from ...errors import UsageError
from ...registry import SAMPLERS
from ...utils.infotext import A1111_SAMPLER_LABELS, A1111_SCHEDULE_LABELS, A1111_VARIANT_LABELS
from ..scheduler_io import FOREIGN_CLASSES, NATIVE_CLASSES
from .base import switch_sampler

# The schedule A1111's "Automatic" gives a sampler (its sampler options in A1111 >= 1.9); the others: "default".
A1111_AUTOMATIC: dict[str, str] = {"dpmpp_2m": "karras", "dpmpp_2m_sde": "exponential", "dpmpp_sde": "karras",
                                   "dpmpp_2s_ancestral": "karras", "dpmpp_3m_sde": "exponential", "dpm_2": "karras",
                                   "dpm_2_ancestral": "karras"}
# The other options A1111 runs a label's sampler with (its sampler options, modules/sd_samplers_kdiffusion.py, A1111
# >= 1.9): "brownian_noise" (a BrownianTreeNoiseSampler) and "discard_next_to_last_sigma"; registered names and
# diffusers class names keep the sampler's own defaults.
A1111_OPTIONS: dict[str, dict[str, Any]] = {
    "dpmpp_sde": {"noise_type": "brownian"}, "dpmpp_2m_sde": {"noise_type": "brownian"},
    "dpmpp_3m_sde": {"noise_type": "brownian", "discard_next_to_last_sigma": True},
    "dpm_2": {"discard_next_to_last_sigma": True}, "dpm_2_ancestral": {"discard_next_to_last_sigma": True},
}
# A1111 runs these samplers through k-diffusion, on grids built from the model's sigmas alone, whatever the folder's
# timestep spacing and offset: karras / exponential over [sigma_min, sigma_max] of the model, "Uniform" k-diffusion's
# `get_sigmas` (t evenly spaced from T - 1 to 0, sigma interpolated in log sigma), x_T started at sigma_0. Their
# labels set these settings, which give that grid (the linspace grid starts at t = T - 1 and ends at t = 0).
A1111_KDIFFUSION: tuple[str, ...] = ("euler", "euler_ancestral", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpm_2",
                                     "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_3m_sde")
A1111_GRID: dict[str, Any] = {"timestep_spacing": "linspace", "steps_offset": 0, "sigma_interpolation": "log"}
# A1111 labels that are a registered sampler with other settings than its own label's -> (sampler, settings).
A1111_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = A1111_VARIANT_LABELS
# A1111 labels latentdiff does not implement yet -> the closest sampler it has.
A1111_MISSING: dict[str, str] = {
    "DPM fast": "dpmpp_2m", "DPM adaptive": "dpmpp_2m", "Restart": "heun", "DDIM CFG++": "ddim",
}
# A1111's k-diffusion aliases (with "_ka": the karras variant, A1111 before 1.9).
A1111_ALIASES: dict[str, str] = {
    "k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "k_euler": "Euler", "k_lms": "LMS", "k_heun": "Heun",
    "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_2m_sde": "DPM++ 2M SDE", "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a",
    "k_dpmpp_2s_a": "DPM++ 2S a", "k_dpmpp_sde": "DPM++ SDE", "k_dpmpp_3m_sde": "DPM++ 3M SDE",
    "k_dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "k_dpm_fast": "DPM fast", "k_dpm_ad": "DPM adaptive",
}
# diffusers classes latentdiff does not implement (scheduler_io.FOREIGN_CLASSES and more) -> the closest it has.
DIFFUSERS_MISSING: dict[str, str] = {
    "DPMSolverSinglestepScheduler": "dpmpp_2m",
    "EDMEulerScheduler": "euler", "EDMDPMSolverMultistepScheduler": "dpmpp_2m",
    "IPNDMScheduler": "plms", "DDIMParallelScheduler": "ddim", "DDPMParallelScheduler": "ddpm",
}
# Schedules: latentdiff's `sigma_schedule` values and A1111's "Schedule type" labels; "automatic" = none chosen.
SCHEDULES = ("default", "karras", "exponential", "sgm_uniform", "simple", "beta", "align_your_steps")
SCHEDULE_ALIASES: dict[str, str | None] = {
    **{name: name for name in SCHEDULES}, **{label: name for name, label in A1111_SCHEDULE_LABELS.items()},
    "automatic": None,
}
SCHEDULES_MISSING = ("Polyexponential", "KL Optimal", "Align Your Steps GITS", "Align Your Steps 11",
                     "Align Your Steps 32", "Normal", "DDIM", "Turbo")
MAX_NAME_CHARS = 200


@dataclasses.dataclass(frozen=True)
class SamplerName:
    """What a name resolved to: the registered sampler, the schedule it asks for (None: keep the one switched from),
    the kind of name it was (registered, a1111, diffusers, class), and the other settings the name fixes as
    (setting, value) pairs (A1111_OPTIONS, A1111_VARIANTS; `sampler_from_name` sets them)."""

    name: str
    schedule: str | None
    kind: str
    options: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str | None          # None: not implemented yet
    schedule: str | None
    kind: str
    spelling: str             # as the tool spells it, for messages
    closest: str | None = None
    options: tuple[tuple[str, Any], ...] = ()   # settings the name fixes besides the schedule


def key(text: str) -> str:
    """The form names are compared in: lower case, "++" as "pp", letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("++", "pp"))


def _table() -> dict[str, _Entry]:
    table: dict[str, _Entry] = {}
    for name in SAMPLERS.names():
        table[key(name)] = _Entry(name, None, "registered", name)
        table[key(SAMPLERS.get(name).__name__)] = _Entry(name, None, "class", SAMPLERS.get(name).__name__)
    for diffusers_class, cls in NATIVE_CLASSES.items():
        registered: str = getattr(cls, "registry_name")   # noqa: B009 -- set by SAMPLERS.register, unknown to mypy
        table[key(diffusers_class)] = _Entry(registered, None, "diffusers", diffusers_class)
    for missing in (*FOREIGN_CLASSES, *DIFFUSERS_MISSING):
        table[key(missing)] = _Entry(None, None, "diffusers", missing, DIFFUSERS_MISSING[missing])
    labels: dict[str, tuple[str, dict[str, Any]]] = \
        {label: (name, {}) for name, label in A1111_SAMPLER_LABELS.items()} | A1111_VARIANTS
    for label, (name, settings) in labels.items():
        schedule = A1111_AUTOMATIC.get(name, "default") if has_schedule(name) else None
        grid = A1111_GRID if name in A1111_KDIFFUSION else {}
        options = tuple(sorted((grid | A1111_OPTIONS.get(name, {}) | settings).items()))
        table[key(label)] = _Entry(name, schedule, "a1111", label, options=options)
    for label, closest in A1111_MISSING.items():
        table[key(label)] = _Entry(None, None, "a1111", label, closest)
    for alias, label in A1111_ALIASES.items():
        table[key(alias)] = dataclasses.replace(table[key(label)], spelling=f"{alias} ({label})")
    return table


def has_schedule(name: str) -> bool:
    """Whether the registered sampler `name` has a `sigma_schedule` setting."""
    return "sigma_schedule" in {f.name for f in dataclasses.fields(SAMPLERS.get(name))}


def resolve_schedule(text: Any, *, where: str = "schedule") -> str | None:
    """A schedule name (latentdiff's or A1111's "Schedule type", any case) -> one of SCHEDULES, or None for
    "Automatic"; a UsageError naming `where` otherwise ("not implemented yet" for A1111's others)."""
    if not isinstance(text, str) or len(text) > MAX_NAME_CHARS:
        raise UsageError("a schedule must be a name", where=where, expected=_schedules_expected(),
                         found=repr(text)[:120])
    aliases = {key(alias): name for alias, name in SCHEDULE_ALIASES.items()}
    if key(text) in aliases:
        return aliases[key(text)]
    if key(text) in {key(label) for label in SCHEDULES_MISSING}:
        raise UsageError(f"the {text!r} schedule is not implemented yet in latentdiff", where=where,
                         expected=_schedules_expected(), found=repr(text), hint="the closest: karras")
    raise UsageError("unknown schedule", where=where, expected=_schedules_expected(), found=repr(text))


def _schedules_expected() -> str:
    return ("one of default (A1111: Uniform), karras, exponential, sgm_uniform, simple, beta, align_your_steps, "
            "automatic")


def resolve_sampler(text: Any, *, schedule: Any = None, where: str = "sampler",
                    schedule_where: str = "schedule") -> SamplerName:
    """The registered sampler and schedule a name stands for (module docstring); `schedule` (a name, None:
    not given) overrides the one the name implies. UsageErrors name `where` / `schedule_where`."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_NAME_CHARS:
        raise UsageError("a sampler must be a name", where=where, expected=_samplers_expected(),
                         found=repr(text)[:120], hint="`latentdiff models` lists every accepted name")
    table, wanted = _table(), key(text)
    entry, suffix = table.get(wanted), None
    if text.strip() in SAMPLERS.names():     # a registered name as spelled: itself, whatever A1111 means by it
        entry = _Entry(text.strip(), None, "registered", text.strip())
    if entry is None:    # A1111 before 1.9: "<sampler> <schedule>", and the "_ka" aliases
        for alias in sorted({*SCHEDULE_ALIASES, *SCHEDULES_MISSING, "ka"}, key=len, reverse=True):
            stem = wanted[:-len(key(alias))] if wanted.endswith(key(alias)) else ""
            if stem in table and table[stem].kind == "a1111" and (alias != "ka" or wanted.startswith("k")):
                entry, suffix = table[stem], "karras" if alias == "ka" else alias
                break
    if entry is None:
        close = difflib.get_close_matches(wanted, table, n=3, cutoff=0.6)
        raise UsageError("unknown sampler", where=where, expected=_samplers_expected(), found=repr(text),
                         hint=(f"did you mean {', '.join(table[k].spelling for k in close)}? " if close else "")
                         + "`latentdiff models` lists every accepted name")
    if entry.name is None:
        raise UsageError(f"the sampler {entry.spelling!r} is not implemented yet in latentdiff", where=where,
                         expected=f"an implemented sampler; the closest: {entry.closest} "
                                  f"({A1111_SAMPLER_LABELS.get(str(entry.closest), entry.closest)})",
                         found=repr(text), hint="`latentdiff models` lists the samplers latentdiff has")
    chosen = entry.schedule
    if suffix is not None:
        chosen = resolve_schedule(suffix, where=where)
    if schedule is not None:
        explicit = resolve_schedule(schedule, where=schedule_where)
        chosen = explicit if explicit is not None else chosen
    return SamplerName(entry.name, chosen, entry.kind, entry.options)


def _samplers_expected() -> str:
    return f"a registered sampler ({', '.join(SAMPLERS.names())}), an A1111 name or a diffusers scheduler class"


def check_schedule(name: str, schedule: str | None, *, where: str) -> None:
    """A UsageError naming `where` when `schedule` is karras / exponential and sampler `name` has no schedule."""
    if schedule in (None, "default") or has_schedule(name):
        return
    with_one = [n for n in SAMPLERS.names() if has_schedule(n)]
    raise UsageError(f"the {name} sampler has no schedule to set ({schedule} is not implemented for it yet)",
                     where=where, expected=f"no schedule, or a sampler with one ({', '.join(with_one)})",
                     found=schedule)


def sampler_from_name(text: str, *, schedule: str | None = None, base: Any = None) -> Any:
    """The sampler a name stands for, built as `switch_sampler` builds it from `base` (a pipeline's sampler: its
    timestep spacing and offset are kept, as diffusers' from_config keeps them, unless the name is an A1111 label,
    whose grid is A1111's; None: the sampler's defaults), with its schedule and the other settings the name fixes
    (`SamplerName.options`) set; a UsageError for a name or schedule it cannot be."""
    resolved = resolve_sampler(text, schedule=schedule)
    check_schedule(resolved.name, resolved.schedule, where="schedule")
    sampler = switch_sampler(base, resolved.name) if base is not None else SAMPLERS.get(resolved.name)()
    if resolved.schedule is not None and has_schedule(resolved.name):
        sampler = sampler.with_options(sigma_schedule=resolved.schedule)
    if resolved.options:
        sampler = sampler.with_options(**dict(resolved.options))
    return sampler


def schedule_options(schedule: str, *, pipeline: Any = None) -> dict[str, Any]:
    """The sampler settings a schedule chosen by name stands for: `sigma_schedule`, and for align_your_steps the
    table of `pipeline`'s model family, as A1111 picks it: "sdxl" for an SDXL pipeline (one with a second text
    encoder, `text_encoder_2`), "sd15" otherwise (NVIDIA published tables for SD 1.5 and SDXL only)."""
    options: dict[str, Any] = {"sigma_schedule": schedule}
    if schedule == "align_your_steps":
        sdxl = "text_encoder_2" in getattr(pipeline, "component_names", ())
        options["ays_model"] = "sdxl" if sdxl else "sd15"
    return options


def accepted_names() -> dict[str, list[str]]:
    """Every accepted name, grouped for `latentdiff models`: registered, A1111, diffusers, schedules, and the
    names known but not implemented yet."""
    table = _table().values()
    a1111 = [*A1111_SAMPLER_LABELS.values(), *A1111_VARIANTS]
    scheduled = [label for name, label in A1111_SAMPLER_LABELS.items() if has_schedule(name)] + \
        [label for label, (name, _) in A1111_VARIANTS.items() if has_schedule(name)]
    return {
        "registered": SAMPLERS.names(),
        "A1111": a1111 + [f"{label} Karras" for label in scheduled] + [f"{label} Exponential" for label in scheduled],
        "diffusers": sorted(e.spelling for e in table if e.kind == "diffusers" and e.name is not None),
        "schedules": [*SCHEDULES, "uniform (= default)", "automatic (the sampler's A1111 default)"],
        "not implemented yet": sorted({e.spelling for e in table if e.name is None and "(" not in e.spelling}),
    }
