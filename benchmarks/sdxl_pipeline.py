"""The whole SDXL text-to-image pipeline, latentdiff against diffusers' StableDiffusionXLPipeline, same folder and
latents.

The folder is Stable Diffusion XL 1.0 base's architecture with random weights (2.6 B UNet, SDXL VAE, CLIP ViT-L/14
and OpenCLIP bigG/14 text encoders, bf16 files: benchmarks/sdxl_folder.py). Each library runs in its own fresh
process (they alternate), which loads the folder with its own `from_pretrained`, generates `--calls` images at
`--size` px with `--steps` Euler steps (the folder's scheduler), guidance 5.0 and a negative prompt, from the same
initial latents, and reports each call's time and its own peak RSS (ru_maxrss) after loading and at the end. The
images are compared (max |a - b| / max |b|).

- `--release`: the memory options. latentdiff: `mmap_weights=True` (weights mapped from the files, not copied; the
  file's dtype must be the pipeline's, so bf16 here) with `release_weights` "blocks" (each UNet block's pages given
  back after its forward) or "stages" (each network's after its stage), and VAE tiling and slicing; diffusers:
  VAE tiling and slicing (it has no CPU-side release). The peak RSS of a 1024 px generation:
  `--size 1024 --steps 1 --release blocks`.
- `--device cuda --dtype float16 --compile`: on a GPU, latentdiff's `pipe.compile()` against diffusers with its
  UNet under `torch.compile(fullgraph=True)`; the first call includes compilation, so use `--calls 2`. Without a
  CUDA device this prints that it was skipped and exits 0.

    python benchmarks/sdxl_pipeline.py --size 512 --steps 4                 # bf16 on the CPU
    python benchmarks/sdxl_pipeline.py --size 1024 --steps 1 --release blocks
    python benchmarks/sdxl_pipeline.py --device cuda --dtype float16 --compile --size 1024 --steps 30 --calls 2
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import common

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
RELEASE = {"blocks": "blocks", "stages": True}  # --release -> latentdiff's pipe.release_weights
GUIDANCE = 5.0
SYNTAX = "plain"  # latentdiff's prompt_syntax: diffusers reads prompts as plain text


def load(lib: str, folder: Path, dtype: Any, device: str, release: str | None) -> Any:
    """`lib`'s StableDiffusionXLPipeline of `folder`, with the memory options of `release` (None: defaults)."""
    if lib == "latentdiff":
        from latentdiff import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype, device=device,
                                                         mmap_weights=release is not None)
        if release is not None:
            pipe.release_weights = RELEASE[release]
            pipe.enable_vae_tiling()
            pipe.enable_vae_slicing()
        return pipe
    import diffusers

    common.quiet_diffusers()
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype, add_watermarker=False)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if release is not None:
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
    return pipe


def child(lib: str, folder: str, dtype_name: str, size: int, steps: int, calls: int, device: str,
          release: str | None, compile_: bool, out: str) -> dict:
    """Run in a fresh process: load, `calls` generations, the last image saved to `out` (.npy)."""
    import resource
    import time

    import numpy as np
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    start = time.perf_counter()
    pipe = load(lib, Path(folder), dtype, device, release)
    load_s = time.perf_counter() - start
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if compile_:
        if lib == "latentdiff":
            pipe.compile()
        else:
            pipe.unet = torch.compile(pipe.unet, fullgraph=True)
    # in the pipeline's dtype: diffusers uses given latents as they are
    latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(0))
    latents = latents.to(device, dtype)
    extra = {"progress": False, "prompt_syntax": SYNTAX} if lib == "latentdiff" else {}
    times = []
    for _ in range(calls):
        common.synchronize(device)
        start = time.perf_counter()
        images = pipe(common.PROMPT, negative_prompt=common.NEGATIVE, num_inference_steps=steps,
                      guidance_scale=GUIDANCE, height=size, width=size, latents=latents, output_type="np",
                      **extra).images
        common.synchronize(device)
        times.append(time.perf_counter() - start)
    np.save(out, np.asarray(images, dtype=np.float32))
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return dict(load_s=load_s, calls=times, peak_after_load_mb=after_load, gpu_peak_mb=gpu_mb)


