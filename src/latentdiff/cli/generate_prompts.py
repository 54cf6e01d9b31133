"""`latentdiff generate --prompt-syntax a1111|plain` (issue 16): how the prompt's text is read.

    latentdiff generate "a (castle:1.3) at [dawn:dusk:0.5], detailed AND a dragon :0.6"
    latentdiff generate "a (literal) bracket" --prompt-syntax plain

"a1111" (the library's default) reads AUTOMATIC1111's syntax: weights, BREAK, prompts past 75 tokens, AND,
[from:to:when], [a|b] (docs/prompts.md); "plain" gives the text as it is, as diffusers does. The PNG records the
flag when given, and `--from` reads it back; a PNG without it (A1111's own included) runs with "a1111", or with
"plain" on a model whose text encoder does not read A1111's weights (LDMBert: the built-in model).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..errors import UsageError
from .generate_settings import FLAGS, GenerateSettings

PROMPT_SYNTAXES = ("a1111", "plain")   # pipelines.prompt_encoding.SYNTAXES (not imported: no torch here)
DEFAULT_PROMPT_SYNTAX = "a1111"


def add_prompt_flags(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--prompt-syntax", default=None, metavar="NAME",
                     help="a1111 (default: weights, BREAK, long prompts, AND, [from:to:when], [a|b]) or plain "
                          "(the text as it is, as diffusers)")


def settle_prompts(args: argparse.Namespace, settings: GenerateSettings) -> GenerateSettings:
    """The prompt syntax checked, naming the flag or the --from PNG it came from."""
    value = settings.prompt_syntax
    if value is not None and value not in PROMPT_SYNTAXES:
        where = FLAGS["prompt_syntax"] if getattr(args, "prompt_syntax", None) is not None \
            else f"{getattr(args, 'from_png', None) or 'the model settings'}: prompt_syntax"
        raise UsageError("bad value for prompt_syntax", where=where, expected=f"one of {list(PROMPT_SYNTAXES)}",
                         found=repr(value))
    return dataclasses.replace(settings, prompt_syntax=value)


def prompt_options(settings: GenerateSettings, pipe: Any) -> dict[str, Any]:
    """The pipeline keyword of the settings: prompt_syntax=. Not given: "a1111", or "plain" for a text encoder
    that does not read A1111's weights (LDMBert: the built-in model), so prompts written for A1111 (an A1111 PNG's
    through --from) still run there, their brackets as text, as before."""
    if settings.prompt_syntax is not None:
        return {"prompt_syntax": settings.prompt_syntax}
    from ..pipelines.prompt_encoding import chunks_supported

    encoder = pipe.text_encoder if getattr(pipe, "text_encoder", None) is not None else pipe.text_encoder_2   # SDXL's
    return {"prompt_syntax": DEFAULT_PROMPT_SYNTAX if chunks_supported(encoder) else "plain"}
