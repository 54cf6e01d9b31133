"""Write tests/data/public_api.json: the public surface that must keep working (tests/test_public_api.py).

Run once on a commit whose surface is the reference (the house issue froze the surface before it moved modules):
    python tools/snapshot_public_api.py
It records (1) every `from latentdiff... import name` in README.md, docs/, examples/ and benchmarks/,
(2) every `latentdiff.x.y` module path named in those files that imports, and (3) the parameters (name, kind,
default) of every public callable in `latentdiff.__all__` and of its classes' methods that those files call.
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    data = {"imports": documented_imports(), "modules": documented_modules(), "signatures": signatures()}
    (ROOT / "tests" / "data" / "public_api.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(len(data["imports"]), "imports,", len(data["modules"]), "modules,", len(data["signatures"]), "signatures")
