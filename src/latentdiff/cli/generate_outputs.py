"""What `latentdiff generate` writes and shows, as AUTOMATIC1111 does: the seed (random unless given), the
pipeline calls (`--batch-size` images per call, `--batch-count` calls per prompt), the names of the files
(auto-numbered `00012-<seed>.png` in a folder, never an existing file unless `--overwrite`), and a progress bar per
denoising step.

Names. `-o DIR` (an existing folder) or no `-o` (the folder `outputs/` of the current directory, made at the first
write): every image is `NNNNN-<seed>.<ext>`, its grid (`--grid`) `NNNNN-grid-<seed>.<ext>` (the seed of its first
image), numbered on from the highest number already in the folder, so nothing there is replaced. `-o FILE.ext`
(one prompt): one image is FILE.ext; several are FILE-0.ext, FILE-1.ext ... (image i has the seed seed + i), and
their grid FILE.ext. A file that exists is an error that names it (`--overwrite` replaces it).

Calls. Image i of prompt k has the seed `seed + k * n + i` whatever the batching, and a call holds at most
`--batch-size` images: prompts of n <= batch-size images share calls (batch-size // n prompts each), a prompt of
more is split into calls of batch-size images. Under `accelerate launch` all the calls of one prompt go to the
same process (the grid needs every image), and groups are dealt out in turn.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from .. import limits
from ..config import is_int
from ..errors import UsageError

T = TypeVar("T")
FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}          # --format -> the extension written
SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}   # -o's suffix -> the format
DEFAULT_FOLDER = "outputs"            # without -o: auto-numbered files in ./outputs/
DEFAULT_BATCH_SIZE = 8                # images per pipeline call when only -n is given
RANDOM_SEED = -1                      # --seed -1: a random seed, as no --seed
SEED_RANGE = 2**32                    # random seeds are drawn in [0, 2**32), as A1111's
NUMBERED = re.compile(r"^(\d+)-")     # an auto-numbered file: its number


def add_output_flags(gen: argparse.ArgumentParser) -> None:
    """The new flags of the outputs and the batches (-o, --seed, -n and --batch-size are beside the others)."""
    gen.add_argument("--batch-count", type=int, default=None,
                     help="pipeline calls per prompt (A1111's batch count): -n = batch size x batch count")
    gen.add_argument("--grid", action="store_true", help="also write a grid of each prompt's images")
    gen.add_argument("--format", dest="image_format", default=None, choices=sorted(FORMATS),
                     help="image format (default: from -o's suffix, else png)")
    gen.add_argument("--overwrite", action="store_true", help="replace files that exist (never done otherwise)")


# ---- the seed ------------------------------------------------------------------------------------------------
def choose_seed(args: argparse.Namespace, stored: dict[str, Any], share: Callable[[Any], Any]) -> int | None:
    """--seed as given; a random one for --seed -1, or no --seed and no `--from` seed (None: the PNG's, used as is).
    Every process of `accelerate launch` gets the main process's draw (`share`); it is printed once."""
    if args.seed is not None and args.seed != RANDOM_SEED:
        return int(args.seed)
    if args.seed is None and stored.get("seed") is not None:
        return None
    return int(share(secrets.randbelow(SEED_RANGE)))


# ---- the calls -----------------------------------------------------------------------------------------------
def images_per_prompt(args: argparse.Namespace, stored: dict[str, Any] | None = None) -> tuple[int | None, int]:
    """(n from the flags, None when none sets it; the most images a call holds), from -n, --batch-size and
    --batch-count; flags that disagree are an error naming them. A `--from` grid made in calls of `batch` <= n
    images (a split prompt) is made in calls of that size again, when no flag says otherwise: the same bytes."""
    for flag, value in (("--batch-size", args.batch_size), ("--batch-count", args.batch_count)):
        if value is not None and not 1 <= value <= limits.MAX_IMAGES_PER_PROMPT:
            raise UsageError(f"bad value for {flag}", where=flag, found=value,
                             expected=f"an integer >= 1, at most {limits.MAX_IMAGES_PER_PROMPT} "
                                      "(limits.MAX_IMAGES_PER_PROMPT)")
    n, size, count = args.n, args.batch_size, args.batch_count
    batch: Any = (stored or {}).get("batch")
    stored_n: Any = (stored or {}).get("n")
    if size is None and n is None and count is None and is_int(batch) and is_int(stored_n) \
            and 1 <= batch <= min(stored_n, limits.MAX_IMAGES_PER_PROMPT):   # a PNG's values: untrusted
        size = int(batch)
    if count is None or n is not None and n < 1:    # a bad -n is named by the settings' check
        return n, size or (DEFAULT_BATCH_SIZE if count is None else 1)
    size = size or (1 if n is None else n // count if n % count == 0 else None)
    if size is None or n is not None and n != size * count:
        flags = f"-n {n}, --batch-count {count}" + ("" if args.batch_size is None else f", --batch-size {size}")
        raise UsageError("-n, --batch-size and --batch-count disagree", where="-n, --batch-size, --batch-count",
                         expected="-n = batch size x batch count (or give only two of them)", found=flags)
    if size * count > limits.MAX_IMAGES_PER_PROMPT:
        raise UsageError("batch size x batch count is more images per prompt than allowed",
                         where="--batch-size, --batch-count",
                         expected=f"at most {limits.MAX_IMAGES_PER_PROMPT} (limits.MAX_IMAGES_PER_PROMPT)",
                         found=f"{size} x {count} = {size * count}")
    return size * count, size


@dataclasses.dataclass(frozen=True)
class Call:
    """One pipeline call: `count` images of each of `prompts` (indices into the run's jobs), images first ..
    first + count - 1 of each."""

    prompts: tuple[int, ...]
    first: int
    count: int


def plan_calls(prompts: int, n: int, batch_size: int) -> list[list[Call]]:
    """The pipeline calls of a run, in groups that one process runs (every call of a prompt in one group)."""
    if n <= batch_size:
        per_call = batch_size // n
        return [[Call(tuple(range(k, min(k + per_call, prompts))), 0, n)] for k in range(0, prompts, per_call)]
    return [[Call((k,), first, min(batch_size, n - first)) for first in range(0, n, batch_size)]
            for k in range(prompts)]


def denoising_steps(settings: Any) -> int:
    """The denoising steps of one pipeline call: the progress bar's unit (a second pass, such as a hires fix, or
    an img2img strength that skips steps, is counted here)."""
    steps = int(settings.steps)
    if getattr(settings, "hires_scale", None) is not None:
        from ..pipelines.hires import DEFAULT_STRENGTH
        from ..pipelines.hires import denoising_steps as with_hires

        return with_hires(steps, scale=settings.hires_scale, steps=settings.hires_steps,
                          strength=settings.hires_strength or DEFAULT_STRENGTH)
    if getattr(settings, "init_image", None) is not None:
        from ..pipelines.sdedit import start_step

        return steps - start_step(steps, settings.strength)   # settle_inputs gave it its default
    return steps


# ---- the files -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Outputs:
    """Where the files go: auto-numbered in `folder`, or the one `file` -o names."""

    folder: Path | None
    file: Path | None
    suffix: str            # with the dot: .png, .jpg, .webp
    grid: bool
    overwrite: bool


def read_outputs(args: argparse.Namespace, *, many_prompts: bool) -> Outputs:
    """-o, --format, --grid and --overwrite, checked (nothing is written or made here)."""
    chosen = args.image_format
    output = Path(args.output) if args.output is not None else None
    if output is None and args.from_png is not None and not many_prompts:
        source = Path(args.from_png)   # --from without -o: beside the source, never over it
        output = source.with_name(source.stem + "-reproduced" + FORMATS[chosen or "png"])
    if output is None and Path(DEFAULT_FOLDER).exists() and not Path(DEFAULT_FOLDER).is_dir():
        raise UsageError(f"./{DEFAULT_FOLDER} (where images go without -o) is not a folder", where="-o",
                         expected="a folder", found=f"a file {Path(DEFAULT_FOLDER).resolve()}",
                         hint="pass -o FOLDER or -o FILE.png")
    if output is None or output.is_dir():
        return Outputs(output or Path(DEFAULT_FOLDER), None, FORMATS[chosen or "png"], args.grid, args.overwrite)
    suffix = output.suffix.lower()
    if many_prompts:
        raise UsageError("with --prompts, -o must be an existing folder", where="-o", expected="an existing folder",
                         found=str(output), hint=f"create it first (mkdir), or leave -o out: ./{DEFAULT_FOLDER}/")
    if suffix not in SUFFIXES:
        raise UsageError("-o is neither an existing folder nor an image file", where="-o",
                         expected="an existing folder, or a .png/.jpg/.webp file", found=str(output),
                         hint=f"create the folder first (mkdir), or leave -o out: ./{DEFAULT_FOLDER}/")
    if chosen is not None and SUFFIXES[suffix] != chosen:
        raise UsageError("--format and -o's suffix disagree", where="--format, -o",
                         expected=f"-o FILE{FORMATS[chosen]}",
                         found=f"--format {chosen}, -o {output}")
    if not output.parent.is_dir():
        raise UsageError("the output folder does not exist", where="-o", expected="an existing folder",
                         found=str(output.parent), hint="create it first (mkdir)")
    return Outputs(None, output, output.suffix, args.grid, args.overwrite)


def next_number(folder: Path) -> int:
    """The number after the highest `NNNNN-...` name in the folder (0 when it has none, or does not exist)."""
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def name_files(outputs: Outputs, seeds: Sequence[int], n: int,
               share: Callable[[Any], Any]) -> list[tuple[tuple[Path, ...], Path | None]]:
    """(image paths, grid path or None) of each prompt (first seeds `seeds`); an existing file is an error unless
    --overwrite. The folder's next number is read on the main process only and shared (`share`), before any
    process writes: every process agrees on the names."""
    grid = outputs.grid and n > 1
    if outputs.file is not None:
        file, suffix = outputs.file, outputs.suffix
        images = (file,) if n == 1 else tuple(file.with_name(f"{file.stem}-{i}{suffix}") for i in range(n))
        named = [(images, file if grid else None)]
    else:
        assert outputs.folder is not None
        number = int(share(next_number(outputs.folder)))
        named = []
        for seed in seeds:
            images = tuple(outputs.folder / f"{number + i:05d}-{seed + i}{outputs.suffix}" for i in range(n))
            number += n
            grid_path = outputs.folder / f"{number:05d}-grid-{seed}{outputs.suffix}" if grid else None
            number += grid
            named.append((images, grid_path))
    if not outputs.overwrite:
        for images, grid_path in named:
            for path in (*images, *([grid_path] if grid_path else [])):
                refuse_existing(path)
    return named


def refuse_existing(path: Path) -> None:
    if path.exists():
        raise UsageError("the output file exists", where="-o", expected="a new file name", found=str(path),
                         hint="pass --overwrite to replace it, or leave -o out for auto-numbered names")


def write(image: Any, path: Path, params: dict[str, Any], *, overwrite: bool) -> None:
    """Save one image (its folder made on first use), never over a file that appeared since the check."""
    from ..utils.images import save_image

    if not overwrite:
        refuse_existing(path)
    path.parent.mkdir(exist_ok=True)
    try:
        save_image(image, path, params, replace=overwrite)
    except FileExistsError:      # appeared since the check: still never replaced
        refuse_existing(path)
        raise


# ---- progress ------------------------------------------------------------------------------------------------
class StepProgress:
    """Progress over every denoising step of this process's calls: a tqdm bar on a terminal ("images 5-8/16",
    it/s), plain lines elsewhere (logs, CI, a pipe: `latentdiff: step 10/50, images 1-4/8, 3.1 it/s`, about every
    10% of a call), nothing when disabled. Drive it with `start(...)`, then `step` as the pipeline's callback."""

    LINES_PER_CALL = 10

    def __init__(self, total_steps: int, total_images: int, *, enabled: bool = True, stream: IO[str] | None = None,
                 tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and (self.stream.isatty() if tty is None else tty)
        self.total_steps, self.total_images = total_steps, total_images
        self.steps = self.done = 0
        self.images = ""
        self.started = 0.0
        self.bar: Any = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, file=self.stream, unit="it", dynamic_ncols=True)

    def start(self, first_image: int, count: int, steps: int) -> None:
        """A call begins: images first_image + 1 .. first_image + count (1-based, of the run's), `steps` steps."""
        self.catch_up()
        last = first_image + count
        self.images = (f"image {last}/{self.total_images}" if count == 1
                       else f"images {first_image + 1}-{last}/{self.total_images}")
        self.steps, self.done, self.started = steps, 0, time.perf_counter()
        if self.bar is not None:
            self.bar.set_description(self.images)

    def step(self, i: int = 0, t: Any = None, x: Any = None) -> None:
        """One denoising step done (the pipeline's `callback(i, t, x)`; it returns None: x is kept)."""
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and self.line_due():
            rate = self.done / max(time.perf_counter() - self.started, 1e-9)
            print(f"latentdiff: step {self.done}/{self.steps}, {self.images}, {rate:.1f} it/s", file=self.stream,
                  flush=True)

    def line_due(self) -> bool:
        """Plain lines at about every 10% of a call, and at its last step."""
        every = max(1, math.ceil(self.steps / self.LINES_PER_CALL))
        return self.done % every == 0 or self.done == self.steps

    @contextlib.contextmanager
    def above(self) -> Iterator[None]:
        """Print inside: the lines go above the bar (which is cleared, then drawn again), not into it."""
        if self.bar is not None:
            self.bar.clear()
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.refresh()

    def catch_up(self) -> None:
        """Count the steps of the call that ended that its sampler did not report, so the bar ends at its total."""
        if self.bar is not None and self.done < self.steps:
            self.bar.update(self.steps - self.done)
        self.done = self.steps

    def close(self) -> None:
        self.catch_up()
        if self.bar is not None:
            self.bar.close()
