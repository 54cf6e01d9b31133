"""The quality side of `quantize(pipe, "int8-static")` (docs/fast.md "## CPU"): the built-in model's checker scores
and the image difference to fp32, for fp32, bf16 with `optimize_for_cpu`, and int8-static on top of either.

`latentdiff/shapes-64` generates `--count` held-out prompts at its own settings (the seeds of the reported figures);
the held-out checker scores each setting's images, and every setting's images are compared pixel by pixel with
the fp32 ones (mean |difference| in 0..255 and PSNR). int8-static calibrates on CALIBRATION (4 shapes prompts, 8
steps) before it generates; the calibration time is printed, not counted per image. Times per image are wall
times of the whole batch (say whether the machine was quiet).

    python benchmarks/int8_quality.py --threads 2           # 200 images per setting
    python benchmarks/int8_quality.py --quick               # 50
"""
from __future__ import annotations

import time
from typing import Any

import common

CALIBRATION = ["a red circle on the left, blue background", "a yellow square at the top, black background",
               "a green triangle at the bottom, white background", "a black circle in the center, red background"]
SETTINGS = ("fp32", "bf16 + optimize_for_cpu", "int8-static, fp32", "int8-static, bf16 + optimize_for_cpu")


def prepared(name: str) -> tuple[Any, float]:
    """The built-in pipeline set up as `name`, and the seconds its calibration took."""
    import torch

    from latentdiff import LatentDiffusionPipeline
    from latentdiff.pipelines.cpu_paths import optimize_for_cpu, quantize

    pipe = LatentDiffusionPipeline.from_pretrained(
        "latentdiff/shapes-64", torch_dtype=torch.bfloat16 if "bf16" in name else torch.float32)
    if "optimize_for_cpu" in name:
        optimize_for_cpu(pipe)
    start = time.perf_counter()
    if name.startswith("int8"):
        quantize(pipe, "int8-static", calibration=CALIBRATION)
    return pipe, time.perf_counter() - start


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=None, help="images per setting (default 200; quick 50)")
    args = p.parse_args()
    args.count = args.count or (50 if args.quick else 200)
    common.header("int8-static on the built-in model", args)

    import numpy as np

    from latentdiff import hub
    from latentdiff.builtin import generate_settings

    settings = generate_settings(hub.resolve("latentdiff/shapes-64", allow_patterns=["*.json"]))
    table = common.Table(f"latentdiff/shapes-64 (DDIM {settings['num_inference_steps']}, guidance "
                         f"{settings['guidance_scale']}), {args.count} held-out prompts",
                         ("setting", "per image", "calibration", "mean abs diff / fp32", "PSNR / fp32",
                          *common.ACCURACY_COLUMNS))
    reference = None
    for name in SETTINGS:
        pipe, calibration = prepared(name)
        report, per_image = common.checker_run(pipe, count=args.count, settings=settings)
        images = np.stack([np.asarray(image) for image in report["images"]])
        reference = images if reference is None else reference
        mad, psnr = common.image_difference(images, reference)
        acc = report["accuracy"]
        table.add(name, common.fmt_time(per_image), f"{calibration:.1f} s", f"{mad:.2f}", f"{psnr:.1f} dB",
                  *common.accuracy_cells(acc),
                  data=dict(setting=name, per_image=per_image, calibration=calibration, mad=mad, psnr=psnr, **acc))
        print(f"  {name}: {per_image * 1e3:.0f} ms per image, all {acc['all']:.3f}, {mad:.2f} / 255", flush=True)
    table.print()
    common.write_json(args.json, [table])
    common.footer()


if __name__ == "__main__":
    main()
