"""The layout of tests/ itself: it mirrors src/latentdiff/, every folder is a package (so that two test files in
different folders may share a basename: pytest imports them as tests.<folder>.<name>), and test modules import
shared code from tests/_support/, never from one another."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src" / "latentdiff"
NOT_MIRRORS = {"_support", "adversarial"}  # plain helpers, no tests; the hardening suite (across all layers)


def folders() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*") if p.is_dir() and p.name != "__pycache__")


def test_every_folder_is_a_package():
    missing = [str(p.relative_to(TESTS)) for p in [TESTS, *folders()] if not (p / "__init__.py").exists()]
    assert not missing, f"add an __init__.py to: {missing}"


def test_folders_mirror_the_source_packages():
    top = [p.name for p in folders() if p.parent == TESTS and p.name not in NOT_MIRRORS]
    strays = [name for name in top if not (SRC / name / "__init__.py").exists()]
    assert not strays, f"tests/ folders with no src/latentdiff/ package of that name: {strays}"


def test_no_test_module_imports_another():
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = node.module.split(".") + [alias.name for alias in node.names]
                if node.level or any(n.startswith("test_") for n in names):
                    offenders.append(f"{path.relative_to(TESTS)}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(".test_" in alias.name for alias in node.names):
                offenders.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert not offenders, f"import shared code from tests._support (absolute imports) instead: {offenders}"
