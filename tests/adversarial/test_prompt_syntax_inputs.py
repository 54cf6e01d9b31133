"""A1111 prompt syntax (issue 16) given careless or hostile prompts: unbalanced brackets are A1111's documented
tolerance (the result is right), a weight that is not a number or overflows, brackets nested past
limits.MAX_PROMPT_NESTING and a prompt past limits.MAX_PROMPT_CHUNKS chunks are InputErrors naming the prompt,
the bound and the value, refused before any encoding, within seconds and bounded memory."""
from __future__ import annotations

import time

import pytest

from latentdiff import InputError, limits
from latentdiff.prompt_syntax import parse_attention, prompt_schedule
from tests._support.bounded import run_bounded

SECONDS = 5
RSS_MB = 1500      # the subprocess: torch and the tiny CLIP


@pytest.mark.outcome("correct")
@pytest.mark.parametrize(("prompt", "expected"), [
    ("a (cat", [("a ", 1.0), ("cat", 1.1)]),              # unclosed: weighs everything after it
    ("a cat) dog]", [("a cat) dog]", 1.0)]),              # closing nothing: text
    ("a [b (c] d", [("a ", 1.0), ("b ", 1 / 1.1), ("c", 1.0), (" d", 1.1)]),
])
def test_unbalanced_brackets_are_tolerated_as_a1111(prompt, expected):
    assert parse_attention(prompt) == expected


@pytest.mark.outcome("correct")
@pytest.mark.parametrize("prompt", ["a [b:c:3", "[a|b", "x | y", "[a:b:c:d:1]",
                                    pytest.param("[" * 5000 + "a" + "]" * 5000, id="5000-deep")])
def test_unreadable_editing_syntax_is_used_as_written(prompt):
    start = time.monotonic()
    assert prompt_schedule(prompt, 10) == [(10, prompt)]
    assert time.monotonic() - start < SECONDS


@pytest.mark.outcome("clear_error", fails_as="crash")
@pytest.mark.parametrize(("prompt", "found"), [
    pytest.param("a (cat:1.2.3) b", "1.2.3", id="not-a-number"),
    pytest.param("(cat:" + "9" * 400 + ")", "finite", id="overflow"),
    pytest.param("(" * 10_000 + "cat", str(limits.MAX_PROMPT_NESTING + 1), id="10000-open")])
def test_bad_weights_and_deep_nesting_are_clear_errors(prompt, found):
    start = time.monotonic()
    with pytest.raises(InputError) as caught:
        parse_attention(prompt)
    message = str(caught.value)
    assert "prompt" in message and found in message
    assert time.monotonic() - start < SECONDS


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_a_prompt_past_the_chunk_bound_is_refused_before_encoding(tmp_path):
    done = run_bounded(f"""
        from tests._support.tiny_clip import make_tiny_clip
        from latentdiff.models.text_encoder import TextEncoder
        from latentdiff.pipelines.prompt_encoding import encode_a1111
        clip = make_tiny_clip({str(tmp_path / "clip")!r}, text_encoder_subfolder=".", tokenizer_subfolder=".")[0]
        encode_a1111(TextEncoder.from_pretrained(clip), ["a (cat:1.2), " * 20_000])
    """, timeout_s=120, address_space_gb=16)
    assert done.raised == "InputError" and done.is_latentdiff_error, done.message
    assert "prompt" in done.message and str(limits.MAX_PROMPT_CHUNKS) in done.message and "chunks" in done.message
    assert done.peak_rss_mb < RSS_MB, done.peak_rss_mb
