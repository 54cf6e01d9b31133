"""int8-static against bf16 (or fp32) with `optimize_for_cpu` on the SD 1.5-size UNet (random weights), interleaved
in one process: seconds per CFG step (one UNet call, batch 2) and the max relative error of one call against fp32.

The UNet is loaded once in bf16 (--dtype), packed, calibrated (3 calls at t = 999, 500, 50 on random latents and
context), and each case swaps the layers' forwards in place (the packed float forward or the int8 one, packed
once), so every case runs the same weights in the same process, alternately (`common.alternate`): the ratios hold
on a loaded machine better than separate runs. Cases: packed float; int8 on every candidate layer; on the
convolutions only; on the linear layers only; and --max-rows values of `layers.int8.INT8_MAX_ROWS` (bf16 linear
inputs with more rows run bf16).

    python benchmarks/int8_unet.py --size 32 --threads 2          # 256 px; --size 64 for 512 px
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI python benchmarks/int8_unet.py --dtype fp32   # a CPU without bf16 / AMX
"""
from __future__ import annotations

import common
import torch
from torch import nn


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32, help="latent side (32: 256 px, 64: 512 px)")
    p.add_argument("--max-rows", default="256,4096", help="other INT8_MAX_ROWS values to time, comma-separated")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="the UNet's float dtype")
    p.add_argument("--folder", default=None, help="an SD 1.5 folder (default: benchmarks/common.py's sd15)")
    args = p.parse_args()
    args.reps = args.reps or (3 if args.quick else 7)
    common.header(f"int8-static against {args.dtype} packed, SD 1.5 UNet, {8 * args.size} px", args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.set_grad_enabled(False)

    from latentdiff import UNet2DConditional
    from latentdiff.layers import int8
    from latentdiff.layers.prepacked import prepack_convolutions, prepack_linears

    folder = args.folder or common.folder("sd15")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.size, args.size, generator=g).contiguous(memory_format=torch.channels_last)
    context, t = torch.randn(2, 77, 768, generator=g), torch.tensor([500, 500])
    unet = UNet2DConditional.from_pretrained(f"{folder}/unet").eval()
    expected = unet(x, t, context)
    unet = unet.to(dtype)
    prepack_convolutions(unet)
    prepack_linears(unet)
    xb, cb = x.to(dtype), context.to(dtype)
    layers = int8.int8_candidates(unet)
    with int8.observe_input_ranges(layers) as ranges:
        for step in (999, 500, 50):
            unet(xb, torch.tensor([step, step]), cb)
    int8.quantize_layers(layers, ranges)
    forwards = {name: layer.__dict__["forward"] for name, layer in layers.items()}

    def use(chosen: set[str], max_rows: int = int8.INT8_MAX_ROWS):
        def run() -> torch.Tensor:
            int8.INT8_MAX_ROWS = max_rows
            for name, layer in layers.items():
                layer.forward = forwards[name] if name in chosen else forwards[name].previous
            return unet(xb, t, cb)
        return run

    everything = set(layers)
    convs = {n for n, m in layers.items() if type(m) is nn.Conv2d}
    cases = {f"{args.dtype} packed": use(set()), f"int8 all (max rows {int8.INT8_MAX_ROWS})": use(everything),
             "int8 convolutions only": use(convs), "int8 linear only": use(everything - convs)}
    for rows in (int(r) for r in args.max_rows.split(",") if r):
        cases[f"int8 all (max rows {rows})"] = use(everything, rows)
    times = common.alternate(cases, reps=args.reps)
    table = common.Table(f"SD 1.5 UNet, {8 * args.size} px, batch 2, {torch.get_num_threads()} threads",
                         ("case", "median", "min", f"/ {args.dtype} packed (median)", "max rel. error / fp32"))
    base = common.median(times[f"{args.dtype} packed"])
    for name, run in cases.items():
        error = common.max_rel_error(run().float(), expected)
        med = common.median(times[name])
        table.add(name, common.fmt_time(med), common.fmt_time(min(times[name])), f"{med / base:.2f}x",
                  f"{error:.4f}", data=dict(case=name, median=med, min=min(times[name]), error=error))
    table.print()
    common.write_json(args.json, [table])
    common.footer()


if __name__ == "__main__":
    main()
