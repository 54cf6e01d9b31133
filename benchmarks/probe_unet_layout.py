"""Probe: what the SD 1.5 UNet gains from each candidate change of memory layout, measured before src/ changes.

latentdiff's SpatialTransformer hands its 1x1 `proj_out` conv a permuted (channels-last strided) tensor, so
that conv's output, the residual sum and every convolution after it run on channels-last activations with
NCHW weights: `aten::_convolution` then copies each weight to channels-last on every call (see bench_unet's
"copies inside convs" column). This script times, alternately and on the same weights and inputs:

- `as is`: latentdiff's UNet as it stands;
- `contiguous`: the same UNet with `.contiguous()` on proj_out's input (the one-line change proposed for
  layers/attention.py; diffusers does the same), applied here by wrapping `SpatialTransformer.forward`;
- `channels-last`: latentdiff's UNet with weights and input converted to channels-last once;
- `diffusers`: diffusers' UNet2DConditionModel (NCHW).

    python benchmarks/probe_unet_layout.py [--sizes 32] [--dtype fp32 bf16] [--reps 3]
"""
from __future__ import annotations

import contextlib

import common
import torch
from bench_unet import inputs, load_one

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def contiguous_proj_out():
    """SpatialTransformer with `proj_out(x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous())`."""
    from latentdiff.layers import attention

    original = attention.SpatialTransformer.forward

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, c))
        else:
            x = self.proj_in(x)
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, x.shape[1])
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x).reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        else:
            x = self.proj_out(x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous())
        return x + residual

    attention.SpatialTransformer.forward = forward
    try:
        yield
    finally:
        attention.SpatialTransformer.forward = original


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    args = p.parse_args()
    common.header("UNet memory-layout probe", args)
    device, reps = common.device_of(args), args.reps or 3
    folder = common.folder("sd15")
    table = common.Table("SD1.5 UNet, batch 2: candidate layouts (ratio column: against diffusers, same dtype)",
                         common.COMPARE_COLUMNS)
    for name in args.dtype:
        dtype = DTYPES[name]
        ours = load_one(folder, "latentdiff", dtype, device)
        ours_cl = load_one(folder, "latentdiff", dtype, device).to(memory_format=torch.channels_last)
        theirs = load_one(folder, "diffusers", dtype, device)
        for size in args.sizes:
            x, t, context = (v.to(dtype) if v.is_floating_point() else v for v in inputs(dict(theirs.config), size,
                                                                                          device=device))
            x_cl = x.contiguous(memory_format=torch.channels_last)

            def run(model, sample, patched=False, t=t, context=context):
                def call():
                    with torch.inference_mode(), (contiguous_proj_out() if patched else contextlib.nullcontext()):
                        return model(sample, t, context)
                return call

            cases = {"as is": run(ours, x), "contiguous": run(ours, x, patched=True),
                     "channels-last": run(ours_cl, x_cl)}
            with torch.inference_mode():
                expected = theirs(x, t, encoder_hidden_states=context).sample.float()
            # the reference is diffusers in the same dtype: bit-identical kernels show as 0.0
            errors = {k: common.max_rel_error(f().float(), expected) for k, f in cases.items()}
            copies = {k: common.weight_copies(f)[1] for k, f in cases.items()}
            def call_theirs(model=theirs, x=x, t=t, context=context):
                with torch.inference_mode():
                    return model(x, t, encoder_hidden_states=context).sample

            cases["diffusers"] = call_theirs
            times = common.alternate(cases, reps=reps, warmup=0, device=device)
            for k in ("as is", "contiguous", "channels-last"):
                table.compare(f"{size}x{size} {name}: latentdiff {k}", times[k], times["diffusers"], error=errors[k],
                              note=f"copies inside convs: {copies[k]:.0f} MB/call (fp32-equivalent)")
        del ours, ours_cl, theirs
    table.print()
    common.footer()
    common.write_json(args.json, [table])


if __name__ == "__main__":
    main()
