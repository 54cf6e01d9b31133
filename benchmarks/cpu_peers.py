"""latentdiff against the CPU peers (issue 20), on the same random-weight SD 1.5, back to back in one run.

Peers: latentdiff (fp32, bf16; bf16-packed / fp32-packed: with `optimize_for_cpu`: weights packed once, the GEGLU
feed-forward and the residual sums fused into the GEMMs; int8: int8
Linear weights + prepacked fp32 convolutions, docs/fast.md "CPU"), diffusers (fp32, bf16), OpenVINO through
optimum-intel (fp32, bf16 and int8 weights, static shapes), stable-diffusion.cpp (f16, q8_0). Set-up, offline:
benchmarks/PEERS.md. A peer that is not installed is skipped, and the table says so.

Every case runs in its own fresh process (a Python interpreter, or sd-cli), so cold start and peak RSS are that
peer's alone. Each Python peer loads once, then per size: (OpenVINO: static reshape + compile), a 1-step warm-up
image, a 1-step image, an S-step image (`--steps`, default 5); seconds per CFG step = (t(S) - t(1)) / (S - 1),
in which prompt encoding and VAE decoding cancel. Euler (the folder's schedule, diffusers' EulerDiscreteScheduler
and latentdiff's EulerSampler from that config), guidance 7.5, batch 1, the same latents (torch seed 0). sd-cli
is run once with 1 step and once with S steps per size; per CFG step = difference of its own "sampling completed"
times / (S - 1), and per image its "generate_image completed" time (the process wall times when the log lacks
them). Cold start: process spawn to the first image (sd-cli: to the exit of the first 1-step run).

    python benchmarks/cpu_peers.py setup                # build the weights, the single file, GGUF, OpenVINO IR
    python benchmarks/cpu_peers.py run --sizes 256,512 --threads 2 --json peers.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from peers_setup import OV_STAMP

WEIGHTS = Path(os.environ.get("LATENTDIFF_PEERS_WEIGHTS", "/work/peers/weights"))
SDCPP = Path(os.environ.get("LATENTDIFF_PEERS_SDCPP", "/work/peers/sdcpp/build/bin/sd-cli"))
OV_PYTHON = Path(os.environ.get("LATENTDIFF_PEERS_OV_PYTHON", "/work/peers/ov-venv/bin/python"))
PEERS = ("latentdiff-bf16", "latentdiff-bf16-packed", "latentdiff-fp32-packed", "latentdiff-int8",
         "latentdiff-int8-static", "latentdiff-int8-static-fp32",
         "openvino-bf16", "openvino-int8", "openvino-fp32", "latentdiff-fp32", "diffusers-bf16",
         "diffusers-fp32", "sdcpp-q8_0", "sdcpp-f16")
KEY_PEERS = "latentdiff-bf16,openvino-bf16,openvino-int8"
# latentdiff's CPU paths (docs/fast.md "CPU"): precision -> (dtype, what is applied to the loaded pipeline)
_CPU_PATHS = "from latentdiff.pipelines.cpu_paths import optimize_for_cpu, quantize"
LATENTDIFF_PATHS = {
    "fp32": ("torch.float32", "pass"), "bf16": ("torch.bfloat16", "pass"),
    "bf16-packed": ("torch.bfloat16", f"{_CPU_PATHS}; optimize_for_cpu(pipe)"),          # packed and fused
    "fp32-packed": ("torch.float32", f"{_CPU_PATHS}; optimize_for_cpu(pipe)"),
    "int8": ("torch.float32", f"{_CPU_PATHS}; quantize(pipe, 'int8'); optimize_for_cpu(pipe)"),   # int8 Linear
    # int8 convolutions and linear layers, calibrated on 4 steps of the default prompts (in the load time)
    "int8-static": ("torch.bfloat16", f"{_CPU_PATHS}; optimize_for_cpu(pipe); "
                                      "quantize(pipe, 'int8-static', calibration_steps=4)"),
    # the same on a float32 UNet: for CPUs where bf16 is slower than fp32 (no AMX; RESULTS.md "int8-static")
    "int8-static-fp32": ("torch.float32", f"{_CPU_PATHS}; optimize_for_cpu(pipe); "
                                          "quantize(pipe, 'int8-static', calibration_steps=4)"),
}

# ---- the Python children --------------------------------------------------------------------------------
CHILD = r'''
import json, resource, sys, time
import numpy as np, torch
SPAWN, FOLDER, OUT, THREADS = {spawn!r}, {folder!r}, {out!r}, {threads!r}
torch.set_num_threads(THREADS)
{setup}
t0 = time.perf_counter()
pipe = load()
load_s = time.perf_counter() - t0
rows, cold = [], None
for size in {sizes!r}:
    t0 = time.perf_counter()
    prepare(pipe, size)
    prepare_s = time.perf_counter() - t0
    latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(0)).to(LATENT_DTYPE)

    def gen(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        image = pipe({prompt!r}, negative_prompt={negative!r}, num_inference_steps=steps, guidance_scale=7.5,
                     height=size, width=size, latents=latents, output_type="np", **EXTRA).images
        return time.perf_counter() - t0, time.process_time() - c0, image

    warm_s, _, _ = gen(1)
    cold = cold if cold is not None else time.time() - SPAWN
    one_s, one_cpu, _ = gen(1)
    image_s, image_cpu, image = gen({steps})
    np.save(f"{{OUT}}/{{size}}.npy", np.asarray(image, dtype=np.float32))
    rows.append(dict(size=size, prepare_s=prepare_s, warm_s=warm_s, one_step_s=one_s, image_s=image_s,
                     per_step_s=(image_s - one_s) / ({steps} - 1),
                     cpu_per_step_s=(image_cpu - one_cpu) / ({steps} - 1)))
RESULT = dict(load_s=load_s, cold_s=cold, rows=rows, versions=VERSIONS, notes=NOTES,
              maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps(RESULT))
'''

SETUP_LATENTDIFF = '''
import latentdiff
from latentdiff import LatentDiffusionPipeline
from latentdiff.diffusion.samplers import EulerSampler
VERSIONS, NOTES, EXTRA, LATENT_DTYPE = {{"latentdiff": latentdiff.__version__, "torch": torch.__version__}}, "", \
    {{"progress": False}}, {dtype}

def load():
    pipe = LatentDiffusionPipeline.from_pretrained(FOLDER, torch_dtype={dtype}{options})
    pipe.scheduler = EulerSampler.from_config(pipe.scheduler.config)
    {post}
    return pipe

def prepare(pipe, size):
    pass
'''

SETUP_DIFFUSERS = '''
import diffusers
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
diffusers.utils.logging.disable_progress_bar()
VERSIONS, NOTES, EXTRA, LATENT_DTYPE = {{"diffusers": diffusers.__version__, "torch": torch.__version__}}, "", {{}}, \
    {dtype}

def load():
    pipe = StableDiffusionPipeline.from_pretrained(FOLDER, torch_dtype={dtype}, safety_checker=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe

def prepare(pipe, size):
    pass
'''

# optimum-intel's OVStableDiffusionPipeline on an exported IR folder; the hint is OpenVINO's execution precision
# (its CPU default is bf16 where the CPU has AMX / avx512_bf16, so fp32 must be asked for); None keeps the default.
SETUP_OPENVINO = '''
import diffusers, openvino, optimum.intel
from importlib.metadata import version
from diffusers import EulerDiscreteScheduler
from optimum.intel import OVStableDiffusionPipeline
VERSIONS = {{"openvino": openvino.__version__, "optimum-intel": version("optimum-intel"),
            "diffusers": diffusers.__version__, "torch": torch.__version__}}
NOTES, EXTRA, LATENT_DTYPE = "", {{}}, torch.float32
HINT, STALE = {hint!r}, {stale!r}

def load():
    config = {{"INFERENCE_NUM_THREADS": str(THREADS), "CACHE_DIR": ""}}
    if HINT:
        config["INFERENCE_PRECISION_HINT"] = HINT
    pipe = OVStableDiffusionPipeline.from_pretrained(FOLDER, compile=False, ov_config=config)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe

def prepare(pipe, size):
    global NOTES
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    pipe.compile()
    try:
        compiled = pipe.unet.request.get_compiled_model()
    except AttributeError:
        compiled = getattr(pipe.unet, "request", None)
    try:
        NOTES = STALE + "UNet executes in " + str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    except Exception as error:  # only a note
        NOTES = STALE + f"precision not readable ({{type(error).__name__}})"
'''


def python_case(peer: str, args: argparse.Namespace, out: Path) -> tuple[str, str] | str:
    """(interpreter, child code) for a Python peer, or the reason it is skipped."""
    lib, precision = peer.split("-", 1)
    dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}.get(precision, "torch.float32")
    folder, python = WEIGHTS / "sd15", sys.executable
    if lib != "openvino" and not (folder / "model_index.json").is_file():
        return f"no weights folder {folder} (run: python benchmarks/cpu_peers.py setup)"
    if lib == "latentdiff":
        dtype, post = LATENTDIFF_PATHS[precision]
        setup = SETUP_LATENTDIFF.format(dtype=dtype, options=args.latentdiff_options or "", post=post)
    elif lib == "diffusers":
        setup = SETUP_DIFFUSERS.format(dtype=dtype)
    else:
        python = str(OV_PYTHON)
        folder = WEIGHTS / ("openvino-int8" if precision == "int8" else "openvino-fp32")
        if not OV_PYTHON.is_file():
            return f"no OpenVINO interpreter {OV_PYTHON} (benchmarks/PEERS.md)"
        if not (folder / "model_index.json").is_file():
            return f"no OpenVINO IR {folder} (run: python benchmarks/cpu_peers.py setup)"
        # an IR exported before peers_setup checked its text encoder has a random one (RESULTS.md "OpenVINO image
        # difference, explained"): its times stand, its image is not comparable
        stale = "" if (folder / OV_STAMP).is_file() else \
            f"no {OV_STAMP}: text encoder unchecked, image not comparable (rerun setup); "
        setup = SETUP_OPENVINO.format(hint={"fp32": "f32", "bf16": "bf16"}.get(precision), stale=stale)
    code = CHILD.format(spawn=0.0, folder=str(folder), out=str(out), threads=args.threads, setup=setup,
                        sizes=args.sizes, steps=args.steps, prompt=common.PROMPT, negative=common.NEGATIVE)
    return python, code


def run_python(python: str, code: str, *, threads: int, timeout: float) -> dict[str, Any]:
    code = code.replace("SPAWN, FOLDER", f"SPAWN = {time.time()!r}\n_, FOLDER", 1)  # spawn time, as late as can be
    return json.loads(run_code(python, code, threads=threads, timeout=timeout).strip().splitlines()[-1])


def run_code(python: str, code: str, *, threads: int, timeout: float) -> str:
    """`python -c code` from the repository with `threads` OpenMP threads and this checkout's latentdiff; -> its
    stdout (RuntimeError with the end of its stderr if it fails)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(common.REPO / "src")}
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(common.REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


# ---- stable-diffusion.cpp ---------------------------------------------------------------------------------
def sdcpp_run(model: Path, *, size: int, steps: int, threads: int, out: Path, timeout: float,
              extra: list[str]) -> dict[str, Any]:
    """One sd-cli image as a subprocess: wall seconds, its own peak RSS (wait4) and the times its log prints."""
    cmd = [str(SDCPP), "-m", str(model), "-p", common.PROMPT, "-n", common.NEGATIVE, "--cfg-scale", "7.5",
           "--sampling-method", "euler", "--steps", str(steps), "-H", str(size), "-W", str(size), "-s", "0",
           "-t", str(threads), "-o", str(out), *extra]
    start = time.time()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                raise TimeoutError(f"sd-cli ran past {timeout} s")
            time.sleep(0.05)
        wall = time.time() - start
        log.seek(0)
        text = log.read()
    if os.waitstatus_to_exitcode(status) != 0 or not out.is_file():
        raise RuntimeError(f"sd-cli failed:\n{text[-3000:]}")
    sampling = re.findall(r"sampling completed, taking ([\d.]+) ?s", text)
    image = re.findall(r"generate_image completed in ([\d.]+) ?s", text)
    return dict(wall_s=wall, maxrss_mb=usage.ru_maxrss / 1024, cpu_s=usage.ru_utime + usage.ru_stime,
                sampling_s=float(sampling[-1]) if sampling else None, image_s=float(image[-1]) if image else wall)


def sdcpp_case(peer: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    kind = peer.split("-", 1)[1]
    model, convert = WEIGHTS / f"sd15-{kind}.gguf", []
    if not model.is_file():  # sd-cli converts the single file while loading: per-step times are the same
        model, convert = WEIGHTS / "sd15.safetensors", ["--type", kind]
    rows, cold, rss = [], None, 0.0
    for size in args.sizes:
        one = sdcpp_run(model, size=size, steps=1, threads=args.threads, out=out / f"{size}-1.png",
                        timeout=args.timeout, extra=convert)
        cold = cold if cold is not None else one["wall_s"]
        many = sdcpp_run(model, size=size, steps=args.steps, threads=args.threads, out=out / f"{size}.png",
                         timeout=args.timeout, extra=convert)
        own = one["sampling_s"] is not None and many["sampling_s"] is not None
        key = "sampling_s" if own else "wall_s"
        rows.append(dict(size=size, one_step_s=one["image_s"], image_s=many["image_s"],
                         per_step_s=(many[key] - one[key]) / (args.steps - 1),
                         cpu_per_step_s=(many["cpu_s"] - one["cpu_s"]) / (args.steps - 1)))
        rss = max(rss, one["maxrss_mb"], many["maxrss_mb"])
    version = subprocess.run([str(SDCPP), "--version"], capture_output=True, text=True).stdout.strip()[:80]
    notes = "per step from its 'sampling completed' log" if own else "per step from process wall times"
    return dict(load_s=None, cold_s=cold, rows=rows, maxrss_mb=rss, versions={"sd.cpp": version},
                notes=notes + ("; converted at load from the fp32 file" if convert else ""))


# ---- the run --------------------------------------------------------------------------------------------
def skip_reason(peer: str) -> str | None:
    if peer.startswith("sdcpp"):
        model = WEIGHTS / f"sd15-{peer.split('-', 1)[1]}.gguf"
        if not SDCPP.is_file():
            return f"no sd-cli at {SDCPP} (benchmarks/PEERS.md)"
        ready = model.is_file() or (WEIGHTS / "sd15.safetensors").is_file()
        return None if ready else f"no {model} (run: python benchmarks/cpu_peers.py setup)"
    if peer.startswith("diffusers"):
        try:
            import diffusers  # noqa: F401
        except ImportError:
            return "diffusers not installed"
    return None


def measure(peer: str, args: argparse.Namespace, images: Path) -> dict[str, Any]:
    out = images / peer
    out.mkdir(parents=True, exist_ok=True)
    reason = skip_reason(peer)
    if reason:
        return dict(skipped=reason)
    if peer.startswith("sdcpp"):
        return sdcpp_case(peer, args, out)
    case = python_case(peer, args, out)
    if isinstance(case, str):
        return dict(skipped=case)
    return run_python(*case, threads=args.threads, timeout=args.timeout)


def image_difference(images: Path, peer: str, size: int) -> str:
    """Mean and max |difference| to latentdiff fp32's image, in 8-bit levels; "-" where not comparable."""
    import numpy as np

    ours, theirs = images / "latentdiff-fp32" / f"{size}.npy", images / peer / f"{size}.npy"
    if peer.startswith("sdcpp"):
        return "not comparable (own CLIP vocabulary and RNG)"
    if not (ours.is_file() and theirs.is_file()):
        return "-"
    mean, most = level_difference(np.load(ours), np.load(theirs))
    return f"{mean:.2f} / {most:.1f}"


def level_difference(ours: Any, theirs: Any) -> tuple[float, float]:
    """Mean and max |difference| of two images with values in 0..1, in 8-bit levels."""
    import numpy as np

    diff = np.abs(np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)) * 255
    return float(diff.mean()), float(diff.max())


def report(results: list[tuple[str, dict[str, Any]]], args: argparse.Namespace, images: Path) -> list[dict]:
    rows: list[dict] = []
    for peer, result in results:
        if "skipped" in result:
            rows.append(dict(peer=peer, skipped=result["skipped"]))
            continue
        for row in result["rows"]:
            rows.append(dict(peer=peer, **row, cold_s=result["cold_s"], maxrss_mb=result["maxrss_mb"],
                             notes=result.get("notes", ""), versions=result.get("versions", {}),
                             image_diff=image_difference(images, peer, row["size"])))
    print(f"| peer | size | s / CFG step | vs latentdiff best | CPU s / CFG step | {args.steps}-step image "
          "| est. 20-step image | cold start to 1st image | peak RSS | image diff to latentdiff fp32 "
          "(mean / max, 0-255) | note |")
    print("|" + "---|" * 11)
    for size in args.sizes:
        ours = [r["per_step_s"] for r in rows if r.get("size") == size and r["peer"].startswith("latentdiff")]
        best = min(ours) if ours else float("nan")
        for r in rows:
            if r.get("size") != size:
                continue
            r["vs_latentdiff_best"] = r["per_step_s"] / best
            est = r["one_step_s"] + 19 * r["per_step_s"]
            ratio = "-" if best != best else f"{r['vs_latentdiff_best']:.2f}x"  # no latentdiff row in this run
            print(f"| {r['peer']} | {size} | {r['per_step_s']:.2f} | {ratio} "
                  f"| {r.get('cpu_per_step_s', float('nan')):.2f} | {r['image_s']:.1f} s | {est:.1f} s "
                  f"| {r['cold_s']:.1f} s | {r['maxrss_mb']:.0f} MB "
                  f"| {r['image_diff']} | {r['notes']} |")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['peer']} | - | skipped: {r['skipped']} | | | | | | | | |")
    print("\nvs latentdiff best: the peer's seconds per CFG step / latentdiff's fastest path's at that size "
          "(below 1: the peer is faster). CPU s: the process's CPU time per step, all threads (less sensitive to "
          "a loaded machine than wall time). Peak RSS: the whole process, all sizes.", flush=True)
    return rows


