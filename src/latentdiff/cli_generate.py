"""`latentdiff generate`: text-to-image from the command line, reproducible from the PNG it writes.

    latentdiff generate "a red circle on the left, blue background" -o out.png     # the built-in model, offline
    latentdiff generate --from out.png -o again.png                                # the same pixels again
    latentdiff generate --prompts prompts.txt -o samples/ -n 4                     # one PNG (a grid) per prompt

Where each setting comes from, first found wins: a flag given on the command line; the PNG of `--from`;
the model folder's `latentdiff_generate.json` (the settings the model was evaluated at); the pipeline's
defaults. The effective values are what every PNG records (text chunk `latentdiff`, JSON).

Seeds: image i (0-based) of prompt k (0-based, blank lines not counted) has the seed `seed + k * n + i`,
so every image of a run has its own seed; a single prompt is prompt 0 (seeds seed .. seed + n - 1). A PNG
records the seed of its first image and n, so `--from` on any file of a `--prompts` run reproduces it (byte
for byte when it was alone in its batch: the matrix products of a batch may round differently).

Everything a user can get wrong is checked before the model is loaded; under `accelerate launch` the
prompts' batches are dealt out to the processes in turn (batch j to process j mod P), so each image is
computed in the same batch as in a one-process run and the files are the same bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from . import builtin
from .version import __version__
from .builtin import DEFAULT_MODEL, GENERATE_SETTINGS, builtin_names, builtin_path
from .errors import ConfigError, InputError

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
# latentdiff_generate.json key -> the setting it gives ("_"-prefixed keys are comments)
SETTINGS_KEYS = {"num_inference_steps": "steps", "guidance_scale": "guidance", "sampler": "sampler", "eta": "eta",
                 "height": "height", "width": "width", "negative_prompt": "negative"}
# The settings a PNG records and `--from` reads back; a flag given overrides the stored value.
RECORDED = ("prompt", "negative", "seed", "steps", "guidance", "sampler", "eta", "height", "width", "n", "model",
            "dtype", "tokenizer")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
MAX_SEED = 2**63 - 1
FLAGS = {key: f"--{key}" for key in RECORDED} | {"prompt": "PROMPT", "n": "-n"}   # for messages


class UsageError(InputError):
    """An InputError with a hint line for the command line."""

    def __init__(self, message: str, *, hint: str | None = None, **details: Any):
        super().__init__(message, **details)
        self.hint = hint


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: kind is "builtin", "folder", "hub" or "single_file"."""

    name: str               # as given (recorded in the PNG)
    kind: str
    path: Path              # the folder (a Hub snapshot), or the single file
    settings: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Job:
    """One PNG: a prompt, the seed of its first image, and where it goes."""

    prompt: str
    seed: int
    path: Path


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate images from a prompt (the built-in model by default)",
                         description="Generate images; flags not given come from --from, then the model's "
                                     f"{GENERATE_SETTINGS}, then the pipeline. See docs/cli.md.")
    gen.add_argument("prompt", nargs="?", default=None, help="the text prompt")
    gen.add_argument("-o", "--output", default=None,
                     help="PNG to write (default out.png; a grid when -n > 1); with --prompts: an existing folder")
    gen.add_argument("--model", default=None,
                     help=f"built-in name ({', '.join(builtin_names())}; default {DEFAULT_MODEL}), a diffusers "
                          "folder, a Hub id, or a single .safetensors/.ckpt file")
    gen.add_argument("--tokenizer", default=None,
                     help="tokenizer folder or Hub id for a single-file --model (single files carry none)")
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--steps", type=int, default=None, help="number of sampling steps")
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    gen.add_argument("--seed", type=int, default=None, help="seed of the first image (default 0); see docs/cli.md")
    gen.add_argument("-n", type=int, default=None, help="images per prompt, saved as one grid (default 1)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--sampler", default=None, help="a registered sampler name (`latentdiff models` lists them)")
    gen.add_argument("--eta", type=float, default=None, help="DDIM eta (0: deterministic)")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    gen.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default float32")
    gen.add_argument("--prompts", default=None, metavar="FILE", help="one prompt per line (blank lines ignored)")
    gen.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call with --prompts")
    gen.add_argument("--from", dest="from_png", default=None, metavar="PNG",
                     help="reproduce a PNG written by latentdiff generate (flags given override its values)")
    gen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")


