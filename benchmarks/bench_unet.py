"""The denoiser's forward, latentdiff against diffusers, on the same weights.

- Stable Diffusion 1.5's UNet (860M parameters), batch 2 (one classifier-free-guidance step), 77 context
  tokens, at 32x32 latents (256 px images) and 64x64 (512 px; not in --quick): fp32 against fp32, then
  latentdiff in reduced precision (bf16 on CPU; fp16 and bf16 on CUDA) against diffusers in fp32 and in
  the same precision, with each reduced-precision output's relative error against the fp32 output.
- The tests' tiny UNet (32/64 channels), batch 2 at 32x32: per-call time, which is Python and dispatch
  overhead, not arithmetic.
- Ops per call for both (profiler: aten ops called from Python; dispatch: kernels), and the ops one library
  calls more often than the other.
- FLOPs per call (torch.utils.flop_counter) and the measured GEMM rate, so the fp32 rows read as a fraction
  of what this machine can do.

    python benchmarks/bench_unet.py [--quick] [--sizes 32 64] [--compile]
"""
from __future__ import annotations

import gc
import time
from pathlib import Path

import common
import torch

# --channels-last: both libraries' models and inputs in channels-last memory format (weights converted once).
MEMORY_FORMAT = torch.contiguous_format


def load_pair(folder: Path, dtype: torch.dtype, device: str):
    """(ours, diffusers') UNet from the same diffusers-format folder, in dtype on device, eval mode."""
    return load_one(folder, "latentdiff", dtype, device), load_one(folder, "diffusers", dtype, device)


def load_one(folder: Path, lib: str, dtype: torch.dtype, device: str):
    import diffusers

    from latentdiff import UNet2DConditional

    if lib == "latentdiff":
        model = UNet2DConditional.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, device=device)
    else:
        model = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
    return model.to(device=device, memory_format=MEMORY_FORMAT).eval()


def inputs(unet_config: dict, size: int, *, batch: int = 2, device: str = "cpu", seed: int = 0):
    """x: (B, 4, size, size), t: 0-d, context: (B, 77, cross_attention_dim), fp32 on device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet_config["in_channels"], size, size, generator=g)
    context = torch.randn(batch, 77, unet_config["cross_attention_dim"], generator=g)
    return x.to(device, memory_format=MEMORY_FORMAT), torch.tensor(500, device=device), context.to(device)


def callers(ours, theirs, x, t, context):
    """Zero-argument calls of both models on inputs cast to each model's dtype (no grad)."""
    def call_ours(model=ours):
        with torch.inference_mode():
            return model(x.to(model.dtype), t, context.to(model.dtype))

    def call_theirs(model=theirs):
        with torch.inference_mode():
            return model(x.to(model.dtype), t, encoder_hidden_states=context.to(model.dtype)).sample

    return call_ours, call_theirs


def flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return counter.get_total_flops()


def sd15_fp32(folder: Path, sizes: list[int], reps: int, device: str, table: common.Table) -> dict:
    """fp32 rows; returns {size: diffusers' fp32 output} as the reference for reduced precision."""
    ours, theirs = load_pair(folder, torch.float32, device)
    references = {}
    for size in sizes:
        call_ours, call_theirs = callers(ours, theirs, *inputs(dict(theirs.config), size, device=device))
        expected = call_theirs()
        error = common.max_rel_error(call_ours().float().cpu(), expected.float().cpu())
        references[size] = expected.float().cpu()
        gflop = flops(call_ours) / 1e9
        times = common.alternate({"ours": call_ours, "theirs": call_theirs}, reps=reps, warmup=0, device=device)
        rate = gflop / common.median(times["ours"]), gflop / common.median(times["theirs"])
        table.compare(f"SD1.5 UNet {size}x{size}, fp32 / fp32", times["ours"], times["theirs"], error=error,
                      note=f"{gflop:.0f} GFLOP; {rate[0]:.0f} / {rate[1]:.0f} GFLOP/s")
    del ours, theirs
    gc.collect()
    return references


def sd15_low(folder: Path, sizes: list[int], reps: int, device: str, table: common.Table,
             references: dict) -> None:
    """latentdiff in each reduced precision against diffusers fp32 and diffusers in that precision."""
    theirs32 = load_one(folder, "diffusers", torch.float32, device)
    for dtype in common.low_precision_dtypes(device):
        name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
        ours, theirs = load_pair(folder, dtype, device)
        for size in sizes:
            x, t, context = inputs(dict(theirs.config), size, device=device)
            call_ours, call_theirs = callers(ours, theirs, x, t, context)
            _, call_theirs32 = callers(ours, theirs32, x, t, context)
            err_ours = common.max_rel_error(call_ours().float().cpu(), references[size])
            err_theirs = common.max_rel_error(call_theirs().float().cpu(), references[size])
            times = common.alternate({"ours": call_ours, "theirs": call_theirs, "theirs32": call_theirs32},
                                     reps=reps, warmup=0, device=device)
            table.compare(f"SD1.5 UNet {size}x{size}, ours {name} / diffusers fp32", times["ours"],
                          times["theirs32"], error=err_ours, note="error: vs diffusers fp32 output")
            table.compare(f"SD1.5 UNet {size}x{size}, {name} / {name}", times["ours"], times["theirs"],
                          error=err_theirs, note="error column: diffusers' own error vs fp32")
        del ours, theirs
        gc.collect()


