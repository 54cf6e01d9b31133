"""`latentdiff generate`: text-to-image from the command line, reproducible from the PNG it writes.

    latentdiff generate "a red circle on the left, blue background" -o out.png --seed 0   # the built-in model
    latentdiff generate --from out.png -o again.png                                # the same pixels again
    latentdiff generate "a red circle" -n 4 --grid                 # ./outputs/00000-<seed>.png ... and a grid
    latentdiff generate --prompts prompts.txt -o samples/ -n 4     # samples/NNNNN-<seed>.png, one per image

Where each setting comes from, first found wins: a flag given on the command line; the PNG of `--from`;
the model folder's `latentdiff_generate.json` (the settings the model was evaluated at); the pipeline's
defaults. The effective values are what every PNG records (text chunk `latentdiff`, JSON).

Seeds: `--seed -1` or no `--seed` (and no `--from` PNG's) draws a random seed in [0, 2**32), printed
(`latentdiff: seed N`) and recorded. Image i (0-based) of prompt k (0-based, blank lines not counted) has the seed
`seed + k * n + i`, whatever the batching (`--batch-size`, `--batch-count`), so every image of a run has its own
seed; a single prompt is prompt 0 (seeds seed .. seed + n - 1). Each image is its own file, recording its own
seed (and n = 1); a grid (`--grid`) records the seed of its first image and n. So `--from` on any file reproduces
it (byte for byte when its images were alone in their call: the matrix products of a batch may round differently).

Files are never replaced without `--overwrite`: auto-numbered names in a folder, and an error for an existing
`-o FILE` (generate_outputs). Progress is a bar per denoising step on a terminal, plain lines in logs.

Everything a user can get wrong is checked before the model is loaded (generate_model, generate_settings,
generate_outputs); under `accelerate launch` the random seed and the folder's next number are the main process's,
and the groups of calls are dealt out to the processes in turn (group j to process j mod P), so each image is
computed in the same call as in a one-process run and the files are the same bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from ..builtin import DEFAULT_MODEL, GENERATE_SETTINGS, builtin_names
from ..errors import UsageError
from ..generation.settings import (  # noqa: F401  (re-exported: defined or imported here before the server used them)
    inpainting_folder,
    load_pipeline,
    load_vae,
    model_family,
    with_schedule,
)
from ..version import __version__
from . import generate_outputs as outputs
from .generate_a1111 import add_schedule_flag
from .generate_adapters import add_lora_flags, apply_loras, settle_loras
from .generate_control import add_control_flags, apply_control, settle_control
from .generate_embeddings import add_embedding_flags, apply_embeddings, settle_embeddings
from .generate_fast import add_fast_flags, apply_fast, settle_fast
from .generate_inputs import add_input_flags, prepare_run, set_threads, settle_inputs, size_from_image
from .generate_model import ModelSource, locate_model, tokenizer_file  # noqa: F401  (ModelSource: re-exported)
from .generate_previews import add_preview_flags, check_preview_flags, make_preview, settle_fast_decode
from .generate_prompts import add_prompt_flags, settle_prompts
from .generate_quantize import add_cpu_flags, apply_quantize, check_quantize
from .generate_sdxl import add_sdxl_flags, check_loaded, is_sdxl, settle_sdxl
from .generate_settings import (
    DTYPES,
    FLAGS,
    GenerateSettings,
    Job,
    note_from,
    plan_jobs,
    read_from_png,
    settle,
    settle_dtype,
    warn,
)
from .generate_tome import add_tome_flags

T = TypeVar("T")


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate images from a prompt (the built-in model by default)",
                         description="Generate images; flags not given come from --from, then the model's "
                                     f"{GENERATE_SETTINGS}, then the pipeline. See docs/cli.md.")
    gen.add_argument("prompt", nargs="?", default=None, help="the text prompt")
    gen.add_argument("-o", "--output", default=None,
                     help="an existing folder (default ./outputs/): auto-numbered NNNNN-SEED.png files; or one "
                          "FILE.png (several images: FILE-0.png ...); never over a file without --overwrite")
    gen.add_argument("--model", default=None,
                     help=f"built-in name ({', '.join(builtin_names())}; default {DEFAULT_MODEL}), a diffusers "
                          "folder, a Hub id, or a single .safetensors/.ckpt file")
    gen.add_argument("--tokenizer", default=None,
                     help="tokenizer folder or Hub id for a single-file --model (single files carry none)")
    gen.add_argument("--tokenizer-2", default=None,
                     help="an SDXL single file's second (OpenCLIP bigG) tokenizer: folder or Hub id")
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--steps", type=int, default=None, help="number of sampling steps")
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    gen.add_argument("--seed", type=int, default=None,
                     help="seed of the first image (-1 or not given: a random one, printed); see docs/cli.md")
    gen.add_argument("-n", type=int, default=None,
                     help="images per prompt, each its own file (default 1; batch size x batch count)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--sampler", default=None, help='a sampler: registered (dpmpp_2m), A1111 ("DPM++ 2M Karras", '
                                                    '"Euler a") or diffusers (EulerDiscreteScheduler) name; '
                                                    '`latentdiff models` lists them')
    gen.add_argument("--eta", type=float, default=None, help="DDIM eta (0: deterministic)")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    gen.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                     help="default auto: bfloat16 on a CPU with AMX-BF16 / AVX512-BF16 or a GPU with bf16, else "
                          "float32 (printed with the reason; docs/fast.md)")
    gen.add_argument("--prompts", default=None, metavar="FILE", help="one prompt per line (blank lines ignored)")
    gen.add_argument("--batch-size", type=int, default=None,
                     help=f"images per pipeline call (A1111's batch size; default {outputs.DEFAULT_BATCH_SIZE}, "
                          "1 with --batch-count)")
    gen.add_argument("--from", dest="from_png", default=None, metavar="PNG",
                     help="reproduce a PNG written by latentdiff generate (flags given override its values)")
    gen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    # ---- outputs ----
    outputs.add_output_flags(gen)
    # ---- names (part B) ----
    add_schedule_flag(gen)
    # ---- part C: image inputs, hires fix, performance flags, clip skip (generate_inputs) ----
    add_input_flags(gen)
    # ---- textual inversion (generate_embeddings) ----
    add_embedding_flags(gen)
    # ---- LoRA (generate_adapters) ----
    add_lora_flags(gen)
    # ---- prompt syntax (issue 16, generate_prompts) ----
    add_prompt_flags(gen)
    # ---- SDXL: refiner, micro-conditioning (issue 18, generate_sdxl) ----
    add_sdxl_flags(gen)
    # ---- ControlNet, T2I-Adapter, IP-Adapter (issue 19, generate_control) ----
    add_control_flags(gen)
    # ---- DeepCache, FreeU (issue 20, generate_fast) ----
    add_fast_flags(gen)
    # ---- tiny autoencoder: previews, --fast-decode (issue 20, generate_previews) ----
    add_preview_flags(gen)
    # ---- cheaper steps: ToMe, CFG truncation (issue 20, generate_tome) ----
    add_tome_flags(gen)
    # ---- CPU fast paths: --optimize-cpu, --quantize (issue 20, generate_quantize) ----
    add_cpu_flags(gen)


def cmd_generate(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    device = check_device(args.device)
    procs = Processes.start(cpu=device is not None and device.type == "cpu")
    stored = read_from_png(args.from_png) if args.from_png else {}
    source = locate_model(args.model or stored.get("model") or DEFAULT_MODEL)
    n, batch_size = outputs.images_per_prompt(args, stored)
    seed = outputs.choose_seed(args, stored, procs.share)
    drawn = seed is not None and seed != args.seed      # --seed -1 or none: a random seed, printed once checked
    args = argparse.Namespace(**vars(args) | {"n": n, "seed": args.seed if seed is None else seed})
    settings = settle(args, stored, source)
    settings, images = settle_inputs(args, stored, settings)
    settings, embeddings = settle_embeddings(args, settings)
    settings = settle_loras(args, stored, settings)
    settings = settle_prompts(args, settings)
    settings = settle_sdxl(args, stored, settings, source)
    settings = settle_control(args, stored, settings)
    settings = settle_fast(args, settings)
    settings = settle_fast_decode(args, settings)
    check_preview_flags(args, settings.model)
    jobs = plan_jobs(args, settings, procs.share)
    if procs.is_main and drawn:
        print(f"latentdiff: seed {seed}", file=sys.stderr)
    if args.from_png and procs.is_main:
        note_from(args.from_png, stored, args)
    texts = [job.prompt for job in jobs] + [settings.negative or ""]
    checked = procs.is_main and warn_unknown_words(tokenizer_file(source, settings.tokenizer), texts)
    # after every input check: the choice is printed only for a run that goes on to load the model
    settings = settle_dtype(settings, device=device or procs.device, show=procs.is_main)
    check_quantize(settings, args, device or procs.device)
    pipe = load_pipeline(source, settings, device=device or procs.device, names=FLAGS)
    check_loaded(pipe, settings)
    apply_embeddings(pipe, settings, embeddings)
    apply_loras(pipe, settings)
    pipe, settings = apply_control(pipe, settings)
    if procs.is_main and not checked:   # a Hub model's tokenizer, now downloaded
        warn_unknown_words(tokenizer_file(source, settings.tokenizer), texts)
    settings = finish(size_from_image(settings, images, pipe), pipe)
    refiner = load_refiner(settings, device=pipe.device) if settings.refiner is not None else None
    apply_fast(pipe, settings, args)
    base, pipe = pipe, prepare_run(pipe, settings, images, args, refiner=refiner)
    settings = apply_quantize(base, settings, args, show=procs.is_main, refiner=refiner,   # after --optimize-cpu
                              control=pipe.control)
    preview = make_preview(args, settings, pipe) if procs.is_main else None
    mine = outputs.plan_calls(len(jobs), settings.n, batch_size)[procs.index::procs.count]
    alone = procs.count == 1
    written = run(pipe, [call for group in mine for call in group], jobs, settings, show=procs.is_main,
                  overwrite=args.overwrite, on_written=print if alone else None, preview=preview)
    if not alone:
        print(f"latentdiff: process {procs.index} of {procs.count} wrote {len(written)} file(s)", file=sys.stderr)
    procs.finish()
    if procs.is_main and not alone:   # every file of the run, in order, once all are written
        for job in jobs:
            print(*job.images, *([job.grid] if job.grid else []), sep="\n")
    return 0


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
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id == unk_id and text[start:end] not in unknown:
                unknown.append(text[start:end])
    if unknown:
        warn(f"not in the model's vocabulary, mapped to {tokenizer.model.unk_token}: "
             f"{', '.join(map(repr, unknown))}")
    return True


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
    def start(cls, *, cpu: bool) -> Processes:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch
        from accelerate import PartialState

        cpu = cpu or not torch.cuda.is_available()   # without cpu=True accelerate makes no CPU process group
        state = PartialState(cpu=cpu)
        return cls(state.process_index, state.num_processes, torch.device("cpu") if cpu else state.device, state)

    def share(self, value: T) -> T:
        """The main process's `value`, on every process (a collective call: every process makes it)."""
        if self.state is None:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return cast(T, box[0])

    def finish(self) -> None:
        """Wait for every process, so the main one reports only once all files are written."""
        if self.state is not None:
            self.state.wait_for_everyone()
            self.state.destroy_process_group()