def cmd_generate(args: argparse.Namespace) -> int:
    device = check_device(args.device)
    procs = Processes.start(cpu=device is not None and device.type == "cpu")
    stored = read_from_png(args.from_png) if args.from_png else {}
    source = locate_model(args.model or stored.get("model") or DEFAULT_MODEL)
    values = settle(args, stored, source)
    jobs = plan_jobs(args, values)
    if args.from_png and procs.is_main:
        note_from(args.from_png, stored)
    texts = [job.prompt for job in jobs] + [values["negative"] or ""]
    checked = procs.is_main and warn_unknown_words(tokenizer_file(source, values), texts)
    pipe = load_pipeline(source, values, device=device or procs.device)
    if procs.is_main and not checked:
        warn_unknown_words(tokenizer_file(source, values), texts)   # a Hub model's tokenizer, now downloaded
    values = finish(values, pipe)
    batch_size = args.batch_size if args.prompts else 1
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    mine = batches[procs.index::procs.count]
    run(pipe, mine, values, show=procs.is_main)
    if procs.count > 1:
        print(f"latentdiff: process {procs.index} of {procs.count} wrote {sum(map(len, mine))} file(s)",
              file=sys.stderr)
    procs.finish()
    if procs.is_main:
        print(args.output if args.prompts else jobs[0].path)
    return 0


# ---- checks, before the model is loaded --------------------------------------------------------------------
def check_device(spec: str | None) -> Any:
    """The torch.device of --device (None: not given), checked to exist here."""
    if spec is None:
        return None
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError("not a device name", where="--device", expected="cpu, cuda, cuda:1, mps ...",
                         found=spec) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("CUDA is not available on this machine", where="--device", expected="cpu", found=spec,
                         hint="`latentdiff info` lists the devices torch sees")
    return device


def read_from_png(path: str) -> dict[str, Any]:
    """The generation parameters stored in a PNG written by `latentdiff generate`."""
    from .utils.images import read_png_params

    if not Path(path).is_file():
        raise UsageError("no such file", where="--from", expected="a PNG written by latentdiff generate", found=path)
    try:
        params = read_png_params(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the latentdiff parameters of this file ({type(e).__name__})", where=path,
                         expected="a PNG written by latentdiff generate") from None
    missing = [key for key in ("prompt", "seed", "n", "model") if key not in (params or {})]
    if not isinstance(params, dict) or missing:
        raise UsageError("this PNG holds no latentdiff generation parameters", where=path,
                         expected="a PNG written by latentdiff generate", found=f"missing {missing}",
                         hint="give the prompt and the flags yourself")
    return {key: params[key] for key in (*RECORDED, "latentdiff", "batch") if key in params}


def note_from(path: str, stored: dict[str, Any]) -> None:
    """One line each when `--from` cannot promise the same bytes: another version, or a shared batch."""
    if stored.get("latentdiff") not in (None, __version__):
        warn(f"{path} was made with latentdiff {stored['latentdiff']}, this is {__version__}")
    if isinstance(stored.get("batch"), int) and stored["batch"] > 1:
        warn(f"{path} was made in a batch of {stored['batch']} prompts: the copy agrees to float rounding, "
             "not byte for byte (see docs/cli.md)")


def locate_model(model: str) -> ModelSource:
    """Find the model without loading it: a single file, a folder, a built-in name, or a Hub id."""
    path = Path(model).expanduser()
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise UsageError("no such checkpoint file", where="--model", expected="an existing .safetensors/.ckpt",
                             found=model)
        return ModelSource(model, "single_file", path, {})
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UsageError("this folder is not a pipeline folder (no model_index.json)", where=model,
                             expected="a diffusers-format folder")
        return ModelSource(model, "folder", path, read_settings(path))
    if model in builtin.BUILTIN_MODELS:
        folder = builtin_path(model)
        if folder is None:
            missing = builtin.ROOT / builtin.BUILTIN_MODELS[model] / "model_index.json"
            raise UsageError("the built-in model is not installed in this copy of latentdiff", where=model,
                             expected=str(missing), found="no such file",
                             hint="reinstall latentdiff, or pass --model FOLDER")
        return ModelSource(model, "builtin", folder, read_settings(folder))
    known = f"a built-in model ({', '.join(builtin_names())}), a folder, a .safetensors/.ckpt file, or a Hub id"
    if path.exists() or not HUB_ID.match(model):
        raise UsageError("no such model folder or file", where="--model", expected=known, found=model)
    folder = find_on_hub(model, known)
    return ModelSource(model, "hub", folder, read_settings(folder))


