"""Exceptions users catch.

Every latentdiff error says *what* went wrong, *where* (file, key, argument),
what was *expected* and what was *found*, so a message alone is enough to act on.
"""
from __future__ import annotations

from typing import Any


def describe(value: Any) -> str:
    """A value as an error message's `found` names it: a tensor's dtype and shape, a sequence's item types, else its
    type. (Duck-typed, so this module imports nothing heavy.)"""
    if hasattr(value, "dtype") and hasattr(value, "shape") and not isinstance(value, type):
        return f"a {value.dtype} {type(value).__name__} of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        if not value:
            return f"an empty {type(value).__name__}"
        items = ", ".join(type(v).__name__ for v in value[:5]) + (", ..." if len(value) > 5 else "")
        return f"a {type(value).__name__} of [{items}]"
    return type(value).__name__


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


class NumericalError(LatentDiffError, ArithmeticError):
    """A computation produced NaN or Inf (fp16 overflow, NaN weights or inputs): raised instead of returning a
    black or NaN image. `stage` and `step` say where it was caught; `hint` is the likely cause and the fix."""

    def __init__(self, message: str, *, stage: str | None = None, step: int | None = None,
                 hint: str | None = None, **details: Any):
        super().__init__(message, **details)
        self.stage, self.step, self.hint = stage, step, hint