def load_refiner(settings: GenerateSettings, *, device: Any) -> Any:
    """The --refiner model as a StableDiffusionXLImg2ImgPipeline with the run's dtype, VAE and sampler (`finish`
    has made the sampler the base's: the refiner carries on with it, as A1111's does)."""
    from ..pipelines.sdxl_image import StableDiffusionXLImg2ImgPipeline

    assert settings.refiner is not None
    # a refiner file has no CLIP-L: only the bigG tokenizer (--tokenizer-2) serves it
    pipe = load_pipeline(locate_model(settings.refiner), dataclasses.replace(settings, tokenizer=None), device=device,
                         names=FLAGS)
    if not is_sdxl(pipe):
        raise UsageError("the refiner must be an SDXL model", where="--refiner", expected="an SDXL refiner",
                         found=settings.refiner)
    return StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)


def finish(settings: GenerateSettings, pipe: Any) -> GenerateSettings:
    """The pipeline's defaults for the settings still None (SDXL's, Turbo's: its `default_call`); the effective
    values every PNG records."""
    import inspect

    defaults = inspect.signature(type(pipe).__call__).parameters
    height, width = pipe.image_size(settings.height, settings.width)
    sampler = pipe.sampler_for(None if settings.eta is None else float(settings.eta))
    if hasattr(pipe, "default_call"):
        steps, guidance = pipe.default_call(settings.steps, settings.guidance)
    else:
        steps = settings.steps or defaults["num_inference_steps"].default
        guidance = defaults["guidance_scale"].default if settings.guidance is None else settings.guidance
    return dataclasses.replace(
        settings, steps=steps, guidance=float(guidance),
        sampler=sampler.registry_name, eta=getattr(sampler, "eta", None), height=height, width=width,
        schedule=getattr(sampler, "sigma_schedule", None))