def prompt_stage(folder: Path, dtype_name: str, device: str, syntax: str) -> list[float]:
    """Both libraries' encode_prompt in this process (text encoders only: the UNet and VAE are not loaded; ours gets
    meta-device stand-ins, diffusers None) -> max rel err of (prompt_embeds, negative, pooled, negative pooled)."""
    import diffusers
    import torch

    from latentdiff import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditional

    dtype = getattr(torch, DTYPES[dtype_name])
    with torch.device("meta"):
        unet = UNet2DConditional(UNet2DConditional.load_config(folder / "unet")).to(dtype)
        vae = AutoencoderKL(AutoencoderKL.load_config(folder / "vae")).to(dtype)
    ours = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype, device=device, unet=unet, vae=vae)
    mine = ours.encode_prompt(common.PROMPT, negative_prompt=common.NEGATIVE, prompt_syntax=syntax)
    del ours
    common.quiet_diffusers()
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype, unet=None, vae=None,
                                                                 add_watermarker=False).to(device)
    with torch.inference_mode():
        want = theirs.encode_prompt(common.PROMPT, device=torch.device(device), num_images_per_prompt=1,
                                    do_classifier_free_guidance=True, negative_prompt=common.NEGATIVE)
    return [common.max_rel_error(a.float().cpu(), b.float().cpu()) for a, b in zip(mine, want, strict=True)]


def alone(title: str, runs: list[dict], lib: str) -> None:
    """One library's figures (medians over its processes), without a comparison."""
    table = common.Table(f"{title}: {lib} alone", ("what", lib, "n"))
    for key, label, unit in (("calls", "first call", common.fmt_time), ("load_s", "from_pretrained", common.fmt_time),
                             ("peak_after_load_mb", "peak RSS after load", lambda v: f"{v:.0f} MB"),
                             ("maxrss_mb", "peak RSS", lambda v: f"{v:.0f} MB")):
        values = [r[key][0] if key == "calls" else r[key] for r in runs]
        table.add(label, unit(common.median(values)), len(values))
    table.print()
    common.footer()


