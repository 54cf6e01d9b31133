"""The cheaper-step switches (issue 20) against the plain run: SD 1.5 at 512 px, and the built-in model's checker.

Part 1, Stable Diffusion 1.5 (its real architecture, random weights: the `sd15` folder of benchmarks/common.py),
one image at `--size` px, `--steps` DPM++ 2M Karras steps, CFG 7.5, the same seed for every case. For each switch
(DeepCache interval 3 branch 0, token merging at ratio 0.3 and 0.5, CFG truncation at 0.5, FreeU with SD 1.5's
published factors) against the plain run: the whole call's time (one image), the median time between two steps
(from the step callback), the number of UNet forwards and their batch rows, and the image's difference to the plain
run's (mean absolute difference in [0, 255] and PSNR). With random weights there is no quality measure: the
difference only says how far each switch moves the image, not whether it is worse.

Part 2, the built-in model `latentdiff/shapes-64` at its own settings (DDIM 50, guidance 1.5): the held-out
checker's scores (data/shapes_eval.py, `--count` images, seeds of the reported figures) with each switch, and the
time per image, so each speed-up has its quality side.

    python benchmarks/fast_switches.py --threads 1                 # both parts (~25 min on 2 loaded cores)
    python benchmarks/fast_switches.py --quick                     # 256 px, 10 steps, 50 checker images
    python benchmarks/fast_switches.py --only shapes --count 200
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import common

# name -> (what the pipeline is given before the call, extra call arguments)
SWITCHES: dict[str, tuple[Callable[[Any], None] | None, dict[str, Any]]] = {
    "plain": (None, {}),
    "DeepCache 3 / branch 0": (lambda p: p.enable_deepcache(cache_interval=3, cache_branch_id=0), {}),
    "ToMe 0.3": (lambda p: enable_tome(p, 0.3), {}),
    "ToMe 0.5": (lambda p: enable_tome(p, 0.5), {}),
    "CFG truncation 0.5": (None, {"cfg_truncation": 0.5}),
    "FreeU (SD 1.5 factors)": (lambda p: p.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6), {}),
}


def enable_tome(pipe: Any, ratio: float) -> None:
    """tomesd's reach (the levels at the latent's full resolution); on a model with no attention there (the
    built-in model, SDXL), where that reach merges nothing and `enable_tome` refuses it, its first attention level
    (max_downsample=2)."""
    from latentdiff.errors import UsageError

    try:
        pipe.enable_tome(ratio=ratio)
    except UsageError as error:
        if error.where != "max_downsample":
            raise
        pipe.enable_tome(ratio=ratio, max_downsample=2)


def reset(pipe: Any) -> None:
    """Every switch off again."""
    for method in ("disable_deepcache", "disable_tome", "disable_freeu"):
        getattr(pipe, method)()


class Counter:
    """Counts the UNet's forwards and their batch rows (a forward hook, nothing else changes)."""

    def __init__(self, unet: Any):
        self.calls, self.rows = 0, 0
        self.handle = unet.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module: Any, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x", kwargs.get("sample"))
        self.calls += 1
        self.rows += int(x.shape[0])

    def close(self) -> None:
        self.handle.remove()


def run_case(pipe: Any, name: str, *, size: int, steps: int, guidance: float, prompt: str) -> dict[str, Any]:
    import numpy as np
    import torch

    reset(pipe)
    setup, extra = SWITCHES[name]
    if setup is not None:
        setup(pipe)
    stamps: list[float] = []
    counter = Counter(pipe.unet)
    start = time.perf_counter()
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                 generator=torch.Generator().manual_seed(0), progress=False,
                 callback=lambda i, t, x: stamps.append(time.perf_counter()), **extra).images[0]
    total = time.perf_counter() - start
    counter.close()
    reset(pipe)
    gaps = np.diff(stamps) if len(stamps) > 1 else np.array([float("nan")])
    return dict(image=np.asarray(image, dtype=np.float64), total=total, step=float(np.median(gaps)),
                calls=counter.calls, rows=counter.rows)


