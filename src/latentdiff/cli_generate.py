"""Moved: `latentdiff generate` is `latentdiff.cli.generate` (with `cli.generate_settings` and
`cli.generate_model`), and `UsageError` is `latentdiff.errors.UsageError`. This module re-exports the names
imported from here before the move."""
from __future__ import annotations

from .cli.generate import add_generate_parser, cmd_generate
from .cli.generate_settings import DTYPES
from .diffusion.samplers import switch_sampler
from .errors import UsageError

__all__ = ["DTYPES", "UsageError", "add_generate_parser", "cmd_generate", "switch_sampler"]
