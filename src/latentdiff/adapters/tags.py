"""`<lora:NAME:W>` and `<lora:NAME:W_unet:W_te>` tags in a prompt (A1111's extra-network syntax), as pure text.

    strip_tags("a castle <lora:detail:0.7>, golden") -> ("a castle , golden", [Tag("detail", 0.7, 0.7)])

A1111 removes the tag from the text the text encoder sees and activates the adapter for that generation; a weight
left out is 1; W_te left out is W_unet. A negative or non-numeric weight is an InputError naming the tag.
"""
from __future__ import annotations

import dataclasses
import re

from ..errors import InputError

TAG = re.compile(r"<lora:([^:<>]+)((?::[^:<>]*){0,2})>")


@dataclasses.dataclass(frozen=True)
class Tag:
    name: str
    unet: float
    text_encoder: float


def _weight(text: str, tag: str, *, argument: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError("a LoRA tag's weight is not a number", where=f"{argument}: {tag}",
                         expected="<lora:NAME:W> with W a number >= 0", found=text) from None
    if not value >= 0 or value == float("inf"):
        raise InputError("a LoRA tag's weight must be a finite number >= 0", where=f"{argument}: {tag}",
                         expected="a number >= 0", found=text)
    return value


def strip_tags(prompt: str, *, argument: str = "prompt") -> tuple[str, list[Tag]]:
    """The prompt without its `<lora:...>` tags, and the tags in order."""
    tags: list[Tag] = []

    def take(m: re.Match) -> str:
        name = m.group(1).strip()
        weights = [w.strip() for w in m.group(2).split(":")[1:]]
        unet = _weight(weights[0], m.group(0), argument=argument) if weights and weights[0] else 1.0
        te = _weight(weights[1], m.group(0), argument=argument) if len(weights) > 1 and weights[1] else unet
        tags.append(Tag(name, unet, te))
        return ""

    return TAG.sub(take, prompt), tags


def has_tags(prompt: object) -> bool:
    """Whether a prompt (a string or a list of strings) holds a `<lora:` tag: the cheap test before any work."""
    if isinstance(prompt, str):
        return "<lora:" in prompt
    return isinstance(prompt, (list, tuple)) and any(isinstance(p, str) and "<lora:" in p for p in prompt)


__all__ = ["Tag", "TAG", "strip_tags", "has_tags"]