def sd15_compiled(folder: Path, sizes: list[int], reps: int, device: str, table: common.Table,
                  references: dict) -> None:
    """latentdiff's UNet under torch.compile (inductor, fullgraph, static shapes, freezing: weights become
    constants, so oneDNN prepacks them once instead of reordering them at every call), as `pipe.compile(
    options={"freezing": True})` does, in fp32 and in bf16 (CPU) / fp16 (CUDA), against diffusers fp32 eager."""
    theirs32 = load_one(folder, "diffusers", torch.float32, device)
    for dtype in [torch.float32, *common.low_precision_dtypes(device)]:
        name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16") \
            .replace("float32", "fp32")
        ours = load_one(folder, "latentdiff", dtype, device)
        ours.forward = torch.compile(ours.forward, fullgraph=True, dynamic=False, options={"freezing": True})
        for size in sizes:
            x, t, context = inputs(dict(theirs32.config), size, device=device)
            call_ours, call_theirs32 = callers(ours, theirs32, x, t, context)
            common.synchronize(device)
            start = time.perf_counter()
            first = call_ours()
            common.synchronize(device)
            compile_s = time.perf_counter() - start
            error = common.max_rel_error(first.float().cpu(), references[size])
            times = common.alternate({"ours": call_ours, "theirs": call_theirs32}, reps=reps, warmup=0, device=device)
            table.compare(f"SD1.5 UNet {size}x{size}, ours {name} compiled (freezing) / diffusers fp32 eager",
                          times["ours"], times["theirs"], error=error,
                          note=f"first call (compile) {compile_s:.0f} s; error vs diffusers fp32")
        del ours
        torch._dynamo.reset()
        gc.collect()


def tiny(reps: int, device: str, table: common.Table) -> tuple:
    folder = common.folder("tiny")
    ours, theirs = load_pair(folder, torch.float32, device)
    for size, note in ((4, "4x4: next to no arithmetic, so this is per-op overhead"), (32, "")):
        call_ours, call_theirs = callers(ours, theirs, *inputs(dict(theirs.config), size, device=device))
        error = common.max_rel_error(call_ours(), call_theirs())
        times = common.alternate({"ours": call_ours, "theirs": call_theirs}, reps=reps, warmup=3, device=device)
        table.compare(f"tiny UNet {size}x{size}, fp32, per call", times["ours"], times["theirs"], error=error,
                      note=note)
    return call_ours, call_theirs


def op_table(pairs: dict[str, tuple]) -> common.Table:
    table = common.Table("Ops per UNet call (fp32, torch.profiler)",
                         ("model", "latentdiff: aten ops from Python", "diffusers", "latentdiff: all aten events",
                          "diffusers", "latentdiff: copies inside convs (MB)", "diffusers",
                          "ops diffusers calls more (ours more)"))
    for name, (call_ours, call_theirs) in pairs.items():
        (top_o, all_o), (top_t, all_t) = common.count_ops(call_ours), common.count_ops(call_theirs)
        copies_o, copies_t = common.weight_copies(call_ours), common.weight_copies(call_theirs)
        note = ", ".join(f"{k.removeprefix('aten::')} +{v}" for k, v in (top_t - top_o).most_common(6))
        fewer = (top_o - top_t).most_common(4)
        if fewer:
            note += "; (" + ", ".join(f"{k.removeprefix('aten::')} +{v}" for k, v in fewer) + ")"
        table.add(name, sum(top_o.values()), sum(top_t.values()), all_o, all_t,
                  f"{copies_o[0]} ({copies_o[1]:.0f})", f"{copies_t[0]} ({copies_t[1]:.0f})", note,
                  data=dict(model=name, ours=dict(top_o), theirs=dict(top_t), ours_all=all_o, theirs_all=all_t,
                            weight_copies_ours=copies_o, weight_copies_theirs=copies_t))
    return table


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="latent sides (default 32 64; quick: 32)")
    p.add_argument("--channels-last", action="store_true", help="both models and inputs in channels-last format")
    p.add_argument("--compile", action="store_true", help="also latentdiff compiled (inductor, freezing), fp32 and "
                   "reduced precision, against diffusers fp32 eager (~2 min of compilation per size and dtype)")
    args = p.parse_args()
    global MEMORY_FORMAT
    MEMORY_FORMAT = torch.channels_last if args.channels_last else torch.contiguous_format
    common.header("UNet forward" + (" (channels-last)" if args.channels_last else ""), args)
    device = common.device_of(args)
    sizes = args.sizes or ([32] if args.quick else [32, 64])
    reps = args.reps or (3 if args.quick else 5)
    folder = common.folder("sd15")

    rates = {str(d): common.gemm_rate(d, device=device) for d in [torch.float32, *common.low_precision_dtypes(device)]}
    print("measured GEMM rate (2048^3): " + ", ".join(f"{k.removeprefix('torch.')} {v:.0f} GFLOP/s"
                                                       for k, v in rates.items()) + "\n", flush=True)
    table = common.Table("UNet forward, batch 2, 77 context tokens", common.COMPARE_COLUMNS)
    references = sd15_fp32(folder, sizes, reps, device, table)
    sd15_low(folder, sizes, reps, device, table, references)
    if args.compile:
        sd15_compiled(folder, sizes, reps, device, table, references)
    tiny_calls = tiny(10 if args.quick else 30, device, table)
    table.print()

    ours, theirs = load_pair(folder, torch.float32, device)
    sd15_calls = callers(ours, theirs, *inputs(dict(theirs.config), 8, device=device))
    ops = op_table({"tiny (32x32)": tiny_calls, "SD1.5 (8x8: counts do not depend on size)": sd15_calls})
    ops.print()
    common.footer()
    common.write_json(args.json, [table, ops], gemm_gflops=rates)


if __name__ == "__main__":
    main()
