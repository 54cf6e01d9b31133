"""Time to an image the checker accepts, on the built-in model: DDIM 50 against few-step samplers and the LCM-LoRA.

`latentdiff/shapes-64` generates `--count` held-out prompts (the seeds of the reported figures, each image with its
own generator, batches of 50) with each sampler setting; the held-out checker (data/shapes_checker.py) scores them.
The table gives the time per image (the batch's wall time / its images) next to the scores, so every speed claim
has its quality side: a setting is only faster if its scores hold.

Settings: the model's own (DDIM 50, guidance 1.5); DPM++ 2M Karras and UniPC at 10, 15, 20 steps (guidance 1.5);
LCM at 4 steps without guidance (one UNet pass per step) with the shipped LCM-LoRA
`latentdiff/shapes-64-lcm-lora` (applied at every call, and fused into the weights), and without it (what the
LoRA adds).

    python benchmarks/time_to_image.py --threads 1           # ~10 min on 2 loaded cores
    python benchmarks/time_to_image.py --quick               # 50 images per setting
"""
from __future__ import annotations

from typing import Any

import common

LCM_LORA = "latentdiff/shapes-64-lcm-lora"


def settings_list(base: dict[str, Any]) -> list[tuple[str, dict[str, Any], str | None]]:
    """(label, generate settings, the LCM-LoRA: None, "loaded" (applied at every call) or "fused" (into the
    weights, `pipe.fuse_lora()`))."""
    guidance = base["guidance_scale"]
    rows: list[tuple[str, dict[str, Any], str | None]] = [
        (f"DDIM {base['num_inference_steps']} (the model's settings)", dict(base), None)]
    for sampler, label in (("DPM++ 2M Karras", "DPM++ 2M Karras"), ("UniPC", "UniPC")):
        for steps in (10, 15, 20):
            rows.append((f"{label} {steps}", {**base, "sampler": sampler, "num_inference_steps": steps,
                                               "guidance_scale": guidance}, None))
    lcm = {**base, "sampler": "LCM", "num_inference_steps": 4, "guidance_scale": 1.0}
    rows.append(("LCM 4, LCM-LoRA, no CFG", lcm, "loaded"))
    rows.append(("LCM 4, LCM-LoRA fused, no CFG", lcm, "fused"))
    rows.append(("LCM 4, no LoRA, no CFG", lcm, None))
    return rows


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=None, help="images per setting (default 200; quick 50)")
    args = p.parse_args()
    args.count = args.count or (50 if args.quick else 200)
    common.header("Time to a good image on the built-in model", args)

    from latentdiff import LatentDiffusionPipeline, hub
    from latentdiff.builtin import generate_settings

    base = generate_settings(hub.resolve("latentdiff/shapes-64", allow_patterns=["*.json"]))
    table = common.Table(f"latentdiff/shapes-64, {args.count} held-out prompts per setting",
                         ("setting", "UNet rows / image", "per image", "speed-up / DDIM 50",
                          *common.ACCURACY_COLUMNS))
    reference = None
    for label, settings, lora in settings_list(base):
        pipe = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64")
        if lora:
            pipe.load_lora_weights(LCM_LORA)
            if lora == "fused":
                pipe.fuse_lora()
        rows_per_image = settings["num_inference_steps"] * (2 if settings["guidance_scale"] != 1 else 1)
        report, per_image = common.checker_run(pipe, count=args.count, settings=settings)
        reference = reference or per_image
        acc = report["accuracy"]
        table.add(label, rows_per_image, common.fmt_time(per_image), f"{reference / per_image:.1f}x",
                  *common.accuracy_cells(acc),
                  data=dict(setting=label, per_image=per_image, settings=settings, lora=lora, **acc))
        print(f"  {label}: {per_image * 1e3:.0f} ms per image, all {acc['all']:.3f}", flush=True)
    table.print()
    common.write_json(args.json, [table])
    common.footer()


if __name__ == "__main__":
    main()
