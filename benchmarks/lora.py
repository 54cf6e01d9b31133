"""LoRA cost on Stable Diffusion 1.5's UNet (random weights, CPU): per-step time of the base UNet, the UNet with a
rank-16 LoRA on every attention linear fused into the weights (should cost nothing), and the same LoRA at runtime
(forward hooks: x -> down -> up per module); and the time to load a ~150 MB kohya LoRA (fp16, attention, feed-forward
and projection linears) onto the UNet: read + match every key + build every delta + hook.

The peer, side by side in the same run: diffusers' UNet2DConditionModel holding the same random weights (the two
UNets share diffusers' parameter names, so the state dict is copied as is), the same rank-16 factors loaded through
diffusers + peft (`load_lora_adapter` of a PEFT-format state dict: lora_A = kohya's down, lora_B = up), run unfused
(peft's runtime LoRA) and fused (`fuse_lora`); and the same 150 MB kohya file loaded through diffusers' own kohya
path (`StableDiffusionPipeline.lora_state_dict` + `load_lora_into_unet`). Rows print latentdiff / diffusers ratios.

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


def peft_state(kohya: dict, unet: torch.nn.Module) -> dict:
    """The same factors in PEFT's layout (`<module>.lora_A.weight` = down, `.lora_B.weight` = up); alpha = rank,
    which is also what diffusers assumes when no alphas are given, so the scale is 1 on both sides."""
    names = {"lora_unet_" + n.replace(".", "_"): n for n, _ in unet.named_modules()}
    state = {}
    for key, value in kohya.items():
        stem, _, kind = key.partition(".")
        if kind == "lora_down.weight":
            state[f"{names[stem]}.lora_A.weight"] = value
        elif kind == "lora_up.weight":
            state[f"{names[stem]}.lora_B.weight"] = value
    return state


def step_time(unet, x, t, context) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        out = unet(x, t, context)
        seconds = time.perf_counter() - start
    step_time.last = out  # type: ignore[attr-defined]
    return seconds


def peer_step_time(unet, x, t, context) -> float:
    return step_time(lambda *a: unet(a[0], a[1], encoder_hidden_states=a[2]).sample, x, t, context)


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
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    unet = UNet2DConditional(SD15).eval()
    pipe = types.SimpleNamespace(unet=unet, text_encoder=None)
    peer = diffusers.UNet2DConditionModel(
        in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    peer.load_state_dict(unet.state_dict(), strict=True)   # same parameter names and shapes: the same weights
    x = torch.randn(args.batch, 4, args.size, args.size)
    t = torch.full((args.batch,), 500)
    context = torch.randn(args.batch, 77, 768)
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "rank16.safetensors"
        kohya16 = lora_file(unet, ATTENTION, 16, torch.float32)
        save_file(kohya16, small)
        api.load_lora_weights(pipe, small, adapter_name="r16")
        peer.load_lora_adapter(peft_state(kohya16, unet), adapter_name="r16", prefix=None)
        variants = ("base", "runtime", "fused")
        times: dict[str, list[float]] = {f"{lib} {v}": [] for lib in ("ours", "peer") for v in variants}
        outputs = {}
        step_time(unet, x, t, context)        # warm-up
        peer_step_time(peer, x, t, context)
        for _ in range(args.reps):            # the six alternate, so that a busy machine slows each alike
            api.enable_lora(pipe, False)
            times["ours base"].append(step_time(unet, x, t, context))
            outputs["ours base"] = step_time.last  # type: ignore[attr-defined]
            peer.disable_lora()
            times["peer base"].append(peer_step_time(peer, x, t, context))
            outputs["peer base"] = step_time.last  # type: ignore[attr-defined]
            api.enable_lora(pipe, True)
            times["ours runtime"].append(step_time(unet, x, t, context))
            outputs["ours runtime"] = step_time.last  # type: ignore[attr-defined]
            peer.enable_lora()
            times["peer runtime"].append(peer_step_time(peer, x, t, context))
            outputs["peer runtime"] = step_time.last  # type: ignore[attr-defined]
            api.fuse_lora(pipe)
            times["ours fused"].append(step_time(unet, x, t, context))
            outputs["ours fused"] = step_time.last  # type: ignore[attr-defined]
            peer.fuse_lora()
            times["peer fused"].append(peer_step_time(peer, x, t, context))
            outputs["peer fused"] = step_time.last  # type: ignore[attr-defined]
            api.unfuse_lora(pipe)
            peer.unfuse_lora()
        api.unload_lora_weights(pipe)
        peer.unload_lora()
        best = {k: min(v) for k, v in times.items()}

        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a - b).abs().max() / b.abs().max())

        print(f"UNet step, batch {args.batch}, latents {args.size}x{args.size} (min of {args.reps}); rank 16 on "
              f"{len(ATTENTION)} attention linears per block:")
        print(f"  {'':10}{'latentdiff':>12}{'diffusers':>12}{'ld/diffusers':>14}")
        for v in variants:
            ours, theirs = best[f"ours {v}"], best[f"peer {v}"]
            print(f"  {v:10}{ours:>10.3f} s{theirs:>10.3f} s{ours / theirs:>13.2f}x   "
                  f"(vs own base: {ours / best['ours base']:.2f}x / {theirs / best['peer base']:.2f}x)")
        print(f"  outputs, latentdiff vs diffusers rel err: "
              f"base {rel(outputs['ours base'], outputs['peer base']):.1e}, "
              f"runtime {rel(outputs['ours runtime'], outputs['peer runtime']):.1e}, "
              f"fused {rel(outputs['ours fused'], outputs['peer fused']):.1e} (the LoRA changes the output by "
              f"{rel(outputs['ours runtime'], outputs['ours base']):.1e}); latentdiff runtime vs fused "
              f"{rel(outputs['ours runtime'], outputs['ours fused']):.1e}")
        # a ~150 MB file: choose the rank so that the fp16 tensors come to about 150 MB
        dims = sum(m.weight.shape[0] + m.weight.shape[1] for n, m in unet.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.endswith(LARGE))
        rank = max(1, round(150e6 / (2 * dims)))
        large = Path(tmp) / "large.safetensors"
        save_file(lora_file(unet, LARGE, rank, torch.float16), large)
        mb = large.stat().st_size / 1e6
        loads: dict[str, list[float]] = {"ours": [], "peer": []}
        modules = 0
        for i in range(3):                    # alternate here too
            start = time.perf_counter()
            api.load_lora_weights(pipe, large, adapter_name=f"large{i}")
            loads["ours"].append(time.perf_counter() - start)
            api.unload_lora_weights(pipe)
            start = time.perf_counter()
            state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(large))
            diffusers.StableDiffusionPipeline.load_lora_into_unet(state, alphas, peer, adapter_name=f"large{i}")
            loads["peer"].append(time.perf_counter() - start)
            modules = sum(1 for n, _ in peer.named_modules() if n.endswith(".lora_A"))
            peer.unload_lora()
        ours, theirs = min(loads["ours"]), min(loads["peer"])
        print(f"load a {mb:.0f} MB kohya LoRA (fp16, rank {rank}, attention + ff + proj linears) onto the fp32 UNet "
              f"(min of 3; page cache warm):")
        print(f"  latentdiff (read, match, convert to fp32, build, hook)          {ours:.3f} s")
        print(f"  diffusers + peft (lora_state_dict + load_lora_into_unet, {modules} modules) {theirs:.3f} s")
        print(f"  latentdiff / diffusers  {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
