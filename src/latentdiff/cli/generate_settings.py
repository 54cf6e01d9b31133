"""What `latentdiff generate` is asked to do, checked before the model is loaded: the settings (a typed, frozen
`GenerateSettings`, settled from the flags, the PNG of `--from` and the model's `latentdiff_generate.json`), and
the images to write (`Job`s: prompts, seeds, output paths). `GenerateSettings` and the tables of what a PNG records
(`RECORDED`, `OPTIONAL`, `FLAGS`, `DTYPES`) are `latentdiff.generation.settings`, below the command line so that the
server builds them too; they stay importable from here.

The three sources are read as they are (JSON may hold anything); `settle` picks each setting from the first
source that has it and checks its type and range, naming the flag or file key it came from, before it becomes
a field of `GenerateSettings`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import limits
from ..builtin import GENERATE_SETTINGS
from ..config import is_int, is_real
from ..errors import UsageError
from ..generation.settings import (  # noqa: F401  (re-exported: they were defined here)
    DTYPES,
    FLAGS,
    OPTIONAL,
    RECORDED,
    GenerateSettings,
)
from ..version import __version__
from .generate_a1111 import a1111_notes, settle_sampler, stored_from_infotext
from .generate_model import SINGLE_FILE_SUFFIXES, ModelSource, local_kind
from .generate_outputs import name_files, read_outputs
from .generate_quantize import check_quantize_value
from .generate_tome import check_fast_values

MAX_SEED = 2**63 - 1
PATH_VALUES = ("model", "tokenizer", "init_image", "mask", "vae", "refiner", "tokenizer_2")   # naming files
MAX_PATH_CHARS = 4096


@dataclasses.dataclass(frozen=True)
class Job:
    """One prompt: its text, the seed of its first image, and where its images (and grid) go."""

    prompt: str
    seed: int
    images: tuple[Path, ...]    # image i (seed + i)
    grid: Path | None = None    # --grid with n > 1

    @property
    def path(self) -> Path:
        """The file that shows the whole prompt: its grid, else its first image."""
        return self.grid or self.images[0]


# ---- the settings --------------------------------------------------------------------------------------------
def read_from_png(path: str) -> dict[str, Any]:
    """The generation parameters stored in an image written by `latentdiff generate` (PNG, JPEG, WebP; values as
    stored), or the settings of the A1111 parameters text of an image without latentdiff's (generate_a1111)."""
    from PIL import Image

    from ..utils.images import read_image_params

    if not Path(path).is_file():
        raise UsageError("no such file", where="--from", expected="a PNG written by latentdiff generate", found=path)
    try:
        params, infotext = read_image_params(path)
    except (OSError, ValueError, SyntaxError, RecursionError, Image.DecompressionBombError) as e:
        raise UsageError(f"cannot read the latentdiff parameters of this file ({type(e).__name__})", where=path,
                         expected="a PNG written by latentdiff generate") from None
    if params is None and infotext is not None:
        return stored_from_infotext(infotext, where=f"{path}: parameters", recorded=RECORDED)
    missing = [key for key in ("prompt", "seed", "n", "model") if key not in params] if isinstance(params, dict) \
        else ["prompt", "seed", "n", "model"]
    if not isinstance(params, dict) or missing:
        raise UsageError("this PNG holds no latentdiff generation parameters", where=path,
                         expected="a PNG written by latentdiff generate, or an image with A1111's parameters",
                         found=f"missing {missing}",
                         hint="give the prompt and the flags yourself")
    for key in PATH_VALUES:   # a PNG is untrusted input: what names a file must be a plain path or name
        value = params.get(key)
        required = key == "model"
        if (value is not None or required) and (not isinstance(value, str) or not value.strip()
                                                or len(value) > MAX_PATH_CHARS or any(ord(c) < 32 for c in value)):
            raise UsageError(f"the PNG's {key} is not a model name or path", where=f"{path}: {key}",
                             expected="a built-in model name, a Hub id, or a path", found=repr(value)[:200],
                             hint=f"give {FLAGS[key]} yourself")
    return {key: params[key] for key in (*RECORDED, "latentdiff", "batch") if key in params}


