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
from tests._support import load_script

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


# ---- tools/snapshot_public_api.py: writes the reference only when asked to ----------------------------------------
def load_snapshot_tool():
    return load_script("tools/snapshot_public_api.py", "snapshot_public_api")


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--no-such-flag"], ["extra"]])
def test_the_snapshot_tool_writes_nothing_on_help_or_a_bad_flag(argv, tmp_path, monkeypatch, capsys):
    """`--help` prints the usage and an unknown argument is refused (it once rewrote the reference on either)."""
    tool = load_snapshot_tool()
    reference = tmp_path / "public_api.json"
    reference.write_text('{"imports": [], "modules": [], "signatures": {}}\n', encoding="utf-8")
    monkeypatch.setattr(tool, "SNAPSHOT", reference)
    monkeypatch.setattr(tool, "snapshot", lambda: pytest.fail("the surface was computed"))
    with pytest.raises(SystemExit) as exit_:
        tool.main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == (0 if argv[0] in ("--help", "-h") else 2)
    assert "usage: " in (out if exit_.value.code == 0 else err) and "--check" in out + err
    assert reference.read_text(encoding="utf-8") == '{"imports": [], "modules": [], "signatures": {}}\n'


def test_the_snapshot_tool_check_compares_without_writing(tmp_path, monkeypatch, capsys):
    """--check: exit 0 on the same surface, 1 listing what is gone, added or changed; the file is never written."""
    tool = load_snapshot_tool()
    surface = {"imports": [["latentdiff", "A"], ["latentdiff", "B"]], "modules": ["latentdiff.x"],
               "signatures": {"f": [["a", "POSITIONAL_OR_KEYWORD", None]], "g": [["b", "KEYWORD_ONLY", "1"]]}}
    monkeypatch.setattr(tool, "snapshot", lambda: surface)
    same, other = tmp_path / "same.json", tmp_path / "other.json"
    assert tool.main(["--output", str(same)]) == 0                     # the default action: write the snapshot
    assert json.loads(same.read_text(encoding="utf-8")) == surface
    stored = {"imports": [["latentdiff", "A"], ["latentdiff", "Gone"]], "modules": ["latentdiff.x"],
              "signatures": {"f": [["a", "POSITIONAL_OR_KEYWORD", None]], "g": [["b", "KEYWORD_ONLY", "2"]]}}
    other.write_text(json.dumps(stored), encoding="utf-8")
    written = {path: path.read_bytes() for path in (same, other)}
    capsys.readouterr()
    assert tool.main(["--check", "--output", str(same)]) == 0
    assert "0 gone, 0 added, 0 changed" in capsys.readouterr().out
    assert tool.main(["--check", "--output", str(other)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:-1] == ['- imports: ["latentdiff", "Gone"]', '+ imports: ["latentdiff", "B"]',
                        "~ signatures: g: b ['KEYWORD_ONLY', '2'] -> ['KEYWORD_ONLY', '1']"]
    assert out[-1].endswith("1 gone, 1 added, 1 changed since the snapshot")
    assert tool.main(["--check", "--output", str(tmp_path / "missing.json")]) == 1
    assert {path: path.read_bytes() for path in (same, other)} == written and not (tmp_path / "missing.json").exists()


@pytest.mark.slow
def test_the_snapshot_tool_reads_this_tree(tmp_path):
    """The real surface, written and checked against itself; it holds all of the reference (nothing is gone)."""
    tool = load_snapshot_tool()
    target = tmp_path / "public_api.json"
    assert tool.main(["--output", str(target)]) == 0
    data = json.loads(target.read_text(encoding="utf-8"))
    assert {tuple(i) for i in REFERENCE["imports"]} <= {tuple(i) for i in data["imports"]}
    assert set(REFERENCE["modules"]) <= set(data["modules"])
    assert tool.main(["--check", "--output", str(target)]) == 0
