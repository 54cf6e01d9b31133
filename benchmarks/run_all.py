"""Run every benchmark, one after the other, and collect their markdown into one report.

    python benchmarks/run_all.py --quick                  # ~10 min on 2 idle cores
    python benchmarks/run_all.py --threads 1 --out report.md
    python benchmarks/run_all.py --only unet vae -- --sizes 32

Arguments after `--` go to every script. Each script runs in its own process (so one's memory does not
weigh on the next); a failing script is reported and the others still run. The model folders are built
once (see common.py) before the first script, and their build time is not part of any figure.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import common

SCRIPTS = ("import", "load", "unet", "vae", "text", "pipeline")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--only", nargs="+", choices=SCRIPTS, default=list(SCRIPTS))
    p.add_argument("--out", type=Path, default=None, help="write the collected markdown here too")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then arguments for every script")
    args = p.parse_args()
    passthrough = [a for a in args.rest if a != "--"]
    if args.quick:
        passthrough.append("--quick")
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    if args.device:
        passthrough += ["--device", args.device]

    for name in ("tiny", "sd15"):
        common.folder(name)
    report, failed, start = [], [], time.perf_counter()
    for name in args.only:
        script = Path(__file__).with_name(f"bench_{name}.py")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), *passthrough], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        print(proc.stdout, flush=True)
        report.append(proc.stdout)
        if proc.returncode:
            failed.append(name)
            print(f"**bench_{name}.py failed ({proc.returncode})**\n\n```\n{proc.stderr[-4000:]}\n```\n", flush=True)
            report.append(f"**bench_{name}.py failed**\n")
        print(f"(bench_{name}.py: {seconds:.0f} s)\n", file=sys.stderr, flush=True)
    summary = f"run_all: {len(args.only)} scripts in {time.perf_counter() - start:.0f} s; failed: {failed or 'none'}"
    print(summary)
    if args.out:
        args.out.write_text("\n".join(report) + f"\n{summary}\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