def find_on_hub(model: str, known: str) -> Path:
    """The Hub snapshot of `model` holding model_index.json (and the generate settings when the repo has them)."""
    from . import hub
    from .errors import CheckpointError

    hint = f"built-in models: {', '.join(builtin_names())}"
    if hub.is_offline():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model, "model_index.json")
        except ValueError:           # not a valid repo id
            cached = None
        if not isinstance(cached, str):
            raise UsageError("unknown model: not built in, not a folder, and not in the Hub cache (offline)",
                             where="--model", expected=known, found=model, hint=hint)
        return Path(cached).parent
    try:
        return hub.resolve(model, allow_patterns=["model_index.json", GENERATE_SETTINGS])
    except CheckpointError as e:
        raise UsageError(f"unknown model ({e.message})", where="--model", expected=known, found=model,
                         hint=hint) from None


def read_settings(folder: Path) -> dict[str, Any]:
    """latentdiff_generate.json as {setting: value} ({} when the folder has none); unknown keys are errors."""
    where = str(folder / GENERATE_SETTINGS)
    try:
        data = builtin.generate_settings(folder)
    except (ValueError, OSError) as e:
        raise ConfigError(f"cannot read the model's generate settings ({e})", where=where) from None
    unknown = sorted(k for k in data if k not in SETTINGS_KEYS and not k.startswith("_"))
    if unknown:
        raise ConfigError("unknown key(s) in the generate settings", where=where, expected=sorted(SETTINGS_KEYS),
                          found=unknown)
    return {SETTINGS_KEYS[k]: v for k, v in data.items() if k in SETTINGS_KEYS}


def settle(args: argparse.Namespace, stored: dict[str, Any], source: ModelSource) -> dict[str, Any]:
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
    defaults = {"seed": 0, "n": 1, "dtype": "float32"}
    values |= {key: default for key, default in defaults.items() if values[key] is None}
    values.update(model=source.name, dtype=DTYPES.get(values["dtype"], values["dtype"]))
    check_values(values, origin)
    return values


def check_values(values: dict[str, Any], origin: dict[str, str]) -> None:
    """Type and range of every setting, with the flag or file key it came from."""
    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise UsageError(f"bad value for {key}", where=origin.get(key, key), expected=expected,
                             found=repr(values[key]))

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    need(values["prompt"] is None or isinstance(values["prompt"], str), "prompt", "a string")
    need(values["negative"] is None or isinstance(values["negative"], str), "negative", "a string")
    need(is_int(values["n"]) and values["n"] >= 1, "n", "an integer >= 1")
    need(is_int(values["seed"]) and 0 <= values["seed"] <= MAX_SEED, "seed", f"an integer in [0, {MAX_SEED}]")
    need(values["steps"] is None or is_int(values["steps"]) and values["steps"] >= 1, "steps", "an integer >= 1")
    for key in ("height", "width"):
        need(values[key] is None or is_int(values[key]) and values[key] > 0, key, "a positive integer")
    for key in ("guidance", "eta"):
        need(values[key] is None or isinstance(values[key], (int, float)) and not isinstance(values[key], bool)
             and math.isfinite(values[key]) and values[key] >= 0, key, "a number >= 0")
    need(values["dtype"] in DTYPES.values(), "dtype", f"one of {sorted(set(DTYPES.values()))}")
    need(values["tokenizer"] is None or isinstance(values["tokenizer"], str), "tokenizer", "a string")
    if values["tokenizer"] is not None and Path(values["model"]).suffix not in SINGLE_FILE_SUFFIXES:
        raise UsageError("--tokenizer is for single-file models (a folder has its own tokenizer)",
                         where=origin["tokenizer"], expected="a .safetensors/.ckpt --model", found=values["model"])
    check_sampler(values, origin)


