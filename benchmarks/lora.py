"""LoRA cost on Stable Diffusion 1.5's UNet (random weights, CPU): per-step time of the base UNet, the UNet with a
rank-16 LoRA on every attention linear fused into the weights (should cost nothing), and the same LoRA at runtime
(forward hooks: x -> down -> up per module); and the time to load a ~150 MB kohya LoRA (fp16, attention, feed-forward
and projection linears) onto the UNet: read + match every key + build every delta + hook.

    python benchmarks/lora.py [--size 32] [--batch 1] [--reps 2]

--size: the latent side (32 = 256 px images, to keep the run short on 2 cores); --batch 1 (2 is one guided step).
"""
from __future__ import annotations

import argparse
import tempfile
import time
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentdiff.adapters import api
from latentdiff.models.unet import UNet2DConditional, UNetConfig

SD15 = UNetConfig(channels=(320, 640, 1280, 1280), attention_levels=(True, True, True, False), layers_per_level=2,
                  attention_heads=8, cross_attention_dim=768)
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
LARGE = ATTENTION + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def lora_file(unet: torch.nn.Module, suffixes: tuple[str, ...], rank: int, dtype: torch.dtype) -> dict:
    state = {}
    g = torch.Generator().manual_seed(0)
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(suffixes):
            key = "lora_unet_" + name.replace(".", "_")
            out_f, in_f = m.weight.shape
            state[f"{key}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) * 0.01).to(dtype)
            state[f"{key}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).to(dtype)
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


def step_time(unet, x, t, context) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        out = unet(x, t, context)
        seconds = time.perf_counter() - start
    step_time.last = out  # type: ignore[attr-defined]
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    flags = Path("/proc/cpuinfo").read_text()
    print(f"CPU: {cpu}; amx: {'amx_tile' in flags}; torch threads: {torch.get_num_threads()}")
    torch.manual_seed(0)
    unet = UNet2DConditional(SD15).eval()
    pipe = types.SimpleNamespace(unet=unet, text_encoder=None)
    x = torch.randn(args.batch, 4, args.size, args.size)
    t = torch.full((args.batch,), 500)
    context = torch.randn(args.batch, 77, 768)
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "rank16.safetensors"
        save_file(lora_file(unet, ATTENTION, 16, torch.float32), small)
        api.load_lora_weights(pipe, small, adapter_name="r16")
        times: dict[str, list[float]] = {"base": [], "fused": [], "runtime": []}
        outputs = {}
        step_time(unet, x, t, context)   # warm-up
        for _ in range(args.reps):      # the three alternate, so that a busy machine slows each alike
            api.enable_lora(pipe, False)
            times["base"].append(step_time(unet, x, t, context))
            outputs["base"] = step_time.last  # type: ignore[attr-defined]
            api.enable_lora(pipe, True)
            times["runtime"].append(step_time(unet, x, t, context))
            outputs["runtime"] = step_time.last  # type: ignore[attr-defined]
            api.fuse_lora(pipe)
            times["fused"].append(step_time(unet, x, t, context))
            outputs["fused"] = step_time.last  # type: ignore[attr-defined]
            api.unfuse_lora(pipe)
        api.unload_lora_weights(pipe)
        base, fused, runtime = (min(times[k]) for k in ("base", "fused", "runtime"))
        reference, runtime_out, fused_out = outputs["base"], outputs["runtime"], outputs["fused"]
        error = float((runtime_out - fused_out).abs().max() / fused_out.abs().max())
        changed = float((runtime_out - reference).abs().max() / reference.abs().max())
        print(f"UNet step, batch {args.batch}, latents {args.size}x{args.size} (min of {args.reps}):")
        print(f"  base     {base:.3f} s")
        print(f"  fused    {fused:.3f} s  ({fused / base:.2f}x base)")
        print(f"  runtime  {runtime:.3f} s  ({runtime / base:.2f}x base)   rank 16 on {len(ATTENTION)} attention "
              f"linears per block; runtime vs fused rel err {error:.1e} (LoRA changes the output by {changed:.1e})")
        # a ~150 MB file: choose the rank so that the fp16 tensors come to about 150 MB
        dims = sum(m.weight.shape[0] + m.weight.shape[1] for n, m in unet.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.endswith(LARGE))
        rank = max(1, round(150e6 / (2 * dims)))
        large = Path(tmp) / "large.safetensors"
        save_file(lora_file(unet, LARGE, rank, torch.float16), large)
        mb = large.stat().st_size / 1e6
        loads = []
        for i in range(3):
            start = time.perf_counter()
            api.load_lora_weights(pipe, large, adapter_name=f"large{i}")
            loads.append(time.perf_counter() - start)
            api.unload_lora_weights(pipe)
        print(f"load a {mb:.0f} MB LoRA (fp16, rank {rank}, attention + ff + proj linears) onto the fp32 UNet "
              f"(read, match, convert to fp32, build, hook): {min(loads):.3f} s (min of 3; page cache warm)")


if __name__ == "__main__":
    main()
