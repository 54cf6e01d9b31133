"""A small engine that renames the tensors of a foreign checkpoint through declarative tables.

A table is a tuple of rules; each key of a state dict goes through the FIRST rule that matches it.
Rules are written with key *templates*: literal text plus named placeholders,

    {name}          one dotted segment            ([^.]+)
    {name*}         any text, dots included       (.+)
    {name:a|b}      one of the given alternatives (a regular expression, without dots)

and a placeholder captured on one side is written out on the other. Because both sides of a rule
are templates over the same placeholders, a rule reads both ways: `invert(table)` gives the table
for the opposite direction, so one piece of data drives original -> diffusers and diffusers -> original.

    Rename(src, dst)                 one tensor, new name
    Reshape(src, dst, ndim=(4, 2))   new name, and trailing singleton dims dropped / added
                                     (a 1x1 conv (C, C, 1, 1) <-> a linear (C, C))
    Split(src, into=(q, k, v))       one fused tensor -> equal chunks along `dim`; `heads > 1`: the
                                     per-head interleaved layout [h0: q k v, h1: q k v, ...]
    Merge(srcs, into)                the inverse of Split
    Nest(src_prefix, dst_prefix, table)   a prefix, the rest of the key mapped by a sub-table
    Drop(src, keep=True)             deliberately not converted; kept=True tensors are handed back
                                     (as `dropped`) so a file can be rebuilt bit for bit
    Keep(src)                        the same name on both sides

`apply_keymap` raises a CheckpointError listing every key no rule matched; nothing is dropped silently.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import torch

from ..errors import CheckpointError

_PLACEHOLDER = re.compile(r"\{(\w+)(\*)?(?::([^{}]*))?\}")
MAX_LISTED = 8  # an error lists the first few keys and a count (a wrong file can have thousands)


def _compiled() -> Any:
    """A rule's compiled templates, set by its __post_init__: not an argument, and not part of its identity."""
    return dataclasses.field(init=False, repr=False, compare=False)


class Template:
    """A key pattern with named placeholders; `match` reads a key, `format` writes one."""

    def __init__(self, text: str, *, prefix: bool = False, constraints: Mapping[str, str] | None = None):
        self.text = text
        self.names: list[str] = []
        own: dict[str, str] = {}
        parts, pos = [], 0
        for m in _PLACEHOLDER.finditer(text):
            name, star, regex = m.group(1), m.group(2), m.group(3)
            if name in self.names:
                raise ValueError(f"placeholder {{{name}}} appears twice in template {text!r}")
            self.names.append(name)
            if regex is not None:
                own[name] = regex
            elif star:
                own[name] = ".+"
            parts.append(re.escape(text[pos:m.start()]))
            parts.append(f"(?P<{name}>{{{name}}})")
            pos = m.end()
        parts.append(re.escape(text[pos:]))
        self.constraints = {**(constraints or {}), **own}
        pattern = "".join(parts)
        for name in self.names:  # constraints may come from the other side of the rule
            pattern = pattern.replace(f"{{{name}}}", self.constraints.get(name, r"[^.]+"), 1)
        self._regex = re.compile(pattern)
        self._prefix = prefix
        self._format = _PLACEHOLDER.sub(lambda m: "{" + m.group(1) + "}", text)

    def match(self, key: str) -> re.Match | None:
        return self._regex.match(key) if self._prefix else self._regex.fullmatch(key)

    def format(self, values: Mapping[str, str]) -> str:
        return self._format.format(**values)

    def __repr__(self) -> str:
        return repr(self.text)


def _pair(src: str, dst: str | Sequence[str], *, prefix: bool = False) -> tuple[Template, list[Template]]:
    """Compile the two sides of a rule; both must use the same placeholders (so the rule can be inverted)."""
    dsts = [dst] if isinstance(dst, str) else list(dst)
    src_t = Template(src, prefix=prefix)
    dst_ts = [Template(d, prefix=prefix, constraints=src_t.constraints) for d in dsts]
    src_t = Template(src, prefix=prefix, constraints=dst_ts[0].constraints)  # constraints written on either side
    for d in dst_ts:
        if sorted(d.names) != sorted(src_t.names):
            raise ValueError(f"rule {src!r} -> {d.text!r}: both sides need the same placeholders")
    return src_t, dst_ts


def to_ndim(value: torch.Tensor, ndim: int, *, key: str) -> torch.Tensor:
    """Drop or add trailing singleton dimensions: (C, C, 1, 1) <-> (C, C)."""
    if value.ndim == ndim:
        return value
    if value.ndim > ndim:
        if any(s != 1 for s in value.shape[ndim:]):
            raise CheckpointError("cannot reshape: the trailing dimensions are not 1 (not a 1x1 convolution)",
                                  where=key, expected=f"{ndim}-D, or trailing size-1 dims", found=tuple(value.shape))
        return value.reshape(value.shape[:ndim])
    return value.reshape(*value.shape, *([1] * (ndim - value.ndim)))


