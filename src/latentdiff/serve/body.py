"""Body: a request's JSON object read key by key, each value checked for its type and range, a bad one a
`RequestError` (422) naming the key (with the prefix of a nested object: `override_settings.sd_vae`,
`alwayson_scripts.controlnet.args[0].weight`); the keys read are remembered so the rest can be listed as ignored."""
from __future__ import annotations

import math
from typing import Any

from .requests import RequestError

MAX_NAME_CHARS = 1024


class Body:
    """The request JSON, read key by key: every getter checks type and range, naming the key; the keys read are
    remembered so the rest can be listed as ignored."""

    def __init__(self, data: Any, *, prefix: str = ""):
        if not isinstance(data, dict):
            raise RequestError("the request body must be a JSON object", field=prefix or "body",
                               expected="{...}", found=type(data).__name__)
        self.data, self.prefix, self.read = data, prefix, set[str]()

    def raw(self, key: str) -> Any:
        self.read.add(key)
        return self.data.get(key)

    def field(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def bad(self, key: str, expected: str, value: Any, message: str | None = None) -> RequestError:
        return RequestError(message or f"bad value for {self.field(key)}", field=self.field(key), expected=expected,
                            found=show(value))

    def integer(self, key: str, default: Any, low: int, high: int) -> Any:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)      # 20.0 is 20, as A1111's API models read it
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.bad(key, f"an integer in [{low}, {high}]", value)
        return value

    def number(self, key: str, default: Any, low: float, high: float) -> Any:
        value = self.raw(key)
        if value is None:
            return default
        # the range test also refuses NaN and infinities, and compares a huge int without making it a float
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise self.bad(key, f"a finite number in [{low:g}, {high:g}]", value)
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise self.bad(key, "true or false (or 0 / 1)", value)

    def text(self, key: str, default: str | None, limit: int = MAX_NAME_CHARS) -> Any:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, str) or len(value) > limit or "\x00" in value:
            raise self.bad(key, f"a string of at most {limit} characters, without NUL", value)
        return value

    def ignored(self, accepted: frozenset[str]) -> list[str]:
        return sorted(self.field(k) for k in self.data if k not in accepted)


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