def run(args: argparse.Namespace) -> None:
    print("## CPU peers (issue 20)\n")
    print(f"- machine: {common.cpu_model()}, {os.cpu_count()} cores, {args.threads} threads per peer; load at "
          f"start {common.load()}")
    print(f"- Euler, guidance 7.5, batch 1, per CFG step from 1- and {args.steps}-step images; sizes {args.sizes}\n",
          flush=True)
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    repeat = [p for p in args.repeat.split(",") if p in peers]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        images = args.images or Path(tmp)  # --images: kept, so runs sharing it compare with each other's images
        for round_, names in enumerate((peers, repeat[::-1])):
            for peer in names:
                print(f"(round {round_ + 1}: {peer} ...)", file=sys.stderr, flush=True)
                start = time.perf_counter()
                try:
                    result = measure(peer, args, images)
                except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as error:
                    result = dict(skipped=f"failed: {str(error).strip().splitlines()[-1][:200]}")
                print(f"({peer}: {time.perf_counter() - start:.0f} s: {json.dumps(result)})", file=sys.stderr,
                      flush=True)  # each result as it comes: a run cut short still leaves its rows
                results.append((peer if round_ == 0 else f"{peer} (again)", result))
        rows = report(results, args, images)
    print(f"\nload at end: {common.load()}")
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows,
                                             cpu=common.cpu_model(), load_end=common.load()), indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("run", "setup"), nargs="?", default="run",
                   help="setup: build the shared weights (benchmarks/PEERS.md); run: measure")
    p.add_argument("--sizes", default="256,512", help="image sides, comma-separated (default 256,512)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads per peer (default: cores)")
    p.add_argument("--steps", type=int, default=5, help="steps of the timed image (>= 2; default 5)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {', '.join(PEERS)}")
    p.add_argument("--repeat", default=KEY_PEERS, help="peers measured a second time, in reverse order, after "
                   f"all the others (default {KEY_PEERS}; '' for none)")
    p.add_argument("--latentdiff-options", default="", help="extra from_pretrained keywords for the latentdiff "
                   "peers, as Python source, e.g. ', some_option=True'")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per peer process")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--images", type=Path, default=None, help="keep each peer's images here (default: a temporary "
                   "folder); runs given the same folder compare with latentdiff fp32's image from either")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.steps < 2:
        p.error("--steps must be at least 2 (per step = difference of 1- and S-step images)")
    if args.action == "setup":
        from peers_setup import setup

        setup(WEIGHTS, sdcpp=SDCPP, ov_python=OV_PYTHON)
    else:
        run(args)


if __name__ == "__main__":
    main()