def note_from(path: str, stored: dict[str, Any], args: argparse.Namespace | None = None) -> None:
    """One line each when `--from` cannot promise the same bytes: another version, or a shared batch; and one
    naming each local path the PNG (not a flag) chose, before anything is read from it: an image from elsewhere
    never makes latentdiff read a file on this machine silently."""
    for note in a1111_notes(path, stored, args):
        warn(note)
    for key in PATH_VALUES:
        value = stored.get(key)
        if isinstance(value, str) and getattr(args, key, None) is None and local_kind(value) is not None:
            warn(f"{path} names the local {key} {Path(value).expanduser().resolve()}: using it "
                 f"(pass {FLAGS[key]} to choose another)")
    if stored.get("latentdiff") not in (None, __version__):
        warn(f"{path} was made with latentdiff {stored['latentdiff']}, this is {__version__}")
    n = stored["n"] if isinstance(stored.get("n"), int) else 1
    if isinstance(stored.get("batch"), int) and stored["batch"] > n:   # its images shared a call with others
        warn(f"{path} was made in a batch of {stored['batch']} images: the copy agrees to float rounding, "
             "not byte for byte (see docs/cli.md)")


def warn(message: str) -> None:
    print(f"latentdiff: warning: {message}", file=sys.stderr)


def settle(args: argparse.Namespace, stored: dict[str, Any], source: ModelSource) -> GenerateSettings:
    """Each setting from the first place that has it: flag, --from PNG, the model's settings; then checked.
    None: the pipeline's default (filled in by `finish`)."""
    values: dict[str, Any] = dict.fromkeys(RECORDED)
    origin = dict(FLAGS)
    places = ((vars(args), FLAGS), (stored, {k: f"{args.from_png}: {k}" for k in RECORDED}),
              (source.settings, {k: f"{source.path / GENERATE_SETTINGS}: {k}" for k in RECORDED}))
    for key in RECORDED:
        found = next(((place[key], where[key]) for place, where in places if place.get(key) is not None), None)
        if found is not None:
            values[key], origin[key] = found
    defaults = {"seed": 0, "n": 1, "dtype": "auto"}
    values |= {key: default for key, default in defaults.items() if values[key] is None}
    if isinstance(values["dtype"], str):
        values["dtype"] = DTYPES.get(values["dtype"], values["dtype"])
    values.update(model=source.name)
    for key in ("tokenizer", "tokenizer_2"):
        if isinstance(values[key], str) and local_kind(values[key]) == "dir":
            values[key] = str(Path(values[key]).expanduser().resolve())   # --from works from anywhere
    check_values(values, origin)
    return GenerateSettings(**values)


def settle_dtype(settings: GenerateSettings, *, device: Any, show: bool) -> GenerateSettings:
    """--dtype auto (the default) -> the dtype `utils.dtypes.resolve_torch_dtype` picks for the device and model,
    printed with its reason unless it is float32 (the default before "auto"); the PNGs then record the dtype used,
    so --from repeats it on another machine."""
    if settings.dtype != "auto":
        return settings
    import torch

    from ..utils.dtypes import resolve_torch_dtype

    if device is None:   # as load_pipeline chooses
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, reason = resolve_torch_dtype("auto", device=device, model=settings.model)
    if show and dtype != torch.float32:   # float32, the old default, goes unsaid (the PNG records it either way)
        print(f"latentdiff: --dtype auto -> {reason}", file=sys.stderr)
    return dataclasses.replace(settings, dtype=str(dtype).removeprefix("torch."))


