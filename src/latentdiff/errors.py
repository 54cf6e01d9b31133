"""Exceptions users catch.

Every latentdiff error says *what* went wrong, *where* (file, key, argument),
what was *expected* and what was *found*, so a message alone is enough to act on.
"""
from __future__ import annotations

from typing import Any


class LatentDiffError(Exception):
    """Base class of every error latentdiff raises on purpose."""

    def __init__(self, message: str, *, where: Any = None, expected: Any = None, found: Any = None):
        self.message, self.where, self.expected, self.found = message, where, expected, found
        parts = [message]
        if where is not None:
            parts.append(f"where: {where}")
        if expected is not None:
            parts.append(f"expected: {expected}")
        if found is not None:
            parts.append(f"found: {found}")
        super().__init__("; ".join(parts))


class ConfigError(LatentDiffError, ValueError):
    """A configuration is missing a key, has an unknown key, or holds an unsupported value."""


class CheckpointError(LatentDiffError, ValueError):
    """A checkpoint file is missing, corrupt, or does not match the model it is loaded into."""


class RegistryError(LatentDiffError, LookupError):
    """A component, sampler or pipeline name is not registered."""


class InputError(LatentDiffError, ValueError):
    """An argument to a call (prompt, size, step count ...) is invalid."""


class UsageError(InputError):
    """A command-line argument (or a value `latentdiff generate` reads back) is invalid; `hint` is the line
    the command prints under the error."""

    def __init__(self, message: str, *, hint: str | None = None, **details: Any):
        super().__init__(message, **details)
        self.hint = hint
