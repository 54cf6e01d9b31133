"""What every benchmark shares: the machine header, alternating timers, markdown tables, child processes,
and the two model folders (tiny and Stable Diffusion 1.5-size, random weights) that both libraries load.

The folders are written once by diffusers' `save_pretrained` into a cache (LATENTDIFF_BENCH_CACHE, default
/tmp/latentdiff-bench) and then loaded by each library's own `from_pretrained`: the weights are the same bytes
on both sides. They are built in a child process, so a benchmark's own memory never held diffusers' copy.

    python benchmarks/common.py build sd15|tiny|sdxl     # build a folder now (the benchmarks do it on demand)
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tests.* holds the offline CLIP tokenizer and the model configs the tests use
    sys.path.insert(0, str(REPO))

CACHE = Path(os.environ.get("LATENTDIFF_BENCH_CACHE", "/tmp/latentdiff-bench"))
FOLDER_VERSION = "1"  # bump when a builder changes, so stale folders are rebuilt
PROMPT, NEGATIVE = "a photo of a cat", "blurry"


# ---- command line and header ------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (run_all --quick)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default: per script)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, here and in child processes (default: torch's, one per core); on a "
                        "loaded machine 1 avoids OpenMP threads waiting on descheduled siblings")
    return p


def device_of(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def low_precision_dtypes(device: str) -> list:
    """The reduced precisions worth timing: bf16 on CPU (avx512_bf16 / AMX make it fast), fp16 and bf16 on CUDA."""
    import torch

    return [torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        flags = fields.get("Flags", "")
        extras = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()]
        return f"{fields.get('Model name', '?').strip()} ({', '.join(extras) or 'no avx512'})"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "?"


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores"


def header(title: str, args: argparse.Namespace) -> None:
    """Apply --threads, then print the machine, versions, date and load as a markdown header."""
    import diffusers
    import torch
    import transformers

    import latentdiff

    if args.threads:  # children inherit it through the environment (run_child copies os.environ)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    device = device_of(args)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none used"
    print(f"## {title}\n")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; mode: {'quick' if args.quick else 'full'}")
    print(f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; GPU: {gpu}")
    print(f"- python {platform.python_version()}, torch {torch.__version__}, latentdiff {latentdiff.__version__}, "
          f"diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    print(f"- load average at start: {load()}\n", flush=True)


def footer() -> None:
    print(f"\nload average at end: {load()}\n", flush=True)


# ---- timing ------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def alternate(cases: dict[str, Callable[[], Any]], *, reps: int, warmup: int = 1, device: str = "cpu",
              ) -> dict[str, list[float]]:
    """Time each case `reps` times, interleaved (A B, B A, A B ...) so that load from other processes falls on
    every case alike; `warmup` untimed calls of each first. Returns name -> seconds per call."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            synchronize(device)
            start = time.perf_counter()
            cases[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def max_rel_error(actual: Any, expected: Any) -> float:
    """max |actual - expected| / max |expected| (the tests' parity measure, tests/_support/parity.py)."""
    from tests._support.parity import max_rel_error as measure

    return measure(actual, expected)


def count_ops(fn: Callable[[], Any]) -> tuple[Counter, int]:
    """Ops of one call of fn: (Counter of the aten ops called from Python, the profiler's top-level events, on
    each of which per-op overhead is paid: dispatch, checks, allocation; and the count of every aten event,
    nested ones included: a conv2d is one op from Python and several events below it)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return Counter(e.name for e in events if e.cpu_parent is None), len(events)


def weight_copies(fn: Callable[[], Any]) -> tuple[int, float]:
    """(count, MB at 4 bytes per element) of the tensor copies made inside convolutions by one call of fn.

    `_convolution` makes its input and weight contiguous in one memory format: an NCHW weight meeting a
    channels-last activation is copied, on every call (an input that is a strided view is copied too)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def inside_conv(event) -> bool:
        while event is not None:
            if event.name == "aten::_convolution":
                return True
            event = event.cpu_parent
        return False

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    copies = [e for e in prof.events() if e.name == "aten::copy_" and inside_conv(e.cpu_parent)]
    numel = sum(math.prod(e.input_shapes[0]) for e in copies if e.input_shapes and e.input_shapes[0])
    return len(copies), numel * 4 / 2**20


def gemm_rate(dtype: Any, *, n: int = 2048, reps: int = 3, device: str = "cpu") -> float:
    """Measured matmul rate (GFLOP/s) of an n x n x n product in `dtype`: the ceiling a conv-and-GEMM model
    can approach on this machine."""
    import torch

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    times = alternate({"mm": lambda: a @ b}, reps=reps, warmup=0, device=device)["mm"]
    return 2 * n**3 / min(times) / 1e9


# ---- the built-in model's checker, and image differences --------------------------------------------
ACCURACY_KEYS = ("color", "background", "shape", "position", "all")
ACCURACY_COLUMNS = ("colour", "background", "shape", "position", "all")


def checker_run(pipe: Any, *, count: int, settings: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """The held-out checker on `count` images of `pipe` (data/shapes_eval.py, the reported figures' seeds): its
    report and the wall seconds per image of the whole run."""
    from latentdiff.data.shapes_eval import evaluate_shapes_model

    start = time.perf_counter()
    report = evaluate_shapes_model(pipe, count=count, settings=settings, progress=False)
    return report, (time.perf_counter() - start) / count


def accuracy_cells(accuracy: dict[str, float]) -> list[str]:
    """The checker's accuracies as the ACCURACY_COLUMNS cells of a table row."""
    return [f"{100 * accuracy[k]:.1f} %" for k in ACCURACY_KEYS]


def image_difference(a: Any, b: Any) -> tuple[float, float]:
    """(mean |a - b|, PSNR in dB) of two images or stacks with values in 0..255 (uint8 or float)."""
    import numpy as np

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mse = float((d ** 2).mean())
    return float(np.abs(d).mean()), (math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse))


# ---- tables -----------------------------------------------------------------------------------------
def fmt_time(seconds: float) -> str:
    if seconds != seconds:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


class Table:
    """Rows of (what, latentdiff, diffusers, ratio ...) printed as markdown, and kept for --json."""

    def __init__(self, title: str, columns: Sequence[str]):
        self.title, self.columns, self.rows = title, list(columns), []

    def add(self, *cells: Any, data: dict[str, Any] | None = None) -> None:
        self.rows.append(([str(c) for c in cells], data or {}))

    def compare(self, what: str, ours: Sequence[float], theirs: Sequence[float], *, error: float | None = None,
                unit: Callable[[float], str] = fmt_time, note: str = "") -> float:
        """A row: medians of both, ratio latentdiff / diffusers, repetitions, parity error. Returns the ratio."""
        a, b = median(ours), median(theirs)
        ratio = a / b if b else float("nan")
        ratio_min = min(ours) / min(theirs) if min(theirs) else float("nan")
        err = "-" if error is None else f"{error:.1e}"
        self.add(what, unit(a), unit(b), f"{ratio:.2f}x", f"{ratio_min:.2f}x", f"{len(ours)}/{len(theirs)}", err,
                 note, data=dict(what=what, latentdiff=a, diffusers=b, ratio=ratio, ratio_min=ratio_min, error=error,
                                 latentdiff_all=list(ours), diffusers_all=list(theirs), note=note))
        return ratio

    def print(self) -> None:
        print(f"### {self.title}\n")
        print("| " + " | ".join(self.columns) + " |")
        print("|" + "---|" * len(self.columns))
        for cells, _ in self.rows:
            print("| " + " | ".join(cells) + " |")
        print(flush=True)


# "ratio of mins": on a loaded machine the fastest run is the one least disturbed by other processes.
COMPARE_COLUMNS = ("what", "latentdiff (median)", "diffusers (median)", "ratio ld/df", "ratio of mins", "n",
                   "max rel err", "note")


def write_json(path: Path | None, tables: Sequence[Table], **extra: Any) -> None:
    if path is None:
        return
    data = {"load_end": load(), **extra, "tables": {t.title: [d for _, d in t.rows] for t in tables}}
    path.write_text(json.dumps(data, indent=1, default=str))


# ---- child processes ----------------------------------------------------------------------------------
def run_child(code: str, *, env: dict[str, str] | None = None, timeout: float = 1800) -> tuple[dict, float, float]:
    """Run `code` in a fresh interpreter; it prints one JSON line last. Returns (that dict, wall seconds from
    spawn to exit, the child's own peak RSS in MB from wait4, not mixed with other children)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=str(REPO), env={**os.environ, **(env or {})})
    out, err = proc.communicate(timeout=timeout)
    wall = time.perf_counter() - start
    # communicate() reaps the child, so its ru_maxrss comes from the child itself (CHILD_EXIT): the same number
    # wait4 would give, and never mixed with other children.
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return result, wall, float(result.get("maxrss_mb", float("nan")))


# Appended to child code: the child's own peak RSS (ru_maxrss, KB on Linux) into its JSON line.
CHILD_EXIT = """
import resource as _r, json as _j
RESULT['maxrss_mb'] = _r.getrusage(_r.RUSAGE_SELF).ru_maxrss / 1024
print(_j.dumps(RESULT))
"""


def drop_page_cache() -> bool:
    """Evict the page cache (needs root); False where that is not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# ---- the model folders ----------------------------------------------------------------------------------
def folder(name: str) -> Path:
    """The cached diffusers-format pipeline folder `name` ("tiny", "sd15" or "sdxl": benchmarks/sdxl_folder.py),
    built by a child if absent."""
    path = CACHE / f"{name}-v{FOLDER_VERSION}"
    if not (path / "COMPLETE").is_file():
        print(f"(building the {name} folder in {path} ...)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(Path(__file__)), "build", name, str(path)], check=True, cwd=str(REPO))
        print(f"(built in {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return path


def build_tiny(path: Path) -> None:
    """The tests' tiny StableDiffusionPipeline (CLIP hidden 32, UNet 32/64, VAE f=2), random weights."""
    from tests._support.sd import tiny_diffusers_pipeline

    pipe = tiny_diffusers_pipeline(path / "_build")
    pipe.save_pretrained(path)


def build_sd15(path: Path) -> None:
    """Stable Diffusion 1.5's architecture (860M UNet, SD VAE, CLIP ViT-L/14) with random weights; the
    zero-initialised parameters (output convs, norm biases) get random values so every weight matters."""
    import diffusers
    import torch
    from tests._support.parity import randomize
    from tests._support.sd import CLIP_L, SD15_UNET, SD_SCHEDULER, SD_VAE
    from tests._support.tiny_clip import write_tiny_clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    with torch.no_grad():
        unet = randomize(diffusers.UNet2DConditionModel(**SD15_UNET).eval(), 1)
        vae = randomize(diffusers.AutoencoderKL(**SD_VAE).eval(), 2)
        text_model = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(path / "_build" / "tokenizer"))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_model, tokenizer=tokenizer, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)


def _build(name: str, path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    if name == "sdxl":  # its own module: the SDXL configs and builder (benchmarks/sdxl_folder.py)
        from sdxl_folder import build_sdxl

        build_sdxl(path)
    else:
        {"tiny": build_tiny, "sd15": build_sd15}[name](path)
    shutil.rmtree(path / "_build", ignore_errors=True)
    (path / "COMPLETE").write_text(FOLDER_VERSION)


def quiet_diffusers() -> None:
    """No progress bars or info logs from diffusers / transformers in the tables."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "build":
        _build(sys.argv[2], Path(sys.argv[3]))
    elif len(sys.argv) == 3 and sys.argv[1] == "build":
        print(folder(sys.argv[2]))
    else:
        sys.exit(__doc__)
