"""CPU paths: seconds per classifier-free-guidance step (one UNet call on a batch of 2) of the SD 1.5-size UNet
(random weights, benchmarks/common.py's sd15 folder) at 256 px (32 x 32 latents), for latentdiff's CPU options
against diffusers on the same weights:

- latentdiff fp32 / bf16 eager, + `optimize_for_cpu` (prepacked oneDNN convolutions, channels-last input),
  int8 (`quantize(pipe, "int8")`: dynamic int8 Linear layers, fp32 elsewhere);
- diffusers fp32 / bf16 eager (its own from_pretrained of the same folder);
- with --compile: `pipe.compile()` (inductor) in fresh child processes sharing one new cache folder: the first
  call of a cold process (compile included), the same in a second process (warm on-disk cache), and the steady
  compiled step against eager in the same process.

Only about 8 GB of memory may be free on a shared machine, so the cases run one model at a time (each case: one
untimed call, then --reps timed calls) rather than interleaved; the table gives medians and minimums (on a
loaded machine the minimum is the run least disturbed by other processes) and each row's ratio against
diffusers in the same dtype.

    python benchmarks/cpu_paths.py [--threads 2] [--reps 3] [--size 32] [--compile] [--json out.json]
"""
from __future__ import annotations

import gc
import json
import sys
import tempfile
import types
from collections.abc import Callable
from typing import Any

import common
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs(size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=g).to(dtype)
    return x, torch.tensor(500), torch.randn(2, 77, 768, generator=g).to(dtype)


def time_calls(call: Callable[[], torch.Tensor], reps: int, what: str = "") -> tuple[list[float], torch.Tensor]:
    """One untimed call, then `reps` timed ones; each case's times go to stderr as soon as they are known (a run
    on a loaded machine can take an hour: a stopped one still leaves its rows)."""
    with torch.inference_mode():
        out = call()
        times = common.alternate({"case": call}, reps=reps, warmup=0)["case"]
    if what:
        print(f"{what}: {' '.join(f'{t:.2f}' for t in times)} s", file=sys.stderr, flush=True)
    return times, out.float()


def ours(folder: Any, dtype: torch.dtype) -> Any:
    from latentdiff import UNet2DConditional

    return UNet2DConditional.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).eval()


def theirs(folder: Any, dtype: torch.dtype) -> Any:
    import diffusers

    return diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).eval()


def cases_for(name: str, folder: Any, size: int, reps: int) -> dict[str, tuple[list[float], torch.Tensor]]:
    """Every case of one dtype, one model in memory at a time."""
    from latentdiff.pipelines import cpu_paths

    dtype = DTYPES[name]
    x, t, context = inputs(size, dtype)
    results = {}
    model = theirs(folder, dtype)
    results[f"diffusers {name}"] = time_calls(lambda m=model: m(x, t, encoder_hidden_states=context).sample, reps,
                                              f"diffusers {name}")
    del model
    gc.collect()
    unet = ours(folder, dtype)
    pipe = types.SimpleNamespace(unet=unet, networks=lambda u=unet: [u])   # what cpu_paths reads of a pipeline
    results[f"latentdiff {name}"] = time_calls(lambda u=unet: u(x, t, context), reps, f"latentdiff {name}")
    cpu_paths.optimize_for_cpu(pipe)
    results[f"latentdiff {name} + optimize_for_cpu"] = time_calls(lambda u=unet: u(x, t, context), reps,
                                                                   f"latentdiff {name} + optimize_for_cpu")
    cpu_paths.undo_cpu_optimization(pipe)
    if dtype == torch.float32:
        cpu_paths.quantize(pipe, "int8")
        results["latentdiff int8 (Linear) + fp32"] = time_calls(lambda u=unet: u(x, t, context), reps, "int8")
    del unet, pipe
    gc.collect()
    return results


COMPILE_CHILD = """
import json, sys, time, types, torch
sys.path.insert(0, 'benchmarks')
import cpu_paths as bench
from latentdiff.pipelines.acceleration import compile_unet
torch.set_num_threads({threads})
dtype = bench.DTYPES['{dtype}']
unet, (x, t, context) = bench.compile_subject('{model}', '{folder}', {size}, dtype)
with torch.inference_mode():
    eager = bench.time_calls(lambda: unet(x, t, context), {reps})[0]
    compile_unet(types.SimpleNamespace(unet=unet))
    start = time.perf_counter(); unet(x, t, context); first = time.perf_counter() - start
    compiled = bench.time_calls(lambda: unet(x, t, context), {reps})[0]
RESULT = dict(first=first, eager=eager, compiled=compiled)
"""


