"""Token merging and CFG truncation (issue 20): what each switch saves, and what it changes.

- Stable Diffusion 1.5's UNet (random weights), one classifier-free-guidance step (batch 2, 77 context tokens) at
  64x64 latents (512 px; 32x32 with --quick): plain, ToMe 0.3 and ToMe 0.5 (tomesd's defaults: the
  full-resolution levels' self-attention, 2x2 strides, random destinations), latentdiff's `enable_tome` against
  diffusers' UNet patched by tomesd 0.1.3 (the peer), each library in its own child process (the machine's
  free memory does not hold both). The error column: the ToMe output against the same library's plain output
  (no quality measure exists for random weights; see the built-in model's rows for one).
- CFG truncation: a guided step (batch 2) against a conditional step (batch 1) of latentdiff's UNet; a run
  guided for a fraction f of its N steps costs f + (1 - f) x (batch-1 step / batch-2 step) of the plain run.
- The built-in model (latentdiff/shapes-64, its own settings: DDIM 50 steps, guidance 1.5): the held-out
  checker's scores and the seconds per image, plain, with ToMe 0.5 and with CFG truncation 0.5 (--count images).

    python benchmarks/bench_fast_switches.py [--quick] [--dtype bf16|fp32] [--count 100] [--skip-builtin]
"""
from __future__ import annotations

import time
from pathlib import Path

import common

RATIOS = (0.0, 0.3, 0.5)


def child_code(lib: str, folder: Path, *, size: int, reps: int, dtype: str) -> str:
    """A child that loads `lib`'s UNet from `folder` and times one UNet call per ToMe ratio (and, for latentdiff,
    at batch 1): prints {"times": {case: [s, ...]}, "errors": {case: rel. error vs plain}}."""
    return f"""
import sys, json, time
sys.path.insert(0, "benchmarks")
from bench_fast_switches import time_unet
RESULT = time_unet({lib!r}, {str(folder)!r}, size={size}, reps={reps}, dtype={dtype!r})
""" + common.CHILD_EXIT


def time_unet(lib: str, folder: str, *, size: int, reps: int, dtype: str) -> dict:
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    if lib == "latentdiff":
        from latentdiff import UNet2DConditional
        from latentdiff.pipelines.token_merging import disable_tome, enable_tome

        unet = UNet2DConditional.from_pretrained(folder, subfolder="unet", torch_dtype=torch_dtype).eval()
    else:
        import diffusers
        import tomesd

        unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet",
                                                              torch_dtype=torch_dtype).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=g).to(torch_dtype)
    context = torch.randn(2, 77, 768, generator=g).to(torch_dtype)
    t = torch.tensor(500)

    def call(batch: int = 2) -> torch.Tensor:
        with torch.inference_mode():
            if lib == "latentdiff":
                return unet(x[:batch], t, context[:batch])
            return unet(x[:batch], t, encoder_hidden_states=context[:batch]).sample

    def set_ratio(ratio: float) -> None:
        if lib == "latentdiff":
            disable_tome(unet)
            if ratio:
                enable_tome(unet, ratio)
        else:
            tomesd.remove_patch(unet)
            if ratio:
                tomesd.apply_patch(unet, ratio=ratio)

    times: dict[str, list[float]] = {}
    errors: dict[str, float] = {}
    plain = None
    for ratio in RATIOS:
        set_ratio(ratio)
        out = call().float()          # also the warm-up
        plain = out if plain is None else plain
        errors[f"tome {ratio}"] = common.max_rel_error(out, plain)
        times[f"tome {ratio}"] = []
        for _ in range(reps):
            start = time.perf_counter()
            call()
            times[f"tome {ratio}"].append(time.perf_counter() - start)
    set_ratio(0.0)
    if lib == "latentdiff":
        call(1)
        times["batch 1"] = []
        for _ in range(reps):
            start = time.perf_counter()
            call(1)
            times["batch 1"].append(time.perf_counter() - start)
    return {"times": times, "errors": errors}


