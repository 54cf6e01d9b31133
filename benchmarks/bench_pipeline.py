"""The whole text-to-image pipeline, latentdiff against diffusers, on the same folder and latents.

- SD 1.5-size pipeline, 10 DDIM steps, guidance 7.5, batch 1, 256 px (and 512 px with --size 512): each
  library in its own fresh process (alternating), which loads, generates `--calls` images and reports the
  time of each call and its own peak RSS (ru_maxrss) after loading and at the end. The images are compared.
  Full mode adds latentdiff in bf16 (CPU; fp16 on CUDA) against diffusers fp32 and diffusers in that precision.
- The tests' tiny pipeline at 64 px, in this process: time per denoising step, as (t(12 steps) - t(2 steps)) / 10
  so that prompt encoding and decoding cancel, and aten ops per step counted the same way.

    python benchmarks/bench_pipeline.py [--quick] [--size 256 512] [--calls 2]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import common

CHILD = """
import resource, time
import numpy as np, torch
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
{imports}
t0 = time.perf_counter()
pipe = {load}
load_s = time.perf_counter() - t0
rss_after_load = peak_mb()
# in the pipeline's dtype: diffusers uses given latents as they are (fp32 latents break its bf16 UNet)
latents = torch.randn((1, 4, {size} // 8, {size} // 8), generator=torch.Generator().manual_seed(0)).to({dtype})
calls = []
for _ in range({calls}):
    t0 = time.perf_counter()
    image = pipe({prompt!r}, negative_prompt={negative!r}, num_inference_steps={steps}, guidance_scale=7.5,
                 height={size}, width={size}, latents=latents, output_type="np"{extra}).images
    calls.append(time.perf_counter() - t0)
np.save({out!r}, np.asarray(image, dtype=np.float32))
gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
RESULT = dict(load_s=load_s, calls=calls, peak_after_load_mb=rss_after_load, gpu_peak_mb=gpu_mb)
"""
LIBS = {
    "latentdiff": ("from latentdiff import LatentDiffusionPipeline",
                   "LatentDiffusionPipeline.from_pretrained({folder!r}, torch_dtype={dtype}, device={device!r})",
                   ", progress=False"),
    "diffusers": ("import diffusers\nfrom diffusers import StableDiffusionPipeline\n"
                  "diffusers.utils.logging.disable_progress_bar()",
                  "StableDiffusionPipeline.from_pretrained({folder!r}, torch_dtype={dtype}).to({device!r})\n"
                  "pipe.set_progress_bar_config(disable=True)", ""),
}


def child_code(lib: str, folder: Path, out: Path, *, size: int, steps: int, calls: int, dtype: str,
               device: str, release: str = "default") -> str:
    imports, load, extra = LIBS[lib]
    load = load.format(folder=str(folder), dtype=dtype, device=device)
    if lib == "latentdiff" and release != "default":  # mapped weights and release_weights (docs/memory.md)
        load = load[:load.rindex(")")] + ", mmap_weights=True)"
        load += f"\npipe.release_weights = {dict(stages=True, blocks='blocks', off=False)[release]!r}"
    return CHILD.format(imports=imports, load=load,
                        dtype=dtype, size=size, calls=calls, prompt=common.PROMPT, negative=common.NEGATIVE,
                        steps=steps, out=str(out), extra=extra) + common.CHILD_EXIT


def sd15_rows(table: common.Table, args, device: str) -> None:
    import numpy as np

    folder = common.folder("sd15")
    low = "torch.float16" if device == "cuda" else "torch.bfloat16"
    cases = [("fp32 / fp32", {"ours": "torch.float32", "theirs": "torch.float32"})]
    if not args.quick:
        cases.append((f"ours {low[6:]} / diffusers fp32 and {low[6:]}",
                      {"ours": low, "theirs": "torch.float32", "theirs_low": low}))
    for size in args.size:
        for label, dtypes in cases:
            with tempfile.TemporaryDirectory() as tmp:
                runs = {name: [] for name in dtypes}
                order = list(dtypes)
                for rep in range(args.children):
                    for name in (order if rep % 2 == 0 else order[::-1]):
                        lib = "latentdiff" if name == "ours" else "diffusers"
                        code = child_code(lib, folder, Path(tmp) / f"{name}.npy", size=size, steps=args.steps,
                                          calls=args.calls, dtype=dtypes[name], device=device, release=args.release)
                        runs[name].append(common.run_child(code)[0])
                images = {name: np.load(Path(tmp) / f"{name}.npy") for name in dtypes}
            what = f"SD1.5 {size} px, {args.steps} steps, {label}" + \
                ("" if args.release == "default" else f" (ours: release_weights {args.release})")
            error = common.max_rel_error(images["ours"], images["theirs"])

            def pick(name, key, runs=runs):
                return [r[key] for r in runs[name]]

            def call_times(name, index, runs=runs):
                return [r["calls"][index] for r in runs[name]]

            note = "error: vs diffusers fp32 image" if "theirs_low" in dtypes else ""
            table.compare(f"{what}: first call", call_times("ours", 0), call_times("theirs", 0), error=error, note=note)
            if args.calls > 1:
                table.compare(f"{what}: later calls", call_times("ours", -1), call_times("theirs", -1))
            if "theirs_low" in dtypes:
                table.compare(f"{what}: first call vs diffusers {low[6:]}", call_times("ours", 0),
                              call_times("theirs_low", 0),
                              error=common.max_rel_error(images["theirs_low"], images["theirs"]),
                              note="error column: diffusers' own error vs its fp32 image")
            table.compare(f"{what}: from_pretrained", pick("ours", "load_s"), pick("theirs", "load_s"))
            mb = dict(unit=lambda v: f"{v:.0f} MB")
            table.compare(f"{what}: peak RSS after load", pick("ours", "peak_after_load_mb"),
                          pick("theirs", "peak_after_load_mb"), **mb)
            table.compare(f"{what}: peak RSS", pick("ours", "maxrss_mb"), pick("theirs", "maxrss_mb"), **mb)
            if "theirs_low" in dtypes:
                table.compare(f"{what}: peak RSS after load vs diffusers {low[6:]}", pick("ours", "peak_after_load_mb"),
                              pick("theirs_low", "peak_after_load_mb"), **mb)
                table.compare(f"{what}: peak RSS vs diffusers {low[6:]}", pick("ours", "maxrss_mb"),
                              pick("theirs_low", "maxrss_mb"), **mb)
            if device == "cuda":
                table.compare(f"{what}: peak GPU memory allocated", pick("ours", "gpu_peak_mb"),
                              pick("theirs", "gpu_peak_mb"), **mb)


def tiny_rows(table: common.Table, reps: int, device: str) -> None:
    import diffusers
    import torch

    from latentdiff import LatentDiffusionPipeline

    common.quiet_diffusers()
    folder = common.folder("tiny")
    ours = LatentDiffusionPipeline.from_pretrained(folder, device=device)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder).to(device)
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    kw = dict(negative_prompt=common.NEGATIVE, guidance_scale=7.5, height=64, width=64, latents=latents,
              output_type="np")

    def runner(pipe, steps, **extra):
        return lambda: pipe(common.PROMPT, num_inference_steps=steps, **kw, **extra).images

    cases = {(lib, steps): runner(pipe, steps, **extra) for lib, pipe, extra in
             (("ours", ours, {"progress": False}), ("theirs", theirs, {})) for steps in (2, 12)}
    error = common.max_rel_error(cases["ours", 12](), cases["theirs", 12]())
    times = common.alternate(cases, reps=reps, warmup=1, device=device)
    # Order statistics paired (fastest 12-step run minus fastest 2-step run, and so on): a difference of two noisy
    # runs taken at random can even come out negative on a busy machine; the fastest runs are the least disturbed.
    per_step = {lib: [(a - b) / 10 for a, b in zip(sorted(times[lib, 12]), sorted(times[lib, 2]), strict=True)]
                for lib in ("ours", "theirs")}
    ops = {lib: (sum(common.count_ops(cases[lib, 12])[0].values()) - sum(common.count_ops(cases[lib, 2])[0].values()))
           / 10 for lib in ("ours", "theirs")}
    table.compare("tiny pipeline 64 px: per denoising step", per_step["ours"], per_step["theirs"], error=error,
                  note=f"aten ops from Python per step: {ops['ours']:.0f} / {ops['theirs']:.0f}")
    table.compare("tiny pipeline 64 px: whole call, 12 steps", times["ours", 12], times["theirs", 12])


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs="+", default=[256], help="image sides of the SD1.5 rows (256 512)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of the SD1.5 rows (peak RSS needs 1)")
    p.add_argument("--calls", type=int, default=None, help="images per child process (default 1; full: 2)")
    p.add_argument("--children", type=int, default=None, help="processes per library (default 1; full: 2)")
    p.add_argument("--skip-sd15", action="store_true", help="only the tiny pipeline")
    p.add_argument("--release", choices=("default", "stages", "blocks", "off"), default="default",
                   help="latentdiff's weights in the SD1.5 rows: default (copied into memory), or memory-mapped "
                   "(mmap_weights=True) and released: stages (after each stage; the default until issue 14), "
                   "blocks (after each UNet block, every step), off (never)")
    args = p.parse_args()
    args.calls = args.calls or (1 if args.quick else 2)
    args.children = args.children or (1 if args.quick else 2)
    common.header("Whole pipeline", args)
    device = common.device_of(args)
    table = common.Table("Text-to-image pipeline, batch 1, guidance 7.5, DDIM", common.COMPARE_COLUMNS)
    tiny_rows(table, args.reps or (5 if args.quick else 15), device)
    if not args.skip_sd15:
        sd15_rows(table, args, device)
    table.print()
    common.footer()
    common.write_json(args.json, [table])


if __name__ == "__main__":
    main()