def sd15_part(args: Any) -> common.Table:
    import torch

    from latentdiff import LatentDiffusionPipeline
    from latentdiff.diffusion.samplers.names import sampler_from_name

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    pipe = LatentDiffusionPipeline.from_pretrained(common.folder("sd15"), torch_dtype=dtype)
    pipe.sampler = sampler_from_name("DPM++ 2M Karras", base=pipe.sampler)
    table = common.Table(f"SD 1.5 (random weights), {args.size} px, {args.steps} DPM++ 2M Karras steps, CFG 7.5, "
                         f"{args.dtype}, one image", ("switch", "per image", "per step (median)", "speed-up / plain",
                                                      "UNet calls / rows", "mean abs diff (0-255)", "PSNR vs plain"))
    run_case(pipe, "plain", size=args.size, steps=2, guidance=7.5, prompt=common.PROMPT)     # warm-up
    results = {}
    for name in SWITCHES:
        results[name] = run_case(pipe, name, size=args.size, steps=args.steps, guidance=7.5, prompt=common.PROMPT)
        r = results[name]
        mad, psnr = common.image_difference(r["image"], results["plain"]["image"])
        table.add(name, common.fmt_time(r["total"]), common.fmt_time(r["step"]),
                  f"{results['plain']['total'] / r['total']:.2f}x", f"{r['calls']} / {r['rows']}", f"{mad:.2f}",
                  "identical" if math.isinf(psnr) else f"{psnr:.1f} dB",
                  data=dict(switch=name, total=r["total"], step=r["step"], calls=r["calls"], rows=r["rows"],
                            mad=mad, psnr=psnr))
        print(f"  {name}: {r['total']:.1f} s", flush=True)
    return table


def shapes_part(args: Any) -> common.Table:
    from latentdiff import LatentDiffusionPipeline, hub
    from latentdiff.builtin import generate_settings

    settings = generate_settings(hub.resolve("latentdiff/shapes-64", allow_patterns=["*.json"]))
    pipe = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64")
    table = common.Table(f"latentdiff/shapes-64 at its settings (DDIM {settings['num_inference_steps']}, guidance "
                         f"{settings['guidance_scale']}), {args.count} held-out prompts",
                         ("switch", "per image", "speed-up / plain", *common.ACCURACY_COLUMNS))
    plain_time = None
    for name in SWITCHES:
        if name.startswith("FreeU"):
            continue     # FreeU's published factors are for SD's channel layout; not a speed switch
        reset(pipe)
        setup, extra = SWITCHES[name]
        if setup is not None:
            setup(pipe)
        report, per_image = common.checker_run(pipe, count=args.count, settings={**settings, **extra})
        reset(pipe)
        plain_time = plain_time or per_image
        acc = report["accuracy"]
        table.add(name, common.fmt_time(per_image), f"{plain_time / per_image:.2f}x", *common.accuracy_cells(acc),
                  data=dict(switch=name, per_image=per_image, **acc))
        print(f"  {name}: {per_image * 1e3:.0f} ms per image, all {acc['all']:.3f}", flush=True)
    return table


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="SD 1.5 image side (default 512; quick 256)")
    p.add_argument("--steps", type=int, default=None, help="SD 1.5 steps (default 20; quick 10)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="SD 1.5 precision (default bf16)")
    p.add_argument("--count", type=int, default=None, help="checker images per switch (default 200; quick 50)")
    p.add_argument("--only", choices=("sd15", "shapes"), default=None)
    args = p.parse_args()
    args.size = args.size or (256 if args.quick else 512)
    args.steps = args.steps or (10 if args.quick else 20)
    args.count = args.count or (50 if args.quick else 200)
    common.header("Cheaper steps: DeepCache, token merging, CFG truncation, FreeU", args)
    tables = []
    if args.only in (None, "sd15"):
        tables.append(sd15_part(args))
        tables[-1].print()
    if args.only in (None, "shapes"):
        tables.append(shapes_part(args))
        tables[-1].print()
    common.write_json(args.json, tables)
    common.footer()


if __name__ == "__main__":
    main()
