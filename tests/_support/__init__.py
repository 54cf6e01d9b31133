"""Plain helper modules the tests share (not test modules: nothing here is collected).

Test modules import from here, never from one another: `from tests._support.parity import assert_parity`.
The fixtures built on these helpers live in tests/conftest.py.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]  # the repository root


def load_script(relative: str, name: str) -> ModuleType:
    """A script of the repository that is not a package module (tools/, examples/), imported from its file as
    `name`."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