def run(lib: str, folder: Path, out: Path, args: Any) -> dict:
    """`child` in a fresh interpreter (its own peak RSS in the result as maxrss_mb)."""
    call = json.dumps([lib, str(folder), args.dtype, args.size, args.steps, args.calls, args.device,
                       args.release, args.compile, str(out)])
    code = ("import json, sys\nsys.path.insert(0, 'benchmarks')\nimport sdxl_pipeline\n"
            f"RESULT = sdxl_pipeline.child(*json.loads({call!r}))\n") + common.CHILD_EXIT
    return common.run_child(code)[0]


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512; quick: 256)")
    p.add_argument("--steps", type=int, default=4, help="Euler steps (default 4)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="both pipelines' dtype (default: bf16 on CPU, float16 on CUDA)")
    p.add_argument("--calls", type=int, default=1, help="images per process (default 1; 2 with --compile)")
    p.add_argument("--children", type=int, default=1, help="processes per library (default 1)")
    p.add_argument("--release", choices=sorted(RELEASE), default=None,
                   help="memory options (module docstring): latentdiff mmap_weights + release_weights, VAE tiling and "
                   "slicing in both")
    p.add_argument("--libs", nargs="+", choices=("latentdiff", "diffusers"), default=["latentdiff", "diffusers"],
                   help="one library alone: its figures, no comparison (a re-run after a change on one side)")
    p.add_argument("--compile", action="store_true", help="CUDA only: latentdiff pipe.compile(), diffusers' UNet "
                   "under torch.compile")
    p.add_argument("--prompt-stage", action="store_true", help="instead: both libraries' encode_prompt in this process "
                   "(text encoders only), fp32 and bf16, the four outputs compared")
    args = p.parse_args()
    import torch

    if args.prompt_stage:
        common.header("SDXL prompt stage", args)
        folder = common.folder("sdxl")
        table = common.Table("SDXL encode_prompt, latentdiff against diffusers (max rel err)",
                             ("dtype", "prompt_embeds", "negative", "pooled", "negative pooled"))
        for name in ("float32", "bfloat16"):
            table.add(name, *(f"{e:.1e}" for e in prompt_stage(folder, name, common.device_of(args), SYNTAX)))
        table.print()
        common.footer()
        return

    if args.device == "cuda" and not torch.cuda.is_available():
        print("sdxl_pipeline: skipped, --device cuda asked and no CUDA device is available")
        return
    args.device = common.device_of(args)
    if args.compile and args.device != "cuda":
        p.error("--compile is measured on CUDA only: add --device cuda (CPU compilation of the 2.6 B UNet takes "
                "longer than the runs it would speed up here)")
    args.dtype = DTYPES[args.dtype or ("float16" if args.device == "cuda" else "bfloat16")]
    args.size = args.size or (256 if args.quick else 512)
    if args.compile and args.calls < 2:
        args.calls = 2
    if args.size % 8:
        p.error(f"--size must be a multiple of 8 (the VAE factor), got {args.size}")
    if args.release and args.dtype != "bfloat16":
        print("note: the folder's weights are bf16; with another dtype mmap_weights maps nothing (cast copies)",
              file=sys.stderr)
    common.header("SDXL pipeline", args)
    folder = common.folder("sdxl")
    options = f", ours: mmap_weights + release_weights {args.release}, VAE tiled + sliced in both" \
        if args.release else ""
    title = (f"SDXL base text-to-image, {args.size} px, {args.steps} Euler steps, guidance {GUIDANCE}, batch 1, "
             f"{args.dtype}{', compiled' if args.compile else ''}{options}")
    table = common.Table(title, common.COMPARE_COLUMNS)
    libs = tuple(lib for lib in ("latentdiff", "diffusers") if lib in args.libs)
    runs: dict[str, list[dict]] = {lib: [] for lib in libs}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.children):
            for lib in (libs if rep % 2 == 0 else libs[::-1]):
                runs[lib].append(run(lib, folder, Path(tmp) / f"{lib}.npy", args))
                r = runs[lib][-1]
                print(f"({lib}: calls {[round(t, 2) for t in r['calls']]} s, peak RSS {r['maxrss_mb']:.0f} MB)",
                      flush=True)
        import numpy as np

        images = {lib: np.load(Path(tmp) / f"{lib}.npy") for lib in libs}
    if len(libs) == 1:
        alone(title, runs[libs[0]], libs[0])
        return
    error = common.max_rel_error(images["latentdiff"], images["diffusers"])

    def pick(key: str, index: int | None = None) -> list[list[float]]:
        return [[r[key] if index is None else r[key][index] for r in runs[lib]] for lib in libs]

    first = "first call (compilation included)" if args.compile else "first call"
    table.compare(first, *pick("calls", 0), error=error, note="error: the images")
    if args.calls > 1:
        table.compare("later calls", *pick("calls", -1))
    table.compare("from_pretrained", *pick("load_s"))
    mb = dict(unit=lambda v: f"{v:.0f} MB")
    table.compare("peak RSS after load", *pick("peak_after_load_mb"), **mb)
    table.compare("peak RSS", *pick("maxrss_mb"), **mb)
    if args.device == "cuda":
        table.compare("peak GPU memory allocated", *pick("gpu_peak_mb"), **mb)
    table.print()
    common.footer()
    common.write_json(args.json, [table])


if __name__ == "__main__":
    main()
