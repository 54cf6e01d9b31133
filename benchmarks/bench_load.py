"""from_pretrained of a Stable Diffusion 1.5-size pipeline folder, latentdiff against diffusers.

Each measurement is a fresh interpreter that first imports everything either library needs (torch,
transformers' CLIP, the library), so only loading is timed. Two times per run:

- `from_pretrained` returning;
- from_pretrained plus reading every weight once (a sum over every tensor of the UNet, VAE and text
  encoder): a loader that maps the file lazily pays when the weights are first used, so this is the fair
  comparison. The sums are compared between the libraries (same bytes read).

Warm: the folder is in the page cache (a warm-up run first). Cold: the child drops the page cache
(`echo 3 > /proc/sys/vm/drop_caches`, root only; without root only warm rows are printed).

    python benchmarks/bench_load.py [--quick] [--folder PATH]
"""
from __future__ import annotations

from pathlib import Path

import common

CHILD = """
import os, time
import torch
from transformers import CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast, AutoTokenizer
{imports}
import sys; sys.path.insert(0, {bench!r}); import common
if {cold!r} and not common.drop_page_cache():
    raise SystemExit("cannot drop the page cache")

def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

t0 = time.perf_counter()
{load}
t1 = time.perf_counter()
rss_loaded = rss_mb()
total = torch.zeros((), dtype=torch.float64)
for module in (pipe.unet, pipe.vae, pipe.text_encoder):
    for tensor in module.state_dict().values():
        total += float(tensor.sum()) if tensor.is_floating_point() else 0  # touches every byte once
t2 = time.perf_counter()
RESULT = dict(load_s=t1 - t0, load_read_s=t2 - t0, checksum=float(total), rss_loaded_mb=rss_loaded,
              rss_read_mb=rss_mb())
"""
LOADS = {
    "latentdiff": ("from latentdiff import LatentDiffusionPipeline\nimport latentdiff.models.text_encoder",
                   "pipe = LatentDiffusionPipeline.from_pretrained({folder!r})"),
    "diffusers": ("from diffusers import StableDiffusionPipeline\n"
                  "import diffusers; diffusers.utils.logging.disable_progress_bar()",
                  "pipe = StableDiffusionPipeline.from_pretrained({folder!r})"),
}


def child_code(lib: str, folder: Path, *, cold: bool) -> str:
    imports, load = LOADS[lib]
    return CHILD.format(imports=imports, load=load.format(folder=str(folder)), cold=cold,
                        bench=str(Path(__file__).parent)) + common.CHILD_EXIT


def measure(folder: Path, *, cold: bool, reps: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {"latentdiff": [], "diffusers": []}
    names = list(runs)
    for rep in range(reps):
        for lib in (names if rep % 2 == 0 else names[::-1]):
            runs[lib].append(common.run_child(child_code(lib, folder, cold=cold))[0])
    return runs


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=None, help="a diffusers SD folder (default: the sd15 one)")
    args = p.parse_args()
    common.header("Loading a Stable Diffusion 1.5-size folder", args)
    folder = args.folder or common.folder("sd15")
    size = sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 2**30
    print(f"folder: {folder} ({size:.2f} GiB of safetensors, fp32)\n")
    reps = args.reps or (3 if args.quick else 5)
    common.run_child(child_code("latentdiff", folder, cold=False))  # warm the page cache
    can_drop = common.drop_page_cache()
    table = common.Table("from_pretrained, SD 1.5 architecture, fp32, CPU", common.COMPARE_COLUMNS)
    for cold in ((False, True) if can_drop else (False,)):
        runs = measure(folder, cold=cold, reps=reps if not cold else max(2, reps - 2))
        if cold:
            common.run_child(child_code("latentdiff", folder, cold=False))  # leave the cache warm for others
        sums = [runs[lib][0]["checksum"] for lib in ("latentdiff", "diffusers")]
        error = abs(sums[0] - sums[1]) / abs(sums[1])
        cache = "cold" if cold else "warm"
        for key, what in (("load_s", "from_pretrained"), ("load_read_s", "from_pretrained + read every weight")):
            table.compare(f"{what}, {cache} cache", [r[key] for r in runs["latentdiff"]],
                          [r[key] for r in runs["diffusers"]], error=error if key == "load_read_s" else None,
                          note="error: weight checksums" if key == "load_read_s" else "")
        for key, what in (("rss_loaded_mb", "RSS after from_pretrained (MB)"),
                          ("rss_read_mb", "RSS after reading every weight (MB)")):
            table.compare(f"{what}, {cache}", [r[key] for r in runs["latentdiff"]],
                          [r[key] for r in runs["diffusers"]], unit=lambda v: f"{v:.0f}")
    if not can_drop:
        table.add("cold cache", "-", "-", "-", "-", "-", "cannot drop the page cache (needs root): warm only")
    table.print()
    common.footer()
    common.write_json(args.json, [table])


if __name__ == "__main__":
    main()
