"""Typed, frozen, strict configs.

A config is data: a frozen dataclass whose fields are checked on construction. Reading one
from a dict is strict: an unknown key or a value of the wrong type is a ConfigError that
names it, because a setting that changes the model must never be silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from . import limits
from .errors import ConfigError, describe

C = TypeVar("C", bound="ComponentConfig")


@dataclasses.dataclass(frozen=True)
class ComponentConfig:
    """Base of every component config. Subclasses add typed fields with defaults."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(getattr(self, f.name), hints[f.name])
            if not _matches(value, hints[f.name]):
                raise ConfigError(f"config field {f.name!r} of {type(self).__name__} has the wrong type",
                                  where=f.name, expected=_type_name(hints[f.name]), found=repr(value))
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Check relations between fields; subclasses raise ConfigError naming the field."""

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], *, source: str | None = None) -> C:
        """Build from a dict; unknown keys are an error (metadata keys starting with '_' aside)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names and not k.startswith("_"))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in {cls.__name__}", where=source,
                              expected=f"keys among {sorted(names)}", found=unknown)
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in data
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"missing key(s) {missing} in {cls.__name__}", where=source, expected=missing,
                              found=sorted(data))
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_file(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(read_json(path), source=str(path))


def is_int(value: Any) -> bool:
    """An integer that is not a bool (`True` is an `int` to Python, never a count or a size to us)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object, with an error naming the file when it is not one."""
    try:
        data = parse_json(Path(path).read_text(), where=str(path))
    except FileNotFoundError:
        raise ConfigError("config file not found", where=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file is not valid JSON ({e})", where=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("config file does not hold a JSON object", where=str(path),
                          expected="object", found=describe(data))
    return data


def parse_json(text: str | bytes, *, where: str) -> Any:
    """json.loads, with nesting bounded by limits.MAX_CONFIG_DEPTH: a config nested 100,000 deep is a ConfigError
    naming the file, never a RecursionError. (json.JSONDecodeError passes through for the caller to word.)"""
    try:
        data = json.loads(text)
    except RecursionError:
        raise _too_deep(where, "more than the parser's recursion limit") from None
    check_depth(data, where=where)
    return data


def parse_yaml(text: str, *, where: str) -> Any:
    """yaml.safe_load with the same bound on nesting as `parse_json` (yaml.YAMLError passes through)."""
    import yaml  # pyyaml

    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise _too_deep(where, "more than the parser's recursion limit") from None
    check_depth(data, where=where)
    return data


def check_depth(data: Any, *, where: str) -> None:
    """Refuse lists / dicts nested deeper than limits.MAX_CONFIG_DEPTH (walked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limits.MAX_CONFIG_DEPTH:
                raise _too_deep(where, f"more than {limits.MAX_CONFIG_DEPTH} levels")
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))


def _too_deep(where: str, found: str) -> ConfigError:
    return ConfigError("the config is nested too deeply", where=where,
                       expected=f"at most {limits.MAX_CONFIG_DEPTH} levels of lists / objects "
                                "(limits.MAX_CONFIG_DEPTH)",
                       found=found)

def yaml_problem(error: BaseException) -> str:
    """A pyyaml error as one line with its position ("line 3, column 7: mapping values are not allowed here");
    pyyaml's own text spans several lines and quotes the source. (Duck-typed: this module imports no yaml.)"""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or getattr(error, "context", None) or \
        " ".join(str(error).split()) or type(error).__name__
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# YAML 1.1 (PyYAML) reads these words as booleans: `mixed_precision: no` arrives as False.
YAML_BOOL_WORDS: dict[bool, tuple[str, ...]] = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _coerce(value: Any, hint: Any) -> Any:
    """JSON has lists where configs have tuples; turn lists into tuples where a tuple is expected. A bool where
    only string choices are allowed is the YAML word it was read from ("no" -> False): back to that choice."""
    if isinstance(value, list) and _allows_tuple(hint):
        return tuple(_coerce(v, _tuple_item(hint)) for v in value)
    if isinstance(value, bool) and not any(h is bool for h in _options(hint)):
        choices = [c for h in _options(hint) if typing.get_origin(h) is typing.Literal for c in typing.get_args(h)]
        words = [c for c in choices if isinstance(c, str) and c.lower() in YAML_BOOL_WORDS[value]]
        if len(words) == 1:
            return words[0]
    return value


def _options(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _allows_tuple(hint: Any) -> bool:
    return any(typing.get_origin(h) is tuple or h is tuple for h in _options(hint))


def _tuple_item(hint: Any) -> Any:
    for h in _options(hint):
        if typing.get_origin(h) is tuple:
            args = typing.get_args(h)
            return args[0] if args else Any
    return Any


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    for h in _options(hint):
        if h is type(None) and value is None:
            return True
        origin = typing.get_origin(h)
        if origin is tuple:
            args = typing.get_args(h)
            if isinstance(value, tuple):
                if len(args) == 2 and args[1] is Ellipsis:
                    if all(_matches(v, args[0]) for v in value):
                        return True
                elif len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args, strict=True)):
                    return True
            continue
        if origin is typing.Literal:
            if value in typing.get_args(h):
                return True
            continue
        if h is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if h is int and isinstance(value, bool):
            continue
        if isinstance(h, type) and isinstance(value, h):
            return True
    return False


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "")
