"""The per-step cost of one ControlNet on Stable Diffusion 1.5, latentdiff against diffusers, on the same weights.

SD 1.5's UNet (860 M, its real config, random weights: the `sd15` folder of benchmarks/common.py) and a ControlNet
of SD 1.5's shape (diffusers' `ControlNetModel.from_unet` of that UNet, every weight then randomised, the zero
convolutions too, saved once in the cache), both loaded by each library's own `from_pretrained`. One step of
classifier-free guidance = batch 2: the ControlNet's forward on the latents, the text context and the control image
(8 x the latent's side), then the UNet's forward with the residuals added (latentdiff:
`unet(..., residuals=Residuals(down, mid))`; diffusers: `down_block_additional_residuals` /
`mid_block_additional_residual`, what its StableDiffusionControlNetPipeline does per step). The plain UNet step is
timed beside it, so the table shows both libraries' ControlNet overhead as well as the ratio between them.

Both libraries' models share the process, calls alternating (`common.alternate`): on a machine shared with other
jobs the load falls on both alike.

    python benchmarks/controlnet_step.py                  # 512 px, fp32 and bf16
    python benchmarks/controlnet_step.py --quick          # 256 px, bf16 only
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import common

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CONTROLNET_VERSION = "1"


def controlnet_folder(sd15: Path) -> Path:
    """A diffusers ControlNetModel of SD 1.5's shape with random weights (every one, the zero convs too), cached."""
    path = common.CACHE / f"sd15-controlnet-v{CONTROLNET_VERSION}"
    if (path / "COMPLETE").is_file():
        return path
    import diffusers
    import torch
    from tests._support.parity import randomize

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd15, subfolder="unet")
    model = randomize(diffusers.ControlNetModel.from_unet(unet), seed=1)
    del unet
    model.save_pretrained(path)
    (path / "COMPLETE").write_text("ok\n")
    return path


def inputs(side: int, *, dtype: Any, device: str, seed: int = 0) -> tuple:
    """(x (2, 4, side, side), t, context (2, 77, 768), control image (2, 3, 8 side, 8 side) in [0, 1])."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, side, side, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    hint = torch.rand(2, 3, 8 * side, 8 * side, generator=g)
    return x.to(device, dtype), torch.tensor(500, device=device), context.to(device, dtype), hint.to(device, dtype)


def load(lib: str, sd15: Path, cn: Path, dtype: Any, device: str) -> tuple[Any, Any]:
    """(UNet, ControlNet) by `lib`'s own from_pretrained, eval mode."""
    if lib == "latentdiff":
        from latentdiff import ControlNet, UNet2DConditional

        unet = UNet2DConditional.from_pretrained(sd15, subfolder="unet", torch_dtype=dtype, device=device)
        return unet.eval(), ControlNet.from_pretrained(cn, torch_dtype=dtype, device=device).eval()
    import diffusers

    common.quiet_diffusers()
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd15, subfolder="unet", torch_dtype=dtype)
    controlnet = diffusers.ControlNetModel.from_pretrained(cn, torch_dtype=dtype)
    return unet.to(device).eval(), controlnet.to(device).eval()


def steps(lib: str, unet: Any, controlnet: Any, x: Any, t: Any, context: Any, hint: Any) -> dict[str, Any]:
    """name -> a callable running one CFG step of `lib`: the UNet alone, and the ControlNet then the UNet."""
    import torch

    if lib == "latentdiff":
        from latentdiff.models.residuals import Residuals

        def plain() -> torch.Tensor:
            with torch.inference_mode():
                return unet(x, t, context)

        def controlled() -> torch.Tensor:
            with torch.inference_mode():
                down, mid = controlnet(x, t, context, hint)
                return unet(x, t, context, residuals=Residuals(down=down, mid=mid))
    else:
        def plain() -> torch.Tensor:
            with torch.inference_mode():
                return unet(x, t, encoder_hidden_states=context).sample

        def controlled() -> torch.Tensor:
            with torch.inference_mode():
                down, mid = controlnet(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
                return unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
    return {"unet": plain, "controlnet+unet": controlled}


def rows(table: common.Table, name: str, sd15: Path, cn: Path, args: Any) -> None:
    import torch

    dtype = getattr(torch, DTYPES[name])
    side = args.size // 8
    data = inputs(side, dtype=dtype, device=args.device)
    cases, outputs = {}, {}
    for lib in ("latentdiff", "diffusers"):
        models = load(lib, sd15, cn, dtype, args.device)
        for what, fn in steps(lib, *models, *data).items():
            cases[f"{lib} {what}"] = fn
            outputs[f"{lib} {what}"] = fn().float().cpu()
    times = common.alternate(cases, reps=args.reps, warmup=0, device=args.device)
    for what in ("unet", "controlnet+unet"):
        table.compare(f"{args.size} px, {name}: {'UNet alone' if what == 'unet' else 'ControlNet + UNet'}",
                      times[f"latentdiff {what}"], times[f"diffusers {what}"],
                      error=common.max_rel_error(outputs[f"latentdiff {what}"], outputs[f"diffusers {what}"]))
    over = [common.median(times[f"{lib} controlnet+unet"]) / common.median(times[f"{lib} unet"])
            for lib in ("latentdiff", "diffusers")]
    table.add(f"{args.size} px, {name}: ControlNet step / plain step", f"{over[0]:.2f}x", f"{over[1]:.2f}x",
              "-", "-", "-", "-", "the ControlNet's share of a step")


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512; quick 256)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                   help="precisions (default: fp32 bf16 on CPU, fp16 on CUDA; quick: bf16 / fp16)")
    args = p.parse_args()
    args.device = common.device_of(args)
    args.size = args.size or (256 if args.quick else 512)
    args.reps = args.reps or (2 if args.quick else 3)
    low = "fp16" if args.device == "cuda" else "bf16"
    args.dtype = args.dtype or ([low] if args.quick else ["fp32", low])
    if args.size % 8:
        p.error(f"--size must be a multiple of 8 (the VAE factor), got {args.size}")
    common.header("One ControlNet on SD 1.5: the per-step cost", args)
    sd15 = common.folder("sd15")
    cn = controlnet_folder(sd15)
    table = common.Table(f"SD 1.5 UNet + one ControlNet, one CFG step (batch 2), {args.device}",
                         common.COMPARE_COLUMNS)
    for name in args.dtype:
        rows(table, name, sd15, cn, args)
    table.print()
    common.write_json(args.json, [table])
    common.footer()


if __name__ == "__main__":
    main()