def check_sampler(values: dict[str, Any], origin: dict[str, str]) -> None:
    """A registered sampler name, that takes eta when one is given."""
    from .registry import SAMPLERS

    name, eta = values["sampler"], values["eta"]
    if name is None:
        return              # the folder's own sampler: `finish` checks eta against it
    if not isinstance(name, str) or name not in SAMPLERS:
        raise UsageError("unknown sampler", where=origin["sampler"], expected=f"one of {SAMPLERS.names()}",
                         found=repr(name), hint="`latentdiff models` lists the registered samplers")
    cls = SAMPLERS.get(name)
    if eta is not None:
        if "eta" not in {f.name for f in dataclasses.fields(cls)}:
            raise UsageError(f"the {name} sampler has no eta", where=origin["eta"],
                             expected="no --eta, or a sampler with one (ddim)", found=eta)
        cls(eta=float(eta))   # its own range check (a ConfigError)


def plan_jobs(args: argparse.Namespace, values: dict[str, Any]) -> list[Job]:
    """The PNGs to write, in order, each with the seed of its first image; checks prompts and outputs."""
    n, seed = values["n"], values["seed"]
    if args.prompts is None:
        if not values["prompt"]:
            raise UsageError("no prompt given", where="prompt", expected='latentdiff generate "a prompt"',
                             hint="or --prompts FILE (one prompt per line), or --from PNG")
        return [Job(values["prompt"], seed, single_output(args))]
    if args.prompt is not None or args.from_png is not None:
        raise UsageError("--prompts cannot be combined with a prompt or --from", where="--prompts",
                         expected="one of: PROMPT, --prompts FILE, --from PNG")
    if args.batch_size < 1:
        raise UsageError("bad value for --batch-size", where="--batch-size", expected=">= 1", found=args.batch_size)
    folder = Path(args.output) if args.output else None
    if folder is None or not folder.is_dir():
        raise UsageError("with --prompts, -o must be an existing folder", where="-o", expected="an existing folder",
                         found=args.output, hint="create it first (mkdir)")
    prompts = read_prompts(args.prompts)
    if seed + len(prompts) * n - 1 > MAX_SEED:
        raise UsageError("the seeds of this run overflow", where="--seed", expected=f"seed + images <= {MAX_SEED}",
                         found=seed)
    return [Job(p, seed + k * n, folder / f"{k:05d}.png") for k, p in enumerate(prompts)]


def single_output(args: argparse.Namespace) -> Path:
    """-o of a one-prompt run: a .png in an existing folder (--from without -o: <name>-reproduced.png beside it)."""
    if args.output is not None:
        output = Path(args.output)
    elif args.from_png is not None:
        output = Path(args.from_png).with_name(Path(args.from_png).stem + "-reproduced.png")
    else:
        output = Path("out.png")
    if output.suffix.lower() != ".png" or output.is_dir():
        raise UsageError("the output must be a .png file", where="-o", expected="a path ending in .png",
                         found=str(output), hint="use --prompts FILE to write a folder of images")
    if not output.parent.is_dir():
        raise UsageError("the output folder does not exist", where="-o", expected="an existing folder",
                         found=str(output.parent), hint="create it first (mkdir)")
    return output


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


def tokenizer_file(source: ModelSource, values: dict[str, Any]) -> Path | None:
    """Where the model's `tokenizers` file would be on this machine (None: a single file without --tokenizer)."""
    if source.kind != "single_file":
        return source.path / "tokenizer" / "tokenizer.json"
    return None if values["tokenizer"] is None else Path(values["tokenizer"]) / "tokenizer.json"


