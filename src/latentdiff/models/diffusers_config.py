"""The one bridge between diffusers `config.json` files and latentdiff's typed model configs.

Every model with a diffusers twin declares a `DiffusersConfigMap` (the tables are in `diffusers_tables`):

    defaults    every __init__ argument of the diffusers class at its default (diffusers 0.42): a key a file
                omits takes this value; a key not listed here is a ConfigError
    renamed     diffusers key -> config field, where the names differ
    same        keys whose config field has the same name
    supported   keys with no field, because latentdiff implements only these values (a value, a tuple of
                values, or a predicate); written back at their default
    inert       keys read only by features `supported` rejects, so any value builds the same network:
                accepted and not kept; written back at their default
    structural  keys that `read` / `write` translate as a group (block types -> attention levels, per-level
                lists, ...); `read(values, source)` returns config fields, `write(config)` file keys

Each key of `defaults` is in exactly one of renamed, same, supported, inert, structural (checked when a table
is built, and against diffusers' signatures in the tests), so a new diffusers key is never silently dropped.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from ..config import C, ComponentConfig, is_int
from ..errors import ConfigError

ReadFields: TypeAlias = Callable[[Mapping[str, Any], "str | None"], dict[str, Any]]
WriteKeys: TypeAlias = Callable[[Any], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class DiffusersConfigMap:
    """How one diffusers model class's config.json maps to and from a latentdiff config (see the module doc)."""

    class_name: str
    defaults: Mapping[str, Any]
    same: tuple[str, ...] = ()
    renamed: Mapping[str, str] = dataclasses.field(default_factory=dict)
    supported: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    inert: tuple[str, ...] = ()
    structural: tuple[str, ...] = ()
    read: ReadFields | None = None
    write: WriteKeys | None = None

    def __post_init__(self) -> None:
        groups = [set(self.same), set(self.renamed), set(self.supported), set(self.inert), set(self.structural)]
        seen: set[str] = set()
        for group in groups:
            if group & seen:
                raise ValueError(f"{self.class_name} table lists {sorted(group & seen)} twice")
            seen |= group
        if seen != set(self.defaults):
            raise ValueError(f"{self.class_name} table: keys {sorted(seen ^ set(self.defaults))} are not accounted for")

    @property
    def mapped(self) -> tuple[str, ...]:
        """The keys kept in the typed config (directly, renamed or through read/write)."""
        return (*self.same, *self.renamed, *self.structural)

    # ---- file -> config ---------------------------------------------------------------------------------
    def fields(self, data: Mapping[str, Any], *, source: str | None = None) -> dict[str, Any]:
        """A config.json dict -> config fields, after checking its class name, that every key is an argument of
        the diffusers class, and that `supported` keys hold implemented values. Metadata keys ("_...") are
        skipped."""
        if data.get("_class_name", self.class_name) != self.class_name:
            raise ConfigError("config.json describes another model class", where=key_at(source, "_class_name"),
                              expected=self.class_name, found=data["_class_name"])
        unknown = sorted(k for k in data if not k.startswith("_") and k not in self.defaults)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in a diffusers {self.class_name} config", where=source,
                              expected=f"keys among {sorted(self.defaults)}", found=unknown)
        check_supported(data, self.supported, source=source)
        values = {**self.defaults, **{k: v for k, v in data.items() if not k.startswith("_")}}
        fields = {key: values[key] for key in self.same}
        fields.update({field: values[key] for key, field in self.renamed.items()})
        if self.read is not None:
            fields.update(self.read(values, source))
        return fields

    def to_config(self, data: Mapping[str, Any], config_class: type[C], *, source: str | None = None) -> C:
        """A config.json dict -> `config_class`, strictly; an invalid field is named as the file spells it."""
        fields = self.fields(data, source=source)
        try:
            return config_class.from_dict(fields, source=source)
        except ConfigError as e:
            key = {field: k for k, field in self.renamed.items()}.get(e.where, e.where)
            label = repr(key)
            if key in FILE_KEYS and key not in self.same:   # a structural key's field: name both
                label = f"{FILE_KEYS[key]!r} (field {key!r})"
            raise ConfigError(f"config key {label}: {e.message}", where=source, expected=e.expected,
                              found=e.found) from None

    # ---- config -> file ---------------------------------------------------------------------------------
    def to_file(self, config: ComponentConfig) -> dict[str, Any]:
        """The complete config.json dict (every __init__ argument of the diffusers class) for `config`."""
        fields = config.to_dict()
        out = {k: list(v) if isinstance(v, list) else v for k, v in self.defaults.items()}
        out.update({key: fields[key] for key in self.same})
        out.update({key: fields[field] for key, field in self.renamed.items()})
        if self.write is not None:
            out.update(self.write(config))
        return out


# A config field the structural keys fill, as a config.json spells it (an error names the file's key)
FILE_KEYS = {"channels": "block_out_channels", "layers_per_level": "layers_per_block",
             "transformer_depth": "transformer_layers_per_block", "attention_heads": "attention_head_dim",
             "attention_levels": "down_block_types"}


def check_supported(data: Mapping[str, Any], supported: Mapping[str, Any], *, source: str | None) -> None:
    """Raise a ConfigError for a foreign config key whose value changes the model in a way we don't implement.

    `supported` maps a key to the value(s) latentdiff implements (a tuple of allowed values, or a
    predicate). Keys absent from `data` take the foreign library's default and are fine.
    """
    for key, allowed in supported.items():
        if key not in data:
            continue
        value = data[key]
        ok = allowed(value) if callable(allowed) else value in (allowed if isinstance(allowed, tuple) else (allowed,))
        if not ok:
            expected = getattr(allowed, "__doc__", "a supported value") if callable(allowed) else allowed
            raise ConfigError(f"config key {key!r} has a value latentdiff does not support", where=source,
                              expected=expected, found=repr(value))


def key_at(source: str | None, key: str) -> str:
    """Where a config error is: `key in path/to/config.json`."""
    return f"{key} in {source}" if source else key


def as_list(d: Mapping[str, Any], key: str, source: str | None) -> list[Any]:
    """d[key] as a non-empty list, or a ConfigError naming the key."""
    if not isinstance(d[key], (list, tuple)) or not d[key]:
        raise ConfigError(f"{key} must be a non-empty list", where=key_at(source, key), expected="list",
                          found=repr(d[key]))
    return list(d[key])


def per_level(d: Mapping[str, Any], key: str, n: int, source: str | None) -> int | tuple[int, ...]:
    """One int for every level, or a list of one int per level (kept as given, so files round-trip)."""
    value = d[key]
    if is_int(value):
        return value
    if isinstance(value, (list, tuple)) and all(is_int(v) for v in value):
        if len(value) != n:
            raise ConfigError(f"{key} needs one entry per down block", where=key_at(source, key),
                              expected=f"{n} entries (len(down_block_types))", found=value)
        return tuple(value)
    raise ConfigError(f"{key} must be an int or one int per level", where=key_at(source, key),
                      expected=f"int or list of {n} ints", found=repr(value))


def square_sample_size(value: Any, source: str | None) -> int | None:
    """diffusers' sample_size, an int or an [h, w] pair: latentdiff's models take square ones."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError("only square sample sizes are supported", where=key_at(source, "sample_size"),
                              expected="int or [s, s]", found=value)
        return value[0]
    return value