def run(pipe: Any, calls: list[outputs.Call], jobs: list[Job], settings: GenerateSettings, *, show: bool,
        overwrite: bool = False, on_written: Callable[[Path], Any] | None = None, preview: Any = None) -> list[Path]:
    """Make the calls and save each image (and each grid once its prompt's images are all made); a progress bar
    over every denoising step, and the step previews of `preview` (generate_previews.PreviewWriter). Returns the
    files written, in order."""
    import torch

    from ..utils.images import make_grid

    n, steps, written = settings.n, outputs.denoising_steps(settings), []
    made: dict[int, list[Any]] = {}        # a prompt's images so far, for its grid
    calls_of: dict[int, int] = {}          # the most images of a call that made them

    def save(image: Any, path: Path, params: dict[str, Any]) -> None:
        outputs.write(image, path, params, overwrite=overwrite)
        written.append(path)
        if on_written is not None:
            with progress.above():
                on_written(path)

    progress = outputs.StepProgress(steps * len(calls), len(jobs) * n, enabled=show)
    callback = progress.step if preview is None else with_preview(progress.step, preview.preview)
    try:
        for number, call in enumerate(calls):
            if preview is not None:
                preview.call = number
            progress.start(call.prompts[0] * n + call.first, len(call.prompts) * call.count, steps)
            generators = [torch.Generator().manual_seed(jobs[k].seed + call.first + i)
                          for k in call.prompts for i in range(call.count)]
            images = pipe([jobs[k].prompt for k in call.prompts], negative_prompt=settings.negative,
                          height=settings.height, width=settings.width, num_inference_steps=settings.steps,
                          guidance_scale=settings.guidance, eta=settings.eta, num_images_per_prompt=call.count,
                          generator=generators, progress=False, callback=callback).images
            for j, k in enumerate(call.prompts):
                job, mine = jobs[k], images[j * call.count:(j + 1) * call.count]
                params = settings.params() | {"prompt": job.prompt, "latentdiff": __version__, "batch": len(images)}
                for i, image in enumerate(mine, start=call.first):
                    save(image, job.images[i], params | {"seed": job.seed + i, "n": 1})
                if job.grid is not None:     # its batch: the largest call its images were made in
                    made.setdefault(k, []).extend(mine)
                    calls_of[k] = max(calls_of.get(k, 0), len(images))
                    if len(made[k]) == n:
                        save(make_grid(made.pop(k)), job.grid, params | {"seed": job.seed, "batch": calls_of[k]})
    finally:
        progress.close()
    return written


def with_preview(step: Callable[..., Any], preview: Any) -> Callable[..., None]:
    """The progress callback, then the preview callback (which reads the step's denoised prediction)."""
    def both(i: int, t: Any, x: Any, denoised: Any = None) -> None:
        step(i, t, x)
        preview(i, t, x, denoised)
    return both