def warn_unknown_words(file: Path | None, texts: list[str]) -> bool:
    """Warn (one line) about words a word-level tokenizer maps to [UNK]; False when there is no tokenizer.json
    here (yet: a Hub model before its download)."""
    if file is None or not file.is_file():
        return False
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(file))
    if type(tokenizer.model).__name__ != "WordLevel":
        return True   # sub-word tokenizers have no unknown words to speak of
    unk_id = tokenizer.token_to_id(tokenizer.model.unk_token)
    unknown: list[str] = []
    for text in texts:
        encoding = tokenizer.encode(text, add_special_tokens=False)
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            if token_id == unk_id and text[start:end] not in unknown:
                unknown.append(text[start:end])
    if unknown:
        warn(f"not in the model's vocabulary, mapped to {tokenizer.model.unk_token}: "
             f"{', '.join(map(repr, unknown))}")
    return True


def warn(message: str) -> None:
    print(f"latentdiff: warning: {message}", file=sys.stderr)


# ---- processes, the model, the run -------------------------------------------------------------------------
@dataclasses.dataclass
class Processes:
    """This process's place among those `accelerate launch` started (index 0 of 1 when run alone)."""

    index: int = 0
    count: int = 1
    device: Any = None
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @classmethod
    def start(cls, *, cpu: bool) -> "Processes":
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch
        from accelerate import PartialState

        cpu = cpu or not torch.cuda.is_available()   # without cpu=True accelerate makes no CPU process group
        state = PartialState(cpu=cpu)
        return cls(state.process_index, state.num_processes, torch.device("cpu") if cpu else state.device, state)

    def finish(self) -> None:
        """Wait for every process, so the main one reports only once all files are written."""
        if self.state is not None:
            self.state.wait_for_everyone()
            self.state.destroy_process_group()


def load_pipeline(source: ModelSource, values: dict[str, Any], *, device: Any) -> Any:
    """The text-to-image pipeline in the chosen dtype on the chosen device, with the chosen sampler."""
    import torch

    from .diffusion.samplers import switch_sampler
    from .pipelines.latent_diffusion import LatentDiffusionPipeline

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load = dict(torch_dtype=getattr(torch, values["dtype"]), device=device)
    if source.kind == "single_file":
        tokenizer = {} if values["tokenizer"] is None else {"tokenizer": values["tokenizer"]}
        pipe = LatentDiffusionPipeline.from_single_file(source.path, **load, **tokenizer)
    else:
        pipe = LatentDiffusionPipeline.from_pretrained(source.name if source.kind == "hub" else source.path, **load)
    pipe.sampler = switch_sampler(pipe.sampler, values["sampler"])
    return pipe


def finish(values: dict[str, Any], pipe: Any) -> dict[str, Any]:
    """The pipeline's defaults for the settings still None; the effective values every PNG records."""
    import inspect

    defaults = inspect.signature(type(pipe).__call__).parameters
    height, width = pipe.image_size(values["height"], values["width"])
    sampler = pipe.sampler_for(None if values["eta"] is None else float(values["eta"]))
    return values | dict(
        steps=values["steps"] or defaults["num_inference_steps"].default,
        guidance=float(defaults["guidance_scale"].default if values["guidance"] is None else values["guidance"]),
        sampler=sampler.registry_name, eta=getattr(sampler, "eta", None), height=height, width=width)


def run(pipe: Any, batches: list[list[Job]], values: dict[str, Any], *, show: bool) -> None:
    """Generate and save each batch; one progress bar over this process's images."""
    import torch
    from tqdm.auto import tqdm

    from .utils.images import make_grid, save_png

    n = values["n"]
    with tqdm(total=sum(len(b) for b in batches) * n, unit="image", disable=None if show else True) as bar:
        for batch in batches:
            generators = [torch.Generator().manual_seed(job.seed + i) for job in batch for i in range(n)]
            images = pipe([job.prompt for job in batch], negative_prompt=values["negative"], height=values["height"],
                          width=values["width"], num_inference_steps=values["steps"],
                          guidance_scale=values["guidance"], eta=values["eta"], num_images_per_prompt=n,
                          generator=generators, progress=False).images
            for k, job in enumerate(batch):
                mine = images[k * n:(k + 1) * n]
                params = values | {"prompt": job.prompt, "seed": job.seed, "latentdiff": __version__,
                                   "batch": len(batch)}
                save_png(mine[0] if n == 1 else make_grid(mine), job.path, params=params)
                bar.update(n)

