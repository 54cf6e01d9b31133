"""Write tests/data/public_api.json: the public surface that must keep working (tests/test_public_api.py).

Run once on a commit whose surface is the reference (the house issue froze the surface before it moved modules):
    python tools/snapshot_public_api.py            # (re)write the snapshot
    python tools/snapshot_public_api.py --check    # compare only: list what differs, exit 1 if anything does
    python tools/snapshot_public_api.py --help
It records (1) every `from latentdiff... import name` in README.md, docs/, examples/ and benchmarks/,
(2) every `latentdiff.x.y` module path named in those files that imports, and (3) the parameters (name, kind,
default) of every public callable in `latentdiff.__all__` and of its classes' methods that those files call.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "data" / "public_api.json"
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "examples").rglob("*.py")),
         *sorted((ROOT / "benchmarks").rglob("*.py"))]
IMPORT = re.compile(r"from (latentdiff[\w.]*) import \(?([\w,\s\\]+)\)?")
MODULE = re.compile(r"\b(latentdiff(?:\.\w+)+)\b")


def documented_imports() -> list[list[str]]:
    found = set()
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        for module, names in IMPORT.findall(text):
            for name in re.split(r"[,\s\\]+", names):
                if name and name != "as":
                    found.add((module, name))
    ok = []
    for module, name in sorted(found):
        try:
            if hasattr(importlib.import_module(module), name) or importlib.util.find_spec(f"{module}.{name}"):
                ok.append([module, name])
        except ImportError:
            pass
    return ok


def documented_modules() -> list[str]:
    found = set()
    for path in FILES:
        found.update(MODULE.findall(path.read_text(encoding="utf-8")))
    ok = set()
    for name in found:
        while "." in name:
            try:
                importlib.import_module(name)
                ok.add(name)
                break
            except ImportError:
                name = name.rpartition(".")[0]
    return sorted(ok)


def parameters(fn) -> list[list] | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    return [[p.name, p.kind.name, repr(p.default) if p.default is not p.empty else None]
            for p in sig.parameters.values()]


def documented_methods() -> set[str]:
    """Method names the documentation calls (`.name(`), plus construction and calling."""
    names = {"__init__", "__call__"}
    for path in FILES:
        names.update(re.findall(r"\.([a-z]\w*)\(", path.read_text(encoding="utf-8")))
    return names


def signatures() -> dict[str, list]:
    import latentdiff
    methods = documented_methods()
    out = {}
    for name in latentdiff.__all__:
        obj = getattr(latentdiff, name)
        if inspect.isclass(obj):
            for attr in sorted(methods):
                member = inspect.getattr_static(obj, attr, None)
                if isinstance(member, (classmethod, staticmethod)) or inspect.isfunction(member):
                    out[f"{name}.{attr}"] = parameters(getattr(obj, attr))
        elif callable(obj):
            out[name] = parameters(obj)
    return {k: v for k, v in sorted(out.items()) if v is not None}


def snapshot() -> dict[str, Any]:
    """The surface as this tree has it, in the file's form."""
    return {"imports": documented_imports(), "modules": documented_modules(), "signatures": signatures()}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per entry only one of the two snapshots holds ("-": the old one's, "+": the new one's), and per
    signature that changed ("~": its parameters gone, added, or of another kind or default)."""
    lines = []
    for key in ("imports", "modules"):
        before = {json.dumps(item) for item in old.get(key, [])}
        after = {json.dumps(item) for item in new.get(key, [])}
        lines += [f"- {key}: {item}" for item in sorted(before - after)]
        lines += [f"+ {key}: {item}" for item in sorted(after - before)]
    before, after = old.get("signatures", {}), new.get("signatures", {})
    for name in sorted(set(before) | set(after)):
        if name not in after:
            lines.append(f"- signatures: {name}")
        elif name not in before:
            lines.append(f"+ signatures: {name}")
        elif before[name] != after[name]:
            was = {param[0]: param[1:] for param in before[name]}
            now = {param[0]: param[1:] for param in after[name]}
            parts = [f"-{p}" for p in was if p not in now] + [f"+{p}" for p in now if p not in was]
            parts += [f"{p} {was[p]} -> {now[p]}" for p in was if p in now and was[p] != now[p]]
            lines.append(f"~ signatures: {name}: {', '.join(parts) or 'parameter order'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Snapshot the public surface (documented imports and module paths, the parameters of "
                    "latentdiff.__all__) that tests/test_public_api.py keeps working. Without --check it rewrites "
                    "the snapshot: do so only on a commit whose surface is the reference.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing: list how this tree's surface differs from the snapshot, exit 1 if it "
                             "does (entries the tree gained count too)")
    parser.add_argument("--output", type=Path, default=SNAPSHOT, metavar="FILE",
                        help="the snapshot file (default tests/data/public_api.json)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    data = snapshot()
    if args.check:
        if not args.output.is_file():
            print(f"{args.output}: no such file", file=sys.stderr)
            return 1
        lines = differences(json.loads(args.output.read_text(encoding="utf-8")), data)
        counts = {sign: sum(line.startswith(sign) for line in lines) for sign in "-+~"}
        print(*lines, f"{args.output}: {counts['-']} gone, {counts['+']} added, {counts['~']} changed "
                      "since the snapshot", sep="\n")
        return 1 if lines else 0
    args.output.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(len(data["imports"]), "imports,", len(data["modules"]), "modules,", len(data["signatures"]), "signatures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
