"""Peak RSS of a 512 px generation with latentdiff's packed CPU path (`optimize_for_cpu`) against eager, and what
each network holds: its parameters and the packed copies of its weights (issue 20).

Each case runs in a fresh process: load the SD 1.5-size folder in bf16 (`from_pretrained(path,
torch_dtype=torch.bfloat16)`), apply `optimize_for_cpu` (packed cases), generate one image with the pipeline's
stages by hand (encode_prompt, prepare_latents, denoise, decode) and print the resident set (VmRSS) and the peak
so far (ru_maxrss) after each stage, then the bytes held per network. RSS is memory, not timing: a loaded machine
changes it little, but run one of these at a time (other processes' paging does not add to our RSS, swapping
can lower it).

    python benchmarks/cpu_memory.py [--folder /work/peers/weights/sd15] [--sizes 512] [--steps 2]
        [--cases eager,packed,packed-keep] [--threads 2]

`packed`: `optimize_for_cpu(pipe, keep_weights=False)` (each packed copy takes its plain weight's place: what
`--optimize-cpu` does); `packed-keep`: `optimize_for_cpu(pipe)` (the default, keep_weights=True: plain weights and
packed copies both held); `packed-no-gemm`: `packed` with `GEMM_MAX_PIXELS = 0` (no im2col + GEMM convolutions,
whose packed weight cannot take the parameter's place).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, torch
from latentdiff import LatentDiffusionPipeline
from latentdiff.layers.prepacked import packed_copies, tensor_bytes
from latentdiff.pipelines.cpu_paths import optimize_for_cpu

def rss():
    now = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
    return round(now), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

def held(pipe):
    out = {{}}
    for name in ("unet", "vae", "text_encoder"):
        net = getattr(pipe, name)
        tensors = list(net.parameters()) + list(net.buffers())
        plain = {{id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors if not t.is_mkldnn}}
        released = tensor_bytes([t for t in tensors if t.is_mkldnn])   # packed copies held as the parameters
        out[name] = dict(parameters_mb=round((sum(plain.values()) + released) / 2**20),
                         released_mb=round(released / 2**20),
                         packed_mb=round(tensor_bytes(packed_copies(net)) / 2**20))
    return out

torch.set_num_threads({threads})
case = {case!r}
stages = {{"import": rss()}}
pipe = LatentDiffusionPipeline.from_pretrained({folder!r}, torch_dtype=torch.bfloat16)
stages["from_pretrained"] = rss()
{setup}
if case != "eager":
    optimize_for_cpu(pipe{options})
    stages["optimize_for_cpu"] = rss()
sums = []
with torch.inference_mode():
    for size in {sizes!r}:   # one after the other, in this process: the convolutions repack for each size
        cond, uncond = pipe.encode_prompt(["a photo of a cat"], ["blurry"])
        stages[f"encode_prompt {{size}}"] = rss()
        x_T = pipe.prepare_latents(1, size, size, generator=torch.Generator().manual_seed(0))
        z0 = pipe.denoise(x_T, cond, uncond, guidance_scale=7.5, num_inference_steps={steps}, progress=False)
        stages[f"denoise {{size}}"] = rss()
        image = pipe.decode(z0)
        stages[f"decode {{size}}"] = rss()
        sums.append(float(image.float().sum()))
print(json.dumps(dict(case=case, stages=stages, held=held(pipe), image_sums=sums)))
"""

# case -> (extra keyword arguments of optimize_for_cpu, a statement run before it), as source text
CASES = {"eager": ("", ""), "packed": (", keep_weights=False", ""), "packed-keep": (", keep_weights=True", ""),
         "packed-no-gemm": (", keep_weights=False", "import latentdiff.layers.prepacked as p; p.GEMM_MAX_PIXELS = 0")}


def run_case(case: str, args: argparse.Namespace) -> dict:
    sizes = [int(v) for v in args.sizes.split(",")]
    code = CHILD.format(case=case, folder=str(args.folder), sizes=sizes, steps=args.steps, threads=args.threads,
                        options=CASES[case][0], setup=CASES[case][1])
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=Path("/work/peers/weights/sd15"))
    p.add_argument("--sizes", default="512", help="image sizes, comma-separated, generated in turn in one process")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", default="eager,packed,packed-keep", help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args()
    results = []
    for case in args.cases.split(","):
        result = run_case(case, args)
        results.append(result)
        print(f"## {case}: {args.sizes} px, {args.steps} steps, bf16 (RSS MB now / peak so far)")
        for stage, (now, peak) in result["stages"].items():
            print(f"  {stage:20s} {now:6d} / {peak:6d}")
        for name, held in result["held"].items():
            print(f"  {name:18s} parameters {held['parameters_mb']:5d} MB (of them packed in place "
                  f"{held['released_mb']:5d} MB), packed copies besides {held['packed_mb']:5d} MB")
        print(f"  image sums {', '.join(f'{v:.6g}' for v in result['image_sums'])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
