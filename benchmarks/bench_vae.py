"""The first stage: KL autoencoder encode and decode (Stable Diffusion's VAE), latentdiff against diffusers.

Batch 1, the posterior's mode for encode, unscaled latents for decode; 256 px (32x32 latents) and 512 px
(64x64; not in --quick: a 512 px decode is slow on a few CPU cores, see RESULTS.md). fp32 against fp32, then
latentdiff in reduced precision (bf16 on CPU, fp16/bf16 on CUDA) against diffusers in fp32 and in the same
precision, at the smallest size, with the reduced-precision error against fp32.

    python benchmarks/bench_vae.py [--quick] [--sizes 256 512]
"""
from __future__ import annotations

import gc
from pathlib import Path

import common
import torch


def load(folder: Path, lib: str, dtype: torch.dtype, device: str):
    import diffusers

    from latentdiff import AutoencoderKL

    if lib == "latentdiff":
        return AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, device=device)
    return diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).to(device).eval()


def calls(ours, theirs, size: int, device: str) -> dict:
    """{"encode": (ours, theirs), "decode": (ours, theirs)} zero-argument calls on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device)
    latent = torch.randn(1, 4, size // 8, size // 8, generator=g).to(device)

    def run(fn):
        def call():
            with torch.inference_mode():
                return fn()
        return call

    return {
        "encode": (run(lambda: ours.encode(image.to(ours.dtype)).mode()),
                   run(lambda: theirs.encode(image.to(theirs.dtype)).latent_dist.mode())),
        "decode": (run(lambda: ours.decode(latent.to(ours.dtype))),
                   run(lambda: theirs.decode(latent.to(theirs.dtype)).sample)),
    }


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides (default 256 512; quick: 256)")
    args = p.parse_args()
    common.header("VAE encode / decode", args)
    device = common.device_of(args)
    sizes = args.sizes or ([256] if args.quick else [256, 512])
    folder = common.folder("sd15")
    ours, theirs = load(folder, "latentdiff", torch.float32, device), load(folder, "diffusers", torch.float32, device)
    table = common.Table("SD VAE, batch 1", common.COMPARE_COLUMNS)
    references = {}
    for size in sizes:
        reps = args.reps or (2 if args.quick or size >= 512 else 3)
        for stage, (call_ours, call_theirs) in calls(ours, theirs, size, device).items():
            expected = call_theirs().float().cpu()
            references[size, stage] = expected
            error = common.max_rel_error(call_ours().float().cpu(), expected)
            times = common.alternate({"ours": call_ours, "theirs": call_theirs}, reps=reps, warmup=0, device=device)
            table.compare(f"{stage} {size} px, fp32 / fp32", times["ours"], times["theirs"], error=error)
    size = sizes[0]
    for dtype in common.low_precision_dtypes(device):
        low_ours, low_theirs = load(folder, "latentdiff", dtype, device), load(folder, "diffusers", dtype, device)
        fp32_calls = calls(ours, theirs, size, device)
        for stage, (call_ours, call_theirs) in calls(low_ours, low_theirs, size, device).items():
            err_ours = common.max_rel_error(call_ours().float().cpu(), references[size, stage])
            err_theirs = common.max_rel_error(call_theirs().float().cpu(), references[size, stage])
            times = common.alternate({"ours": call_ours, "theirs": call_theirs, "theirs32": fp32_calls[stage][1]},
                                     reps=args.reps or (2 if args.quick else 3), warmup=0, device=device)
            name = dtype_name(dtype)
            table.compare(f"{stage} {size} px, ours {name} / diffusers fp32", times["ours"], times["theirs32"],
                          error=err_ours, note="error: vs fp32 output")
            table.compare(f"{stage} {size} px, {name} / {name}", times["ours"], times["theirs"], error=err_theirs,
                          note="error column: diffusers' own error vs fp32")
        del low_ours, low_theirs
        gc.collect()
    table.print()
    common.footer()
    common.write_json(args.json, [table])


if __name__ == "__main__":
    main()
