"""AUTOMATIC1111's prompt syntax, as text: weights, BREAK, AND, prompt editing and alternation (no tensors here).

    conditioning_plan("a (castle:1.3) [day:night:0.5] AND a dragon :0.7", steps=20)
    -> [SubPrompt(weight=1.0, schedule=[(10, [("a ", 1.0), ("castle", 1.3), (" day", 1.0)]),
                                        (20, [("a ", 1.0), ("castle", 1.3), (" night", 1.0)])]),
        SubPrompt(weight=0.7, schedule=[(20, [("a dragon", 1.0)])])]

The semantics are those of A1111's published algorithm (its wiki, "Features": attention/emphasis, prompt editing,
alternating words, composable diffusion, BREAK; its prompt_parser.py), written here from that description:

- `AND` (a whole word) splits the prompt into sub-prompts, each with an optional trailing `:weight` (default 1);
  the pipelines guide with each and sum the guided differences (composable diffusion).
- `[from:to:when]` uses `from` up to step `when` (1-based, inclusive) and `to` after; `when` < 1 is a fraction of
  the steps (int(when * steps)), else a step number. `[to:when]` adds text, `[from::when]` removes it.
  `[a|b|...]` alternates by step (step 1: a, step 2: b, ...). A prompt these rules cannot read as a whole (a
  stray `|` outside brackets, an unclosed `[` inside a construct) is used as it is, at every step, as A1111 does.
  Outside any construct, stray `[ ] ( ) :` are plain text.
- Emphasis: `(text)` x1.1, `[text]` /1.1, `(text:1.3)`, nesting multiplies; `\\(` `\\)` `\\[` `\\]` `\\\\` are
  literal characters; an unclosed `(` or `[` weighs everything after it (A1111's tolerance), a `)` or `]`
  closing nothing is plain text. `BREAK` (a whole word, upper case) starts a new 75-token chunk.
- `<lora:...>` tags and textual-inversion tokens are plain text here (`<`, `>` mean nothing).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

from .errors import InputError
from .limits import MAX_PROMPT_NESTING

ROUND = 1.1          # (text): attention x1.1
SQUARE = 1 / 1.1     # [text]: attention /1.1
BREAK = "BREAK"
BREAK_WEIGHT = -1.0  # the piece ("BREAK", -1.0) marks a chunk break, as A1111's parser writes it
SYNTAX_CHARS = frozenset("()[]\\:|")

Pieces = list[tuple[str, float]]

# Emphasis tokens: an escape, an opening bracket, a `:weight)` closing, a closing bracket, a run of plain text, `:`.
_ATTENTION = re.compile(r"\\[()\[\]\\]|\\|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"^([\s\S]*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*")


# ---- emphasis ------------------------------------------------------------------------------------------
def parse_attention(text: str) -> Pieces:
    """text -> [(text, weight), ...], runs of equal weight merged; BREAK as the piece ("BREAK", -1.0).

    >>> parse_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])       # an escaped character; a lone backslash is dropped
        elif token in "([" and len(open_round) + len(open_square) >= MAX_PROMPT_NESTING:
            raise InputError("the prompt's brackets are nested too deep", where="prompt",
                             expected=f"at most {MAX_PROMPT_NESTING} open at once (limits.MAX_PROMPT_NESTING; each "
                             "multiplies the attention by 1.1)", found=f"{MAX_PROMPT_NESTING + 1} open at character "
                             f"{match.start()} of {_short(text)}")
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale(open_round.pop(), _weight(weight, text))
        elif token == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:                                       # plain text (and brackets closing nothing)
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append([BREAK, BREAK_WEIGHT])
                pieces.append([part, 1.0])
    for start in open_round:                        # unclosed: weighs everything after it
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)
    bad = next((w for _, w in pieces if not math.isfinite(w)), None)
    if bad is not None:
        raise InputError("an attention weight overflows", where="prompt", expected="weights whose products are "
                         "finite", found=f"{bad} in {_short(text)}")
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(str(t), float(w)) for t, w in merged]


