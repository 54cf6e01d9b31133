"""Plain helper modules the tests share (not test modules: nothing here is collected).

Test modules import from here, never from one another: `from tests._support.parity import assert_parity`.
The fixtures built on these helpers live in tests/conftest.py.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root
