"""Import time and time to the first image from a cold process, latentdiff against diffusers.

Every measurement is a fresh interpreter (the module cache of one run must not help the next), the two
libraries alternating. Rows:

- the import statement alone (`from latentdiff import LatentDiffusionPipeline` against
  `from diffusers import StableDiffusionPipeline`), timed inside the child, and `import torch` for scale;
- the child's whole life (interpreter start to exit) for the same statement;
- the first image of the tiny pipeline (tests' tiny configs, 10 DDIM steps, 64 px, guidance 7.5): import +
  from_pretrained + one call, from interpreter start; both images are compared (same latents).

Then what the import pulls in: heavy packages present in sys.modules after it, and the largest
`-X importtime` entries (what to make lazy).

    python benchmarks/bench_import.py [--quick]
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import common

IMPORTS = {
    "latentdiff": "from latentdiff import LatentDiffusionPipeline",
    "diffusers": "from diffusers import StableDiffusionPipeline",
    "torch": "import torch",
}
HEAVY = ("torch", "transformers", "diffusers", "accelerate", "safetensors", "huggingface_hub", "numpy", "PIL",
         "einops", "tqdm", "yaml", "scipy", "sklearn", "tokenizers")

IMPORT_CHILD = """
import sys, time
t0 = time.perf_counter()
{statement}
RESULT = dict(seconds=time.perf_counter() - t0, heavy=sorted(m for m in {heavy!r} if m in sys.modules))
"""

FIRST_IMAGE_CHILD = """
import time
t0 = time.perf_counter()
{imports}
t1 = time.perf_counter()
pipe = {load}
t2 = time.perf_counter()
import numpy as np, torch
latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))
image = pipe({prompt!r}, negative_prompt={negative!r}, num_inference_steps=10, guidance_scale=7.5, height=64,
             width=64, latents=latents, output_type="np"{extra}).images
t3 = time.perf_counter()
np.save({out!r}, np.asarray(image))
RESULT = dict(import_s=t1 - t0, load_s=t2 - t1, image_s=t3 - t2, total_s=t3 - t0)
"""


def first_image_code(lib: str, folder: Path, out: Path) -> str:
    if lib == "latentdiff":
        imports, load = IMPORTS["latentdiff"], f"LatentDiffusionPipeline.from_pretrained({str(folder)!r})"
        extra = ", progress=False"
    else:
        imports = IMPORTS["diffusers"] + "\nimport diffusers; diffusers.utils.logging.disable_progress_bar()"
        load = f"StableDiffusionPipeline.from_pretrained({str(folder)!r})\npipe.set_progress_bar_config(disable=True)"
        extra = ""
    return FIRST_IMAGE_CHILD.format(imports=imports, load=load, prompt=common.PROMPT, negative=common.NEGATIVE,
                                    out=str(out), extra=extra) + common.CHILD_EXIT


def alternate_children(codes: dict[str, str], reps: int) -> dict[str, list[tuple[dict, float]]]:
    """Run each child `reps` times, alternating the order; name -> [(result, wall seconds)]."""
    names, runs = list(codes), {name: [] for name in codes}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            result, wall, _ = common.run_child(codes[name])
            runs[name].append((result, wall))
    return runs


def import_profile(statement: str, top: int = 12) -> list[tuple[float, str]]:
    """The largest cumulative `-X importtime` entries of a statement: [(seconds, module)], top-level first."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True,
                         cwd=str(common.REPO)).stderr
    entries = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self_us, cumulative_us, name = line.split(":", 1)[1].split("|")  # "import time: self | cumul | name"
        depth = (len(name) - len(name.lstrip())) // 2
        entries.append((int(cumulative_us) / 1e6, depth, name.strip()))
    shallow = [e for e in entries if e[1] <= 1]
    return [(s, f"{'  ' * d}{n}") for s, d, n in sorted(shallow, reverse=True)[:top]]


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    common.header("Import and cold start", args)
    reps = args.reps or (3 if args.quick else 7)
    tables = []

    runs = alternate_children({name: IMPORT_CHILD.format(statement=s, heavy=HEAVY) + common.CHILD_EXIT
                               for name, s in IMPORTS.items()}, reps)
    seconds = {name: [r["seconds"] for r, _ in rs] for name, rs in runs.items()}
    walls = {name: [w for _, w in rs] for name, rs in runs.items()}
    table = common.Table("Import (fresh process each)", common.COMPARE_COLUMNS)
    table.compare("import statement", seconds["latentdiff"], seconds["diffusers"],
                  note=f"`import torch` alone: {common.fmt_time(common.median(seconds['torch']))}")
    table.compare("whole process (start to exit)", walls["latentdiff"], walls["diffusers"],
                  note=f"python + torch: {common.fmt_time(common.median(walls['torch']))}")
    rss = {name: common.median([r["maxrss_mb"] for r, _ in rs]) for name, rs in runs.items()}
    table.compare("peak RSS after import (MB)", [rss["latentdiff"]], [rss["diffusers"]],
                  unit=lambda v: f"{v:.0f}", note=f"torch alone {rss['torch']:.0f}")
    table.print()
    tables.append(table)
    for name in ("latentdiff", "diffusers"):
        print(f"- heavy modules loaded by `{IMPORTS[name]}`: {', '.join(runs[name][0][0]['heavy']) or 'none'}")
    print()

    tiny = common.folder("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        outs = {lib: Path(tmp) / f"{lib}.npy" for lib in ("latentdiff", "diffusers")}
        runs = alternate_children({lib: first_image_code(lib, tiny, out) for lib, out in outs.items()},
                                  max(2, reps - 2) if args.quick else reps)
        import numpy as np

        error = common.max_rel_error(np.load(outs["latentdiff"]), np.load(outs["diffusers"]))
    table = common.Table("Time to first image, cold process (tiny pipeline, 10 DDIM steps, 64 px)",
                         common.COMPARE_COLUMNS)
    for key, what in (("total_s", "in-process total"), ("import_s", "- import"), ("load_s", "- from_pretrained"),
                      ("image_s", "- first call (10 steps + decode)")):
        table.compare(what, [r[key] for r, _ in runs["latentdiff"]], [r[key] for r, _ in runs["diffusers"]],
                      error=error if key == "total_s" else None)
    table.compare("whole process (start to exit)", [w for _, w in runs["latentdiff"]],
                  [w for _, w in runs["diffusers"]])
    table.print()
    tables.append(table)

    print("### Largest imports under `from latentdiff import LatentDiffusionPipeline` (-X importtime, cumulative)\n")
    for seconds_, name in import_profile(IMPORTS["latentdiff"]):
        print(f"    {seconds_ * 1e3:8.0f} ms  {name}")
    print()
    common.footer()
    common.write_json(args.json, tables)


if __name__ == "__main__":
    main()