# ---- rules ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rename:
    src: str
    dst: str
    _s: Template = _compiled()
    _d: Template = _compiled()

    def __post_init__(self):
        s, (d,) = _pair(self.src, self.dst)
        object.__setattr__(self, "_s", s)
        object.__setattr__(self, "_d", d)

    def sources(self) -> list[Template]:
        return [self._s]

    def outputs(self, values: dict[str, str]) -> list[str]:
        return [self._d.format(values)]

    def transform(self, key: str, value: torch.Tensor) -> list[torch.Tensor]:
        return [value]

    def inverse(self) -> Rename:
        return Rename(self.dst, self.src)


def Keep(src: str) -> Rename:
    """The same name on both sides (listed anyway, so that unknown keys are still caught)."""
    return Rename(src, src)


@dataclasses.dataclass(frozen=True)
class Reshape(Rename):
    ndim: tuple[int, int] = (4, 2)  # (source ndim, destination ndim)

    def transform(self, key: str, value: torch.Tensor) -> list[torch.Tensor]:
        return [to_ndim(value, self.ndim[1], key=key)]

    def inverse(self) -> Reshape:
        return Reshape(self.dst, self.src, ndim=(self.ndim[1], self.ndim[0]))


@dataclasses.dataclass(frozen=True)
class Split:
    src: str
    into: tuple[str, ...]
    dim: int = 0
    heads: int = 1  # > 1: chunks interleaved per head along dim 0 (LDM's legacy QKV attention)
    ndim: tuple[int, int] | None = None  # (source ndim, destination ndim) of each piece
    _s: Template = _compiled()
    _d: list[Template] = _compiled()

    def __post_init__(self):
        object.__setattr__(self, "into", tuple(self.into))
        s, ds = _pair(self.src, self.into)
        object.__setattr__(self, "_s", s)
        object.__setattr__(self, "_d", ds)
        if self.heads > 1 and self.dim != 0:
            raise ValueError("per-head interleaved split is along dim 0 only")

    def sources(self) -> list[Template]:
        return [self._s]

    def outputs(self, values: dict[str, str]) -> list[str]:
        return [d.format(values) for d in self._d]

    def transform(self, key: str, value: torch.Tensor) -> list[torch.Tensor]:
        n = len(self.into)
        size = value.shape[self.dim] if value.ndim > self.dim else 0
        if size % (n * self.heads):
            raise CheckpointError(f"cannot split into {n} x {self.heads} head(s)", where=key,
                                  expected=f"dim {self.dim} divisible by {n * self.heads}", found=tuple(value.shape))
        if self.heads > 1:
            grouped = value.reshape(self.heads, n, size // (n * self.heads), *value.shape[1:])
            pieces = [grouped[:, i].reshape(size // n, *value.shape[1:]) for i in range(n)]
        else:
            pieces = list(value.chunk(n, dim=self.dim))
        return [to_ndim(p, self.ndim[1], key=key) for p in pieces] if self.ndim else pieces

    def inverse(self) -> Merge:
        return Merge(self.into, self.src, dim=self.dim, heads=self.heads,
                     ndim=(self.ndim[1], self.ndim[0]) if self.ndim else None)


@dataclasses.dataclass(frozen=True)
class Merge:
    srcs: tuple[str, ...]
    into: str
    dim: int = 0
    heads: int = 1
    ndim: tuple[int, int] | None = None  # (ndim of each piece, ndim of the merged tensor)
    _s: list[Template] = _compiled()
    _d: Template = _compiled()

    def __post_init__(self):
        object.__setattr__(self, "srcs", tuple(self.srcs))
        d, ss = _pair(self.into, self.srcs)
        object.__setattr__(self, "_s", ss)
        object.__setattr__(self, "_d", d)

    def sources(self) -> list[Template]:
        return self._s

    def outputs(self, values: dict[str, str]) -> list[str]:
        return [self._d.format(values)]

    def combine(self, key: str, pieces: list[torch.Tensor]) -> torch.Tensor:
        if len({p.dtype for p in pieces}) > 1 or len({p.shape for p in pieces}) > 1:
            raise CheckpointError("cannot merge tensors of different shapes or dtypes", where=key,
                                  found=[(tuple(p.shape), str(p.dtype)) for p in pieces])
        if self.heads > 1:
            size = pieces[0].shape[0]
            grouped = [p.reshape(self.heads, size // self.heads, *p.shape[1:]) for p in pieces]
            merged = torch.stack(grouped, dim=1).reshape(size * len(pieces), *pieces[0].shape[1:])
        else:
            merged = torch.cat(pieces, dim=self.dim)
        return to_ndim(merged, self.ndim[1], key=key) if self.ndim else merged

    def inverse(self) -> Split:
        return Split(self.into, self.srcs, dim=self.dim, heads=self.heads,
                     ndim=(self.ndim[1], self.ndim[0]) if self.ndim else None)


@dataclasses.dataclass(frozen=True)
class Drop:
    src: str
    keep: bool = True  # hand the tensor back in `dropped` (for a bit-exact rebuild); False: discard it
    _s: Template = _compiled()

    def __post_init__(self):
        object.__setattr__(self, "_s", Template(self.src))

    def sources(self) -> list[Template]:
        return [self._s]

    def inverse(self) -> None:
        return None  # dropped tensors come back verbatim from `dropped`, not through a rule


@dataclasses.dataclass(frozen=True)
class Nest:
    src: str
    dst: str
    table: tuple[Rule, ...]
    _s: Template = _compiled()
    _d: Template = _compiled()

    def __post_init__(self):
        object.__setattr__(self, "table", tuple(self.table))
        s, (d,) = _pair(self.src, self.dst, prefix=True)
        object.__setattr__(self, "_s", s)
        object.__setattr__(self, "_d", d)

    def inverse(self) -> Nest:
        return Nest(self.dst, self.src, invert(self.table))


Rule: TypeAlias = Rename | Split | Merge | Drop | Nest


def invert(table: Iterable[Rule]) -> tuple[Rule, ...]:
    """The table for the opposite direction (Drops have no inverse: kept tensors return verbatim)."""
    return tuple(r for r in (rule.inverse() for rule in table) if r is not None)


# ---- the engine -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Hit:
    rule: Rename | Split | Merge | Drop  # a rule of the innermost table (a Nest only adds `prefix`)
    values: dict[str, str]
    index: int  # which source of a Merge
    prefix: str = ""

    def outputs(self) -> list[str]:
        return [self.prefix + k for k in self.rule.outputs(self.values)] if not isinstance(self.rule, Drop) else []


def resolve(table: Sequence[Rule], key: str) -> _Hit | None:
    """The first rule of `table` that matches `key` (through nested tables), or None."""
    for rule in table:
        if isinstance(rule, Nest):
            m = rule._s.match(key)
            if m is None:
                continue
            hit = resolve(rule.table, key[m.end():])
            if hit is None:
                continue  # the prefix fits but the rest does not: a later rule may still take it
            if not isinstance(hit.rule, Drop):
                hit.prefix = rule._d.format(m.groupdict()) + hit.prefix
            return hit
        for i, template in enumerate(rule.sources()):
            m = template.match(key)
            if m is not None:
                return _Hit(rule, m.groupdict(), i)
    return None


def apply_keymap(state: Mapping[str, torch.Tensor], table: Sequence[Rule], *, source: str,
                 dropped: dict[str, torch.Tensor] | None = None,
                 origins: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Rename every tensor of `state` through `table`; tensors are not copied (dtype and bits preserved).

    Raises a CheckpointError listing every key that no rule matched, every key two tensors were mapped
    to, and every fused tensor that lacks a piece. Tensors matched by `Drop(keep=True)` go to `dropped`.
    `origins` (when given) gets each new key's name in `state` (a fused tensor: its first piece's), so that a
    later error can name the key as it is in the file.
    """
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    collisions: list[str] = []
    merges: dict[str, tuple[Merge, dict[int, torch.Tensor], str]] = {}
    names: dict[str, str] = origins if origins is not None else {}

    def put(key: str, value: torch.Tensor, src: str) -> None:
        if key in out:
            collisions.append(key)
        out[key] = value
        names[key] = src

    for key, value in state.items():
        hit = resolve(table, key)
        if hit is None:
            unmatched.append(key)
        elif isinstance(hit.rule, Drop):
            if hit.rule.keep and dropped is not None:
                dropped[key] = value
        elif isinstance(hit.rule, Merge):
            (target,) = hit.outputs()
            rule, pieces, _ = merges.setdefault(target, (hit.rule, {}, key))
            if hit.index in pieces:
                collisions.append(target)
            pieces[hit.index] = value
        else:
            for new_key, new_value in zip(hit.outputs(), hit.rule.transform(key, value), strict=True):
                put(new_key, new_value, key)
    incomplete = []
    for target, (rule, pieces, first) in merges.items():
        if len(pieces) != len(rule.srcs):
            incomplete.append(f"{target} (has {len(pieces)} of {len(rule.srcs)} pieces, e.g. {first})")
        else:
            put(target, rule.combine(target, [pieces[i] for i in range(len(rule.srcs))]), first)
    if unmatched:
        raise CheckpointError(f"{len(unmatched)} key(s) fit no conversion rule (unknown layout, or a part "
                              "latentdiff does not convert)", where=source, found=_listing(unmatched))
    if collisions or incomplete:
        raise CheckpointError("conversion produced clashing or incomplete tensors", where=source,
                              found=_listing(sorted(set(collisions)) + incomplete))
    return out


def _listing(keys: Sequence[str]) -> list[str]:
    keys = list(keys)
    return keys if len(keys) <= MAX_LISTED else keys[:MAX_LISTED] + [f"... and {len(keys) - MAX_LISTED} more"]


def prefixed(prefix: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `state` under `prefix`, with the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix)}