def check_values(values: dict[str, Any], origin: dict[str, str]) -> None:
    """Type and range of every setting, with the flag or file key it came from."""
    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise UsageError(f"bad value for {key}", where=origin.get(key, key), expected=expected,
                             found=repr(values[key]))

    need(values["prompt"] is None or isinstance(values["prompt"], str), "prompt", "a string")
    need(values["negative"] is None or isinstance(values["negative"], str), "negative", "a string")
    # sizes within latentdiff.limits before anything is allocated (-n 10^6 or a PNG's height 10**30)
    need(is_int(values["n"]) and 1 <= values["n"] <= limits.MAX_IMAGES_PER_PROMPT, "n",
         f"an integer >= 1, at most {limits.MAX_IMAGES_PER_PROMPT} (limits.MAX_IMAGES_PER_PROMPT)")
    need(is_int(values["seed"]) and 0 <= values["seed"] <= MAX_SEED - values["n"] + 1, "seed",
         f"an integer in [0, {MAX_SEED} - n + 1]")
    need(values["steps"] is None or is_int(values["steps"]) and 1 <= values["steps"] <= limits.MAX_STEPS, "steps",
         f"an integer >= 1, at most {limits.MAX_STEPS} (limits.MAX_STEPS)")
    for key in ("height", "width"):
        need(values[key] is None or is_int(values[key]) and 0 < values[key] <= limits.MAX_SIDE, key,
             f"a positive integer, at most {limits.MAX_SIDE} (limits.MAX_SIDE)")
    if values["height"] is not None and values["width"] is not None:
        pixels = values["height"] * values["width"] * values["n"]
        if pixels > limits.DEFAULT_MAX_PIXELS:
            raise UsageError("height x width x n is more pixels than one call may generate",
                             where=f"{origin['height']}, {origin['width']}, {origin['n']}",
                             expected=f"at most {limits.DEFAULT_MAX_PIXELS} (limits.DEFAULT_MAX_PIXELS)",
                             found=f"{values['height']} x {values['width']} x {values['n']} = {pixels}",
                             hint="lower -n or the size (the Python API takes max_pixels= to raise the limit)")
    for key in ("guidance", "eta"):
        need(values[key] is None or _finite(values[key]) and values[key] >= 0, key, "a number >= 0")
    need(values["dtype"] in DTYPES.values(), "dtype", f"one of {sorted(set(DTYPES.values()))}")
    for key in ("tokenizer", "tokenizer_2"):
        need(values[key] is None or isinstance(values[key], str), key, "a string")
        if values[key] is not None and Path(values["model"]).suffix not in SINGLE_FILE_SUFFIXES:
            raise UsageError(f"{FLAGS[key]} is for single-file models (a folder has its own tokenizer)",
                             where=origin[key], expected="a .safetensors/.ckpt --model", found=values["model"])
    check_sampler(values, origin)
    check_fast_values(values, origin)
    check_quantize_value(values, origin)


def _finite(value: Any) -> bool:
    """A real number that a float holds, and not NaN or Inf (an int of 400 digits does not fit a float)."""
    try:
        return is_real(value) and math.isfinite(float(value))
    except OverflowError:
        return False


def check_sampler(values: dict[str, Any], origin: dict[str, str]) -> None:
    """A sampler by any accepted name (made the registered one, with its schedule: generate_a1111), that takes eta
    when one is given."""
    from ..registry import SAMPLERS

    settle_sampler(values, origin, warn)
    name, eta = values["sampler"], values["eta"]
    if name is None:
        return              # the folder's own sampler: `finish` checks eta against it
    cls = SAMPLERS.get(name)
    if eta is not None:
        if "eta" not in {f.name for f in dataclasses.fields(cls)}:
            raise UsageError(f"the {name} sampler has no eta", where=origin["eta"],
                             expected="no --eta, or a sampler with one (ddim)", found=eta)
        cls(eta=float(eta))   # its own range check (a ConfigError)


# ---- the images to write -------------------------------------------------------------------------------------
def plan_jobs(args: argparse.Namespace, settings: GenerateSettings,
              share: Callable[[Any], Any] = lambda value: value) -> list[Job]:
    """The prompts, in order, each with the seed of its first image and its files (`generate_outputs`); checks
    prompts and outputs. `share`: the main process's value to every process (the folder's next number)."""
    n, seed = settings.n, settings.seed
    if args.prompts is None:
        if not settings.prompt:
            raise UsageError("no prompt given", where="prompt", expected='latentdiff generate "a prompt"',
                             hint="or --prompts FILE (one prompt per line), or --from PNG")
        prompts = [settings.prompt]
    elif args.prompt is not None or args.from_png is not None:
        raise UsageError("--prompts cannot be combined with a prompt or --from", where="--prompts",
                         expected="one of: PROMPT, --prompts FILE, --from PNG")
    outputs = read_outputs(args, many_prompts=args.prompts is not None)
    if args.prompts is not None:
        prompts = read_prompts(args.prompts)
    if seed + len(prompts) * n - 1 > MAX_SEED:
        raise UsageError("the seeds of this run overflow", where="--seed", expected=f"seed + images <= {MAX_SEED}",
                         found=seed)
    seeds = [seed + k * n for k in range(len(prompts))]
    files = name_files(outputs, seeds, n, share)
    return [Job(p, s, images, grid) for p, s, (images, grid) in zip(prompts, seeds, files, strict=True)]


def read_prompts(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 file, stripped; errors name the file and the line (and byte)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError("no such prompt file", where="--prompts", expected="a UTF-8 text file", found=path)
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError("the prompt file is not UTF-8", where=f"{path}, line {line}, byte {e.start}",
                         expected="UTF-8 text", found=f"byte 0x{data[e.start]:02x}",
                         hint="save the file as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError("the prompt file has no prompts", where=path, expected="one prompt per line",
                         found="only blank lines" if data.strip() == b"" and data else "an empty file")
    return prompts
