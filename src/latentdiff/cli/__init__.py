"""The `latentdiff` command line (console script `latentdiff = "latentdiff.cli:main"`, `python -m latentdiff`,
`python -m latentdiff.cli`): `main` parses and dispatches to one module per command. The library never
imports this package."""
from __future__ import annotations

from .main import build_parser, main

__all__ = ["build_parser", "main"]
