"""mypy against a committed baseline that may only shrink.

    python tools/mypy_baseline.py            # fails on any error not in tools/mypy-baseline.txt
    python tools/mypy_baseline.py --update   # rewrite the baseline (only ever with fewer errors)

An error is keyed by file, message and code, without its line number, so unrelated edits that move lines do not
churn the baseline; a key may occur as many times as the baseline lists it.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "tools" / "mypy-baseline.txt"
LINE = re.compile(r"^(?P<file>[^:]+):\d+(?::\d+)?: error: (?P<message>.*)$")


def current_errors() -> Counter[str]:
    run = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    if run.returncode not in (0, 1) or "error: " not in run.stdout and run.returncode:
        sys.exit(f"mypy did not run: {run.stdout}{run.stderr}")
    errors: Counter[str] = Counter()
    for line in run.stdout.splitlines():
        match = LINE.match(line)
        if match:
            errors[f"{match['file']}: {match['message']}"] += 1
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write the current errors as the new baseline")
    args = parser.parse_args()
    errors = current_errors()
    baseline = Counter(BASELINE.read_text(encoding="utf-8").splitlines()) if BASELINE.exists() else Counter()
    total, allowed = sum(errors.values()), sum(baseline.values())
    if args.update:
        if total > allowed and BASELINE.exists():
            print(f"mypy: {total} errors, more than the baseline's {allowed}: fix them instead", file=sys.stderr)
            return 1
        BASELINE.write_text("".join(f"{key}\n" * n for key, n in sorted(errors.items())), encoding="utf-8")
        print(f"mypy: baseline written, {total} errors")
        return 0
    new = errors - baseline
    if new:
        print(f"mypy: {sum(new.values())} error(s) not in the baseline ({total} in all, baseline {allowed}):")
        for key, n in sorted(new.items()):
            print(f"  {key}" + (f"  (x{n})" if n > 1 else ""))
        return 1
    print(f"mypy: {total} errors, baseline {allowed} (fixed ones can leave it: tools/mypy_baseline.py --update)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