def _weight(value: str, prompt: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        raise InputError(f"an attention weight {value!r} is not a number", where="prompt",
                         expected="(text:1.3): a decimal number after the colon", found=_short(prompt)) from None
    if not math.isfinite(weight):
        raise InputError("an attention weight must be finite", where="prompt", expected="a finite number",
                         found=value)
    return weight


def _short(prompt: str) -> str:
    return repr(prompt[:80] + ("..." if len(prompt) > 80 else ""))


# ---- AND -------------------------------------------------------------------------------------------------
def split_and(text: str) -> list[tuple[str, float]]:
    """A prompt -> its AND sub-prompts [(text, weight)]; `text :0.7` at a sub-prompt's end is its weight."""
    parts = []
    for part in _AND.split(text):
        match = _AND_WEIGHT.match(part)
        assert match is not None                     # the pattern matches any string
        parts.append((match.group(1), float(match.group(2)) if match.group(2) else 1.0))
    return parts


# ---- prompt editing and alternation ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Edit:
    before: tuple       # nodes (None for [to:when]: nothing before)
    after: tuple
    when: float


@dataclasses.dataclass(frozen=True)
class _Alternate:
    options: tuple[tuple, ...]


class _NoParse(Exception):
    pass


def _parse_nodes(text: str, pos: int, stops: str, top: bool, depth: int = 0) -> tuple[list, int]:
    """Nodes (str | _Edit | _Alternate) from `pos` up to a character of `stops` (not consumed) or the end;
    brackets nested deeper than MAX_PROMPT_NESTING do not parse (the prompt is then used as written)."""
    if depth > MAX_PROMPT_NESTING:
        raise _NoParse
    nodes: list = []
    while pos < len(text):
        char = text[pos]
        if char in stops:
            break
        if char == "\\" and pos + 1 < len(text):
            nodes.append(text[pos:pos + 2])          # an escape stays as written (emphasis reads it later)
            pos += 2
        elif char in "([":
            try:
                node, pos = _parse_group(text, pos, depth + 1)
                nodes.extend(node if isinstance(node, list) else [node])
            except _NoParse:
                if not top:
                    raise
                nodes.append(char)                   # a stray bracket at the top level is text
                pos += 1
        elif char in ")]:" and top:
            nodes.append(char)
            pos += 1
        elif char in ")]:|":
            raise _NoParse
        else:
            end = pos
            while end < len(text) and text[end] not in "\\()[]:|" + stops:
                end += 1
            end = max(end, pos + 1)
            nodes.append(text[pos:end])
            pos = end
    return nodes, pos


def _parse_group(text: str, pos: int, depth: int) -> tuple[list | _Edit | _Alternate, int]:
    """A construct opening at text[pos] ("(" or "["): emphasis (kept as text), an edit or an alternation."""
    if text[pos] == "(":
        inner, end = _parse_nodes(text, pos + 1, "):", False, depth)
        if end < len(text) and text[end] == ":":
            weight, end = _parse_nodes(text, end + 1, ")", False, depth)
            inner = [*inner, ":", *weight]
        if end >= len(text) or text[end] != ")":
            raise _NoParse
        return ["(", *inner, ")"], end + 1
    segments, separators, end = [], [], pos + 1
    while True:
        segment, end = _parse_nodes(text, end, ":|]", False, depth)
        segments.append(segment)
        if end >= len(text):
            raise _NoParse
        if text[end] == "]":
            break
        separators.append(text[end])
        end += 1
    if not separators:
        return ["[", *segments[0], "]"], end + 1
    if set(separators) == {"|"}:
        return _Alternate(tuple(tuple(s) for s in segments)), end + 1
    last = "".join(segments[-1]) if all(isinstance(n, str) for n in segments[-1]) else None
    number = _NUMBER.fullmatch(last) if last is not None else None
    if set(separators) != {":"} or len(segments) not in (2, 3) or number is None:
        raise _NoParse
    before = tuple(segments[0]) if len(segments) == 3 else None
    after = tuple(segments[-2])
    return _Edit(before, after, float(number.group(1))), end + 1   # type: ignore[arg-type]


def _switch_steps(nodes: list | tuple, steps: int, found: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Edit):
            when = node.when * steps if node.when < 1 else node.when
            step = min(steps, int(when))
            if step >= 1:
                found.add(step)
            for part in (node.before or (), node.after):
                _switch_steps(part, steps, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _switch_steps(option, steps, found)


def _text_at(nodes: list | tuple, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, _Edit):
            when = min(steps, int(node.when * steps if node.when < 1 else node.when))
            out.append(_text_at(node.before or (), step, steps) if step <= when else _text_at(node.after, step, steps))
        elif isinstance(node, _Alternate):
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            out.append(node)
    return "".join(out)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """The prompt's text per step: [(last step, text), ...] in step order, the last entry's step = `steps`
    (A1111's get_learned_conditioning_prompt_schedules for one prompt). Steps count from 1.

    >>> prompt_schedule("a [b:c:0.5] d", 10)
    [(5, 'a b d'), (10, 'a c d')]
    """
    try:
        nodes, _ = _parse_nodes(text, 0, "", top=True)
    except _NoParse:
        return [(steps, text)]
    found = {steps}
    _switch_steps(nodes, steps, found)
    return [(step, _text_at(nodes, step, steps)) for step in sorted(found)]


# ---- all of it -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SubPrompt:
    """One AND sub-prompt: its weight and its weighted pieces per step range [(last step, pieces), ...]."""

    weight: float
    schedule: tuple[tuple[int, tuple[tuple[str, float], ...]], ...]

    def pieces_at(self, step: int) -> tuple[tuple[str, float], ...]:
        """The pieces used at `step` (1-based)."""
        for last, pieces in self.schedule:
            if step <= last:
                return pieces
        return self.schedule[-1][1]


def conditioning_plan(prompt: str, steps: int, *, composable: bool = True) -> list[SubPrompt]:
    """A prompt -> its sub-prompts (one unless `composable` and the prompt has AND), each with its weighted
    pieces per step. composable=False (negative prompts, as A1111): AND is plain text."""
    parts = split_and(prompt) if composable else [(prompt, 1.0)]
    return [SubPrompt(weight, tuple((last, tuple(parse_attention(text))) for last, text in prompt_schedule(sub, steps)))
            for sub, weight in parts]


def has_syntax(prompt: str) -> bool:
    """Whether the prompt holds anything the A1111 syntax reads (brackets, escapes, `:`, `|`, BREAK, AND)."""
    return bool(SYNTAX_CHARS.intersection(prompt)) or _AND.search(prompt) is not None \
        or _BREAK.search(prompt) is not None


# ---- the chunker ---------------------------------------------------------------------------------------
CHUNK_TOKENS = 75        # text tokens per chunk: CLIP's 77 positions less BOS and EOS
COMMA_BACKTRACK = 20     # a chunk full within this many tokens after its last comma breaks after the comma


def chunk_tokens(pieces: Sequence[tuple[Sequence[int], float]], *, comma_id: int | None,
                 chunk_tokens: int = CHUNK_TOKENS, backtrack: int = COMMA_BACKTRACK,
                 atomic: Mapping[int, Sequence[int]] | None = None,
                 ) -> list[tuple[list[int], list[float]]]:
    """Token ids of weighted pieces (a piece of weight BREAK_WEIGHT is a BREAK) -> chunks of at most
    `chunk_tokens` (ids, weights), without BOS / EOS / padding, as A1111 cuts them: a full chunk whose last comma
    is at most `backtrack` tokens back moves the tokens after that comma into the next chunk; BREAK ends the
    chunk; a comma that opens a chunk is not remembered as one. `atomic`: {first id: the ids of a multi-vector
    embedding}: such an embedding is never split, a chunk it does not fit in ends before it (A1111 moves it to the
    next chunk). At least one (maybe empty) chunk."""
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    atomic = atomic or {}

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for tokens, weight in pieces:
        if weight == BREAK_WEIGHT:
            close()
            continue
        tokens = [int(token) for token in tokens]
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma_id:
                last_comma = len(ids)
            elif len(ids) == chunk_tokens and last_comma != -1 and len(ids) - last_comma <= backtrack:
                cut = last_comma + 1
                moved = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = list(moved[0]), list(moved[1])
            if len(ids) == chunk_tokens:
                close()
            unit = list(atomic.get(token, ()))
            if len(unit) > 1 and tokens[position:position + len(unit)] == unit and len(unit) <= chunk_tokens:
                if len(ids) + len(unit) > chunk_tokens:
                    close()
                ids.extend(unit)
                weights.extend([float(weight)] * len(unit))
                position += len(unit)
                continue
            ids.append(token)
            weights.append(float(weight))
            position += 1
    if ids or not chunks:
        close()
    return chunks
