"""Probe: where the peak RSS of a Stable Diffusion generation comes from, and what releasing weights would save.

latentdiff's pipeline stages are run by hand (encode_prompt, prepare_latents, denoise, decode) in a fresh
process, printing the resident set (VmRSS) and the peak so far (ru_maxrss) after each. Two processes:

- `as is`: every part's weights stay resident once touched (`release_weights = False`);
- `release`: after the prompt is encoded, the text encoder's pages are dropped, and after denoising the
  UNet's (`latentdiff.utils.memory.release_mapped`, what a pipeline loaded with `mmap_weights=True` does; the
  pages come back from the page cache on next use, which is timed by denoising again).

    python benchmarks/probe_peak_rss.py [--size 512] [--steps 1]
"""
from __future__ import annotations

import common

CHILD = """
import resource, time
import torch
from latentdiff import LatentDiffusionPipeline
from latentdiff.utils.memory import release_mapped

def release(module):
    return release_mapped(module) / 2**20

def rss():
    now = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

stages = {{}}
stages["import"] = rss()
pipe = LatentDiffusionPipeline.from_pretrained({folder!r}, mmap_weights=True)
pipe.release_weights = False  # the stages below release by hand, or not at all
stages["from_pretrained"] = rss()
released = {{}}
with torch.inference_mode():
    cond, uncond = pipe.encode_prompt([{prompt!r}], [{negative!r}])
    stages["encode_prompt"] = rss()
    if {release}:
        released["text_encoder"] = release(pipe.text_encoder)
    x_T = pipe.prepare_latents(1, {size}, {size}, generator=torch.Generator().manual_seed(0))
    z0 = pipe.denoise(x_T, cond, uncond, guidance_scale=7.5, num_inference_steps={steps}, progress=False)
    stages["denoise"] = rss()
    if {release}:
        released["unet"] = release(pipe.unet)
    pipe.decode(z0)
    stages["decode"] = rss()
    t0 = time.perf_counter()
    again = pipe.denoise(x_T, cond, uncond, guidance_scale=7.5, num_inference_steps={steps}, progress=False)
    denoise_again = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.denoise(x_T, cond, uncond, guidance_scale=7.5, num_inference_steps={steps}, progress=False)
    denoise_warm = time.perf_counter() - t0
RESULT = dict(stages=stages, released=released, denoise_again=denoise_again, denoise_warm=denoise_warm,
              same=bool(torch.equal(z0, again)))
"""


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=1)
    args = p.parse_args()
    common.header("Peak RSS probe (latentdiff stages, SD1.5 fp32)", args)
    folder = common.folder("sd15")
    runs = {}
    for name, release in (("as is", False), ("release", True)):
        code = CHILD.format(folder=str(folder), prompt=common.PROMPT, negative=common.NEGATIVE, release=release,
                            size=args.size, steps=args.steps) + common.CHILD_EXIT
        runs[name] = common.run_child(code)[0]
    table = common.Table(f"RSS (MB) after each stage, {args.size} px, {args.steps} step(s): now / peak so far",
                         ("stage", "as is", "release text encoder, then UNet"))
    for stage in runs["as is"]["stages"]:
        cells = [" / ".join(f"{v:.0f}" for v in runs[name]["stages"][stage]) for name in runs]
        table.add(stage, *cells)
    rel = runs["release"]
    table.add("released (MB)", "-", ", ".join(f"{k} {v:.0f}" for k, v in rel["released"].items()))
    table.add("denoise again after release / warm (s)", "-",
              f"{rel['denoise_again']:.2f} / {rel['denoise_warm']:.2f} (same latents: {rel['same']})")
    table.print()
    common.footer()
    common.write_json(args.json, [table], runs=runs)


if __name__ == "__main__":
    main()
