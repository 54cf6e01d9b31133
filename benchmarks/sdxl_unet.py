"""The full-size SDXL base UNet's forward, latentdiff against diffusers, on the same weights.

Stable Diffusion XL 1.0 base's UNet (2.6 B parameters, its real config, random weights: benchmarks/sdxl_folder.py),
batch 2 (one classifier-free-guidance step), 77 context tokens of width 2048, the pooled text embedding (1280) and
the six micro-conditioning numbers, at 1024 px (128 x 128 latents; `--size 512` for a quick run).

One copy of the UNet is 5.1 GB in bf16 and 10.3 GB in fp32; two fp32 copies do not fit beside anything else on a
24 GB machine. So each library runs in its own fresh process, one at a time: it loads the UNet from the shared
folder (diffusers' and latentdiff's own `from_pretrained`), runs `--warmup` untimed and `--reps` timed forwards and
saves its output, which this process compares across libraries (max |a - b| / max |b|, the tests' measure). The
processes alternate (ours, diffusers, then diffusers, ours with `--children 2`) so that load from other jobs falls
on both. Reduced precisions are also compared against diffusers' fp32 output when fp32 is in `--dtype`.

    python benchmarks/sdxl_unet.py                              # 1024 px, bf16 and fp32 (~10 min on 2 cores)
    python benchmarks/sdxl_unet.py --size 512 --dtype bf16      # quick (~2 min)
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import common

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TIME_IDS = (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)  # original size, crop top-left, target size (pixels)


def inputs(size: int, *, dtype: Any, device: str, batch: int = 2, seed: int = 0) -> tuple:
    """(x (B, 4, size, size), t, context (B, 77, 2048), added_cond) drawn in fp32 from `seed`, cast to dtype."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    context = torch.randn(batch, 77, 2048, generator=g)
    pooled = torch.randn(batch, 1280, generator=g)
    ids = torch.tensor([TIME_IDS] * batch)
    added = {"text_embeds": pooled.to(device, dtype), "time_ids": ids.to(device, dtype)}
    return x.to(device, dtype), torch.tensor(500, device=device), context.to(device, dtype), added


def load(lib: str, folder: Path, dtype: Any, device: str) -> Any:
    """The UNet of `folder` by `lib`'s own from_pretrained, in dtype on device, eval mode."""
    if lib == "latentdiff":
        from latentdiff import UNet2DConditional

        return UNet2DConditional.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, device=device).eval()
    import diffusers

    common.quiet_diffusers()
    model = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
    return model.to(device).eval()


