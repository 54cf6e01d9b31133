"""The public surface keeps working: every name in `latentdiff.__all__`, every import the README, docs, examples and
benchmarks show, every module path they name, and the parameters of every public callable and method.

tests/data/public_api.json is the reference, written by tools/snapshot_public_api.py on the commit before the
house issue moved modules (931a0ed). A parameter may be added (with a default); none may go, change kind or default.
"""
from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import pytest

import latentdiff

REFERENCE = json.loads((Path(__file__).parent / "data" / "public_api.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", latentdiff.__all__)
def test_every_name_in_all_imports(name):
    assert getattr(latentdiff, name) is not None


@pytest.mark.parametrize("module,name", REFERENCE["imports"], ids=lambda v: str(v))
def test_documented_import_still_works(module, name):
    mod = importlib.import_module(module)
    found = hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}") is not None
    assert found, f"from {module} import {name}"


@pytest.mark.parametrize("module", REFERENCE["modules"])
def test_documented_module_path_still_imports(module):
    importlib.import_module(module)


def _resolve(path: str):
    head, _, attr = path.partition(".")
    obj = getattr(latentdiff, head)
    return getattr(obj, attr) if attr else obj


@pytest.mark.parametrize("path", sorted(REFERENCE["signatures"]))
def test_signature_kept(path):
    new = {p.name: p for p in inspect.signature(_resolve(path)).parameters.values()}
    old_names = [name for name, _, _ in REFERENCE["signatures"][path]]
    for name, kind, default in REFERENCE["signatures"][path]:
        assert name in new, f"{path}: parameter {name!r} is gone"
        p = new[name]
        assert p.kind.name == kind, f"{path}({name}): kind {p.kind.name}, was {kind}"
        now = repr(p.default) if p.default is not p.empty else None
        assert now == default, f"{path}({name}): default {now}, was {default}"
    positional = [n for n, p in new.items() if p.kind.name in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    old_positional = [n for n, kind, _ in REFERENCE["signatures"][path]
                      if kind in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    assert positional[: len(old_positional)] == old_positional, f"{path}: positional order changed"
    for name, p in new.items():
        if name not in old_names and p.kind.name not in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            assert p.default is not p.empty, f"{path}: new parameter {name!r} needs a default"


def test_the_reference_is_not_empty():
    assert len(REFERENCE["imports"]) > 40 and len(REFERENCE["modules"]) > 20 and len(REFERENCE["signatures"]) > 200


def test_all_is_the_lazy_table():
    assert sorted(latentdiff.__all__) == sorted([*latentdiff._LAZY, "__version__"])