def builtin_rows(count: int, table: common.Table) -> None:
    """The checker's scores of the built-in model with each switch (the same held-out prompts and seeds)."""
    import torch

    from latentdiff.data.shapes_checker import score
    from latentdiff.data.shapes_eval import REPORT_SEED, held_out_prompts
    from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64")
    prompts = held_out_prompts(count)
    run = dict(num_inference_steps=50, guidance_scale=1.5, height=64, width=64, progress=False)
    cases = {"plain": (None, None), "ToMe 0.5": (0.5, None), "CFG truncation 0.5": (None, 0.5),
             "ToMe 0.5 + CFG truncation 0.5": (0.5, 0.5)}
    for name, (tome, truncation) in cases.items():
        pipe.disable_tome()
        if tome:
            pipe.enable_tome(tome)
        images = []
        start = time.perf_counter()
        for first in range(0, count, 50):
            chunk = prompts[first:first + 50]
            generators = [torch.Generator().manual_seed(REPORT_SEED + first + i) for i in range(len(chunk))]
            images += pipe(chunk, generator=generators, cfg_truncation=truncation, **run).images
        seconds = (time.perf_counter() - start) / count
        accuracy = score(images, prompts)
        scores = ", ".join(f"{k} {100 * v:.0f} %" for k, v in accuracy.items() if isinstance(v, float))
        table.add(name, f"{seconds * 1e3:.0f} ms", scores, data=dict(case=name, seconds=seconds, accuracy=accuracy))
    pipe.disable_tome()


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--count", type=int, default=100, help="built-in model: held-out prompts per case")
    p.add_argument("--skip-builtin", action="store_true")
    p.add_argument("--skip-sd15", action="store_true")
    args = p.parse_args()
    common.header("Token merging and CFG truncation (issue 20)", args)
    common.quiet_diffusers()
    size, reps = (32, 2) if args.quick else (64, args.reps or 3)
    tables = []
    if not args.skip_sd15:
        folder = common.folder("sd15")
        runs = {lib: common.run_child(child_code(lib, folder, size=size, reps=reps, dtype=args.dtype))[0]
                for lib in ("latentdiff", "diffusers")}
        ours, theirs = runs["latentdiff"], runs["diffusers"]
        table = common.Table(f"SD1.5 UNet, one CFG step (batch 2) at {size}x{size} latents ({size * 8} px), "
                             f"{args.dtype}: latentdiff enable_tome vs diffusers + tomesd",
                             common.COMPARE_COLUMNS)
        for ratio in RATIOS:
            case = f"tome {ratio}"
            speed = (common.median(ours["times"]["tome 0.0"]) / common.median(ours["times"][case]),
                     common.median(theirs["times"]["tome 0.0"]) / common.median(theirs["times"][case]))
            table.compare(f"ToMe {ratio}" if ratio else "plain", ours["times"][case], theirs["times"][case],
                          error=ours["errors"][case],
                          note=f"speed-up vs plain: ours {speed[0]:.2f}x, tomesd {speed[1]:.2f}x; error: ours vs "
                               f"our plain (tomesd vs its plain: {theirs['errors'][case]:.1e})")
        tables.append(table)
        table.print()
        guided, conditional = common.median(ours["times"]["tome 0.0"]), common.median(ours["times"]["batch 1"])
        cfg = common.Table("CFG truncation, latentdiff (same UNet and size)", ("what", "seconds", "vs plain run"))
        cfg.add("guided step (batch 2)", common.fmt_time(guided), "1.00x")
        cfg.add("conditional step (batch 1)", common.fmt_time(conditional), f"{guided / conditional:.2f}x faster")
        for fraction in (0.5, 0.3):
            cost = fraction + (1 - fraction) * conditional / guided
            cfg.add(f"a run with cfg_truncation={fraction}", "-", f"{1 / cost:.2f}x faster per image (UNet time)",
                    data=dict(fraction=fraction, speedup=1 / cost))
        tables.append(cfg)
        cfg.print()
    if not args.skip_builtin:
        table = common.Table(f"The built-in model (DDIM 50 steps, guidance 1.5), {args.count} held-out prompts",
                             ("switch", "time per image", "checker scores"))
        builtin_rows(args.count, table)
        tables.append(table)
        table.print()
    common.write_json(args.json, tables, dtype=args.dtype)
    common.footer()


if __name__ == "__main__":
    main()
