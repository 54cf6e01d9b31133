"""Stable Diffusion 1.5 on a CUDA GPU, latentdiff against diffusers on the same folder, in one process.

- the measured matmul rate (8192^3, fp16 and bf16): the ceiling the batch-16 row is a share of;
- 512 px, batch 1, guidance 7.5, DDIM: denoising iterations per second, from (t(50 steps) - t(10 steps)) / 40
  so that prompt encoding and the decode cancel: diffusers eager, latentdiff eager, latentdiff after
  `pipe.compile()` (torch.compile fullgraph, static shapes, the step replayed as a CUDA graph), whose compile
  time is reported, whose images are compared with eager, and which must not recompile for a new prompt and
  seed (torch._dynamo's error_on_recompile is set for that call);
- 512 px, batch 16 (32 UNet samples a step with guidance): seconds per step and the share of the bf16 matmul
  rate that the UNet's counted FLOPs (torch.utils.flop_counter) reach, eager and compiled.

    python benchmarks/bench_gpu.py [--dtype float16] [--reps 3] [--deadline 240]

--deadline: seconds after which the optional rows (compiled batch 16) are skipped, for a leased machine.
"""
from __future__ import annotations

import time

import common


def per_step(times_long: list[float], times_short: list[float], steps: int) -> list[float]:
    """Paired order statistics (fastest long run minus fastest short run, ...) over the step difference."""
    return [(a - b) / steps for a, b in zip(sorted(times_long), sorted(times_short), strict=True)]


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--deadline", type=float, default=1e9, help="seconds; optional rows are skipped after it")
    p.add_argument("--model", default="sd15", choices=("sd15", "tiny"), help="tiny: a smoke test (64 px)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (eager: a smoke test)")
    args = p.parse_args()
    started = time.perf_counter()
    import diffusers
    import torch

    from latentdiff import LatentDiffusionPipeline

    args.device = args.device or "cuda"
    device = args.device
    common.header("Stable Diffusion 1.5 on CUDA", args)
    common.quiet_diffusers()
    dtype = getattr(torch, args.dtype)
    reps = args.reps or 3
    image_px = 512 if args.model == 'sd15' else 64
    table = common.Table(f"{args.model}, {image_px} px, {args.dtype}, DDIM, guidance 7.5", common.COMPARE_COLUMNS)
    rates = {name: common.gemm_rate(getattr(torch, name), n=8192 if device == "cuda" else 256, reps=10, device=device)
             for name in ("float16", "bfloat16")}
    print(f"measured matmul rate, 8192^3: fp16 {rates['float16'] / 1e3:.0f} TFLOP/s, "
          f"bf16 {rates['bfloat16'] / 1e3:.0f} TFLOP/s\n", flush=True)

    folder = common.folder(args.model)
    size = 512 if args.model == "sd15" else 64
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    theirs.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, device=device)
    ours.release_weights = False
    side = size // ours.vae_scale_factor

    def latents(batch: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn((batch, ours.unet.config.in_channels, side, side), generator=g).to(device, dtype)

    def call(pipe, steps: int, batch: int = 1, prompt: str = common.PROMPT, seed: int = 0):
        extra = {"progress": False} if isinstance(pipe, LatentDiffusionPipeline) else {}
        return pipe([prompt] * batch, negative_prompt=[common.NEGATIVE] * batch, num_inference_steps=steps,
                    guidance_scale=7.5, height=size, width=size, latents=latents(batch, seed), output_type="np",
                    **extra).images

    def timed(cases: dict, n: int) -> dict:
        return common.alternate(cases, reps=n, warmup=1, device=device)

    # ---- batch 1: eager against eager --------------------------------------------------------------
    error = common.max_rel_error(call(ours, 50), call(theirs, 50))
    t = timed({(lib, s): (lambda pipe=pipe, s=s: call(pipe, s)) for lib, pipe in (("ours", ours), ("theirs", theirs))
               for s in (10, 50)}, reps)
    eager_ours = per_step(t["ours", 50], t["ours", 10], 40)
    eager_theirs = per_step(t["theirs", 50], t["theirs", 10], 40)
    its = dict(unit=lambda v: f"{1 / v:.1f} it/s")
    table.compare("batch 1: seconds per denoising step, both eager", eager_ours, eager_theirs, error=error,
                  note="cells: it/s; ratio: time ours / diffusers", **its)
    table.compare("batch 1: whole call, 50 steps, both eager", t["ours", 50], t["theirs", 50])

    # ---- batch 1: pipe.compile() against diffusers eager ----------------------------------------------
    eager_image = call(ours, 50)
    ours.compile(backend=args.backend)
    start = time.perf_counter()
    compiled_image = call(ours, 50)
    compile_s = time.perf_counter() - start
    torch._dynamo.config.error_on_recompile = True     # a new prompt and seed must reuse the graph
    call(ours, 50, prompt="a church at dusk", seed=1)
    torch._dynamo.config.error_on_recompile = False
    t = timed({(lib, s): (lambda pipe=pipe, s=s: call(pipe, s)) for lib, pipe in (("ours", ours), ("theirs", theirs))
               for s in (10, 50)}, reps)
    compiled = per_step(t["ours", 50], t["ours", 10], 40)
    theirs_again = per_step(t["theirs", 50], t["theirs", 10], 40)
    table.compare("batch 1: seconds per step, latentdiff pipe.compile() (CUDA graph) / diffusers eager", compiled,
                  theirs_again, error=common.max_rel_error(compiled_image, eager_image),
                  note=f"error: compiled vs eager latentdiff image; compile + first call {compile_s:.0f} s; "
                       "no recompile for a new prompt and seed", **its)
    table.compare("batch 1: whole call, 50 steps, compiled / diffusers eager", t["ours", 50], t["theirs", 50])

    # ---- batch 16: share of the matmul rate -------------------------------------------------------------
    ctx = torch.randn(2, 77, ours.unet.config.cross_attention_dim, device=device, dtype=dtype)
    flops_b2 = unet_flops(ours, latents(2), ctx)
    step_flops = flops_b2 * 16                          # batch 16 with guidance: 32 UNet samples
    print(f"UNet FLOPs, 2 samples at {side}x{side} latents: {flops_b2 / 1e9:.0f} GFLOP\n", flush=True)
    share = dict(unit=lambda v: f"{step_flops / v / 1e12:.0f} TFLOP/s "
                                f"({step_flops / v / (rates['bfloat16'] * 1e9):.0%})")
    uncompiled = LatentDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, device=device)
    uncompiled.release_weights = False
    t16 = timed({(lib, s): (lambda pipe=pipe, s=s: call(pipe, s, batch=16))
                 for lib, pipe in (("ours", uncompiled), ("theirs", theirs)) for s in (2, 12)}, max(2, reps - 1))
    table.compare("batch 16: seconds per step, both eager", per_step(t16["ours", 12], t16["ours", 2], 10),
                  per_step(t16["theirs", 12], t16["theirs", 2], 10),
                  note="cells: achieved UNet rate (share of the measured bf16 matmul rate)", **share)
    del uncompiled
    if time.perf_counter() - started < args.deadline:
        start = time.perf_counter()
        call(ours, 2, batch=16)
        compile16 = time.perf_counter() - start
        t16c = timed({(lib, s): (lambda pipe=pipe, s=s: call(pipe, s, batch=16))
                      for lib, pipe in (("ours", ours), ("theirs", theirs)) for s in (2, 12)}, max(2, reps - 1))
        table.compare("batch 16: seconds per step, compiled / diffusers eager",
                      per_step(t16c["ours", 12], t16c["ours", 2], 10),
                      per_step(t16c["theirs", 12], t16c["theirs", 2], 10),
                      note=f"compile for batch 16: {compile16:.0f} s", **share)
    else:
        print("(compiled batch 16 skipped: past --deadline)")
    table.print()
    if device == "cuda":
        print(f"GPU memory allocated at peak: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    common.footer()
    common.write_json(args.json, [table], matmul_tflops={k: v / 1e3 for k, v in rates.items()},
                      unet_gflop_batch2=flops_b2 / 1e9, compile_s=compile_s)


def unet_flops(pipe, sample, context) -> float:
    """FLOPs of one eager UNet forward (matmuls, convolutions, attention), counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    eager = type(unet).forward
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        eager(unet, sample, torch.full((sample.shape[0],), 500, device=sample.device), context)
    return float(counter.get_total_flops())


if __name__ == "__main__":
    main()
