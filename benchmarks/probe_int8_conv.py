"""Diagnosis, not in run_all (issue 20, "int8 weights ... and, if it measures faster, the convolutions"): one SD 1.5
convolution (3x3, batch 2) as a static int8 quantized conv (per-channel int8 weights, per-tensor uint8 activations
quantized and the output dequantized inside the timing) against the same conv in bf16 with `optimize_for_cpu`'s
packing, on both of torch's x86 quantized engines.

Static scales: the input's and the output's ranges are taken from this input (a calibration set would give them
in a real path); dynamic quantization has no convolution in torch. The relative error is max|int8 - fp32| /
max|fp32| of the one call.

    python benchmarks/probe_int8_conv.py --threads 2
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.ao.nn.quantized as nnq

from latentdiff.layers.prepacked import prepack_convolutions

SHAPES = ((320, 32), (640, 16), (1280, 8), (320, 64))   # (channels, side): SD 1.5's levels at 256 and 512 px


def median_ms(f, n: int = 20) -> float:
    for _ in range(3):
        f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e3


def probe(engine: str, channels: int, side: int) -> str:
    torch.backends.quantized.engine = engine
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    x = torch.randn(2, channels, side, side).contiguous(memory_format=torch.channels_last)
    reference = conv(x)
    scales = conv.weight.abs().amax((1, 2, 3)) / 127
    weight = torch.quantize_per_channel(conv.weight, scales, torch.zeros(channels, dtype=torch.long), 0, torch.qint8)
    quantized = nnq.Conv2d(channels, channels, 3, padding=1)
    quantized.set_weight_bias(weight, conv.bias)
    quantized.scale, quantized.zero_point = float(reference.abs().max() / 127), 128
    in_scale = float(x.abs().max() / 127)

    def int8() -> torch.Tensor:
        return quantized(torch.quantize_per_tensor(x, in_scale, 128, torch.quint8)).dequantize()

    bf16 = torch.nn.Conv2d(channels, channels, 3, padding=1).bfloat16()
    bf16.load_state_dict({k: v.bfloat16() for k, v in conv.state_dict().items()})
    prepack_convolutions(bf16)
    xb = x.bfloat16()
    error = ((int8() - reference).abs().max() / reference.abs().max()).item()
    int8_ms, bf16_ms = median_ms(int8), median_ms(lambda: bf16(xb))
    return (f"| {engine} | {channels} x {side} x {side} | {int8_ms:.2f} ms | {bf16_ms:.2f} ms | "
            f"{int8_ms / bf16_ms:.2f}x | {error:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| engine | conv (channels x side) | int8 | bf16 packed | int8 / bf16 | int8 rel. error |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's deprecation of the quantized tensor API
        for engine in ("x86", "onednn"):
            if engine in torch.backends.quantized.supported_engines:
                for channels, side in SHAPES:
                    print(probe(engine, channels, side), flush=True)


if __name__ == "__main__":
    main()