def child(lib: str, folder: str, dtype_name: str, size: int, out: str, reps: int, warmup: int, device: str) -> dict:
    """Run in a fresh process: load, `warmup` + `reps` forwards, save the last output (fp32) to `out`."""
    import resource
    import time

    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    start = time.perf_counter()
    model = load(lib, Path(folder), dtype, device)
    load_s = time.perf_counter() - start
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    x, t, context, added = inputs(size, dtype=dtype, device=device)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            if lib == "latentdiff":
                return model(x, t, context, added_cond=added)
            return model(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample

    firsts, times = [], []
    for i in range(warmup + reps):
        common.synchronize(device)
        start = time.perf_counter()
        output = forward()
        common.synchronize(device)
        (firsts if i < warmup else times).append(time.perf_counter() - start)
    torch.save(output.float().cpu(), out)
    return dict(load_s=load_s, warmup=firsts, times=times, peak_after_load_mb=after_load)


def together(folder: Path, dtype_name: str, size: int, args: Any) -> tuple[dict[str, list[float]], dict]:
    """Both libraries' UNets in this process (two copies: bf16 fits a 24 GB machine, fp32 does not), forwards
    alternating after `args.warmup` warm-ups each: on a machine shared with other jobs, load falls on both alike.
    Returns (lib -> seconds per forward, lib -> output)."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    x, t, context, added = inputs(size, dtype=dtype, device=args.device)
    ours, theirs = (load(lib, folder, dtype, args.device) for lib in ("latentdiff", "diffusers"))

    def call_ours() -> torch.Tensor:
        with torch.inference_mode():
            return ours(x, t, context, added_cond=added)

    def call_theirs() -> torch.Tensor:
        with torch.inference_mode():
            return theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample

    outputs = {"latentdiff": call_ours().float().cpu(), "diffusers": call_theirs().float().cpu()}  # a warm-up each
    times = common.alternate({"latentdiff": call_ours, "diffusers": call_theirs}, reps=args.reps,
                             warmup=max(args.warmup - 1, 0), device=args.device)
    return times, outputs


def run(lib: str, folder: Path, dtype_name: str, size: int, out: Path, args: Any) -> dict:
    """`child` in a fresh interpreter (its own peak RSS in the result as maxrss_mb)."""
    call = json.dumps([lib, str(folder), dtype_name, size, str(out), args.reps, args.warmup, args.device])
    code = ("import json, sys\nsys.path.insert(0, 'benchmarks')\nimport sdxl_unet\n"
            f"RESULT = sdxl_unet.child(*json.loads({call!r}))\n") + common.CHILD_EXIT
    return common.run_child(code)[0]


def rows(table: common.Table, folder: Path, name: str, side: int, tmp: Path, args: Any, gflop: float,
         references: dict[str, Any]) -> None:
    """The rows of one precision: forward time, parity, and (one library per process) load time and peak RSS."""
    import torch

    libs = ("latentdiff", "diffusers")
    what = f"SDXL UNet {args.size} px, {name} / {name}"
    runs: dict[str, list[dict]] = {lib: [] for lib in libs}
    if args.together and name != "fp32":
        times, outputs = together(folder, name, side, args)
        per = [times[lib] for lib in libs]
        what += " (one process, alternating)"
    else:
        for rep in range(args.children):
            for lib in (libs if rep % 2 == 0 else libs[::-1]):
                runs[lib].append(run(lib, folder, name, side, tmp / f"{lib}-{name}.pt", args))
                print(f"({lib} {name}: {[round(t, 2) for t in runs[lib][-1]['times']]} s per forward)", flush=True)
        outputs = {lib: torch.load(tmp / f"{lib}-{name}.pt") for lib in libs}
        per = [[t for r in runs[lib] for t in r["times"]] for lib in libs]
    if name == "fp32":
        references.update(outputs)
    rate = gflop / min(per[0]), gflop / min(per[1])
    table.compare(f"{what}: forward", *per, error=common.max_rel_error(outputs["latentdiff"], outputs["diffusers"]),
                  note=f"{rate[0]:.0f} / {rate[1]:.0f} GFLOP/s (fastest)")
    if references and name != "fp32":
        errors = [common.max_rel_error(outputs[lib], references["diffusers"]) for lib in libs]
        table.add(f"{what}: error vs diffusers fp32 output", "-", "-", "-", "-", "-",
                  f"{errors[0]:.1e} / {errors[1]:.1e}", "latentdiff's / diffusers' own")
    if not runs["latentdiff"]:
        return
    firsts = [[r["warmup"][0] for r in runs[lib] if r["warmup"]] for lib in libs]
    if all(firsts):
        table.compare(f"{what}: first forward of a process", *firsts)
    table.compare(f"{what}: from_pretrained", *[[r["load_s"] for r in runs[lib]] for lib in libs])
    for key, label in (("peak_after_load_mb", "peak RSS after load"), ("maxrss_mb", "peak RSS")):
        table.compare(f"{what}: {label}", *[[r[key] for r in runs[lib]] for lib in libs],
                      unit=lambda v: f"{v:.0f} MB")


def flops(folder: Path, size: int) -> float:
    """FLOPs of one forward (torch.utils.flop_counter), counted on the meta device: no memory, no arithmetic."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from latentdiff import UNet2DConditional

    config = UNet2DConditional.load_config(folder / "unet")
    with torch.device("meta"):
        model = UNet2DConditional(config).eval()
        x, t, context, added = inputs(size, dtype=torch.float32, device="meta")
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(x, t, context, added_cond=added)
    return counter.get_total_flops()


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="image side in pixels (latents: size / 8); default 1024, "
                   "quick: 512")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                   help="precisions, each library in each (default: bf16 fp32 on CPU, fp16 fp32 on CUDA)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per process (default 1)")
    p.add_argument("--children", type=int, default=1, help="processes per library and precision (default 1)")
    p.add_argument("--together", action="store_true", help="reduced precisions: both libraries in this process, "
                   "forwards alternating (two copies: 10.3 GB in bf16); fp32 always runs one library per process")
    args = p.parse_args()
    args.device = common.device_of(args)
    args.size = args.size or (512 if args.quick else 1024)
    args.reps = args.reps or (1 if args.quick else 2)
    args.dtype = args.dtype or ["fp16" if args.device == "cuda" else "bf16", "fp32"]
    if args.size % 8:
        p.error(f"--size must be a multiple of 8 (the VAE factor), got {args.size}")
    common.header("SDXL UNet forward", args)
    folder = common.folder("sdxl")
    side = args.size // 8
    gflop = flops(folder, side) / 1e9
    import torch

    rates = {d: common.gemm_rate(getattr(torch, DTYPES[d]), device=args.device) for d in args.dtype}
    print(f"forward: {gflop / 1e3:.1f} TFLOP (batch 2, {side}x{side} latents); measured GEMM rate (2048^3): "
          + ", ".join(f"{d} {r:.0f} GFLOP/s" for d, r in rates.items()) + "\n", flush=True)
    table = common.Table(f"SDXL base UNet (2.6 B), batch 2, {args.size} px ({side}x{side} latents), "
                         f"{args.reps} timed forwards per process after {args.warmup} warm-up",
                         common.COMPARE_COLUMNS)
    with tempfile.TemporaryDirectory() as tmp:
        references: dict[str, Any] = {}
        for name in sorted(args.dtype, key=lambda d: d != "fp32"):  # fp32 first: the reference of the others
            rows(table, folder, name, side, Path(tmp), args, gflop, references)
    table.print()
    common.footer()
    common.write_json(args.json, [table], gemm_gflops=rates, forward_gflop=gflop)


if __name__ == "__main__":
    main()