def compile_subject(model: str, folder: Any, size: int, dtype: torch.dtype) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """The UNet the compile rows time and its inputs: "sd15" (the folder's, at `size`) or "builtin"
    (latentdiff/shapes-64's, at its 16 x 16 latents, 16-token context)."""
    if model == "sd15":
        return ours(folder, dtype), inputs(size, dtype)
    if model == "tiny":   # the tests' tiny SD UNet (32 / 64 channels): compile time without the minutes of SD 1.5
        return ours(common.folder("tiny"), dtype), (inputs(8, dtype)[0], torch.tensor(500),
                                                    torch.randn(2, 77, 32).to(dtype))
    from latentdiff import LatentDiffusionPipeline

    unet = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64", torch_dtype=dtype).unet
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g).to(dtype)
    return unet, (x, torch.tensor(500), torch.randn(2, 16, cfg.cross_attention_dim, generator=g).to(dtype))


def compile_rows(folder: Any, args: Any, table: common.Table) -> None:
    """Cold then warm child processes per dtype, sharing one fresh cache folder per dtype."""
    threads = args.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory() as cache:
        for name in args.dtype:
            for run in ("cold", "warm"):
                code = COMPILE_CHILD.format(threads=threads, dtype=name, folder=folder, size=args.size,
                                            reps=args.reps, model=args.compile) + common.CHILD_EXIT
                result, wall, _ = common.run_child(code, env={"TORCHINDUCTOR_CACHE_DIR": f"{cache}/{name}"})
                eager, compiled = result["eager"], result["compiled"]
                print(f"compile {name} {run}: first call {result['first']:.1f} s, process {wall:.0f} s, eager "
                      f"{min(eager):.3f} s, compiled {min(compiled):.3f} s", file=sys.stderr, flush=True)
                table.add(f"{args.compile} UNet compile {name}, {run} cache: first call",
                          common.fmt_time(result["first"]), "-", "-", "-", f"process {wall:.0f} s",
                          data=dict(what=f"compile {name} {run}", **result, wall=wall))
                table.add(f"{args.compile} UNet compiled {name} step ({run} process)",
                          common.fmt_time(common.median(compiled)), common.fmt_time(min(compiled)),
                          f"{min(compiled) / min(eager):.2f}x eager", "-", f"eager min {common.fmt_time(min(eager))}",
                          data=dict(what=f"compiled {name} {run}", eager=eager, compiled=compiled))


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32, help="latent side (32: 256 px images)")
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--compile", choices=("tiny", "builtin", "sd15"), default=None,
                   help="also the compile rows for this UNet (child processes; sd15 takes many minutes)")
    p.add_argument("--no-eager", action="store_true", help="only the compile rows")
    args = p.parse_args()
    args.reps = args.reps or 3
    common.header("CPU paths: SD 1.5-size UNet, one CFG step (batch 2)", args)
    common.quiet_diffusers()
    folder = common.folder("sd15")
    table = common.Table(f"seconds per CFG step at {args.size * 8} px (ratio: against diffusers, same dtype)",
                         ("what", "median", "min", "ratio vs diffusers (mins)", "max rel err vs diffusers", "note"))
    for name in [] if args.no_eager else args.dtype:
        results = cases_for(name, folder, args.size, args.reps)
        base_times, base_out = results[f"diffusers {name}"]
        for what, (times, out) in results.items():
            table.add(what, common.fmt_time(common.median(times)), common.fmt_time(min(times)),
                      f"{min(times) / min(base_times):.2f}x", f"{common.max_rel_error(out, base_out):.1e}", "",
                      data=dict(what=what, times=times))
    if args.compile:
        compile_rows(folder, args, table)
    table.print()
    common.footer()
    if args.json:
        args.json.write_text(json.dumps([d for _, d in table.rows], indent=1))


if __name__ == "__main__":
    main()
