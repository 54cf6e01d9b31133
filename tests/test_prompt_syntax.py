"""A1111's prompt syntax as text (latentdiff.prompt_syntax): the parser's outputs on A1111's own documented
examples (the doctests of its prompt_parser.py and the wiki's "Features" page), written here as data with the
results A1111 documents, and the 75-token chunker."""
from __future__ import annotations

import pytest

from latentdiff import InputError
from latentdiff.prompt_syntax import (
    BREAK,
    BREAK_WEIGHT,
    chunk_tokens,
    conditioning_plan,
    has_syntax,
    parse_attention,
    prompt_schedule,
    split_and,
)

# parse_prompt_attention's doctests (A1111 modules/prompt_parser.py), results as documented there.
ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]

# get_learned_conditioning_prompt_schedules' doctests at 10 steps (A1111 prompt_parser.py), as documented.
SCHEDULES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
]


@pytest.mark.parametrize(("prompt", "expected"), ATTENTION)
def test_attention_on_a1111_examples(prompt, expected):
    assert parse_attention(prompt) == expected


@pytest.mark.parametrize(("prompt", "expected"), SCHEDULES)
def test_schedules_on_a1111_examples(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_wiki_examples():
    """The wiki's "Features" examples: (word:1.5), [word] /1.1, prompt editing by fraction, BREAK, AND weights."""
    assert parse_attention("a (word:1.5) [word]") == [("a ", 1.0), ("word", 1.5), (" ", 1.0), ("word", 1 / 1.1)]
    assert prompt_schedule("a [fantasy:cyberpunk:16] landscape", 100) == [
        (16, "a fantasy landscape"), (100, "a cyberpunk landscape")]
    assert prompt_schedule("fantasy landscape with a [mountain:lake:0.25]", 100) == [
        (25, "fantasy landscape with a mountain"), (100, "fantasy landscape with a lake")]
    assert prompt_schedule("[cow|horse] in a field", 3) == [(1, "cow in a field"), (2, "horse in a field"),
                                                            (3, "cow in a field")]
    assert parse_attention("a cat BREAK a dog") == [("a cat", 1.0), (BREAK, BREAK_WEIGHT), ("a dog", 1.0)]
    assert split_and("a cat :1.2 AND a dog AND a moonshine :0.4") == [
        ("a cat", 1.2), (" a dog", 1.0), (" a moonshine", 0.4)]


def test_plan_combines_and_schedule_and_weights():
    plan = conditioning_plan("a (castle:1.3) [day:night:0.5] AND a dragon :0.7", 20)
    assert [sub.weight for sub in plan] == [1.0, 0.7]
    assert plan[0].pieces_at(10) == (("a ", 1.0), ("castle", 1.3), (" day", 1.0))
    assert plan[0].pieces_at(11) == (("a ", 1.0), ("castle", 1.3), (" night", 1.0))
    assert plan[1].pieces_at(1) == ((" a dragon", 1.0),)
    # a negative prompt is not composable: AND is a word there, as in A1111
    assert len(conditioning_plan("a AND b", 5, composable=False)) == 1


def test_tags_and_plain_text_pass_through():
    """<lora:...> tags and embedding tokens are plain text to the parser; stray closers are text."""
    assert parse_attention("<lora:detail:0.7> easynegative, cat") == [("<lora:detail:0.7> easynegative, cat", 1.0)]
    assert parse_attention("a) b] c:") == [("a) b] c:", 1.0)]
    assert prompt_schedule("a | b", 4) == [(4, "a | b")]      # a stray | : the whole prompt, as written
    assert not has_syntax("a photo of a cat")
    assert has_syntax("a (cat)") and has_syntax("a AND b") and has_syntax("a BREAK b")


def test_bad_weight_is_a_clear_error():
    with pytest.raises(InputError, match="prompt") as caught:
        parse_attention("a (cat:1.2.3)")
    assert "1.2.3" in str(caught.value)


# ---- the chunker ---------------------------------------------------------------------------------------------
COMMA = 9


def test_chunks_of_75():
    chunks = chunk_tokens([(list(range(100, 250)), 1.0)], comma_id=COMMA)
    assert [len(ids) for ids, _ in chunks] == [75, 75]
    assert chunk_tokens([(list(range(100, 176)), 1.0)], comma_id=COMMA)[1][0] == [175]
    assert chunk_tokens([], comma_id=COMMA) == [([], [])]


def test_comma_backtrack():
    """A chunk that fills within 20 tokens after its last comma breaks after the comma."""
    ids = [1] * 60 + [COMMA] + [2] * 30
    first, second = chunk_tokens([(ids, 1.2)], comma_id=COMMA)
    assert first[0] == [1] * 60 + [COMMA] and second[0] == [2] * 30 and second[1] == [1.2] * 30
    far = [1] * 50 + [COMMA] + [2] * 40         # 24 tokens after the comma: no backtrack
    assert [len(c[0]) for c in chunk_tokens([(far, 1.0)], comma_id=COMMA)] == [75, 16]


def test_break_starts_a_chunk():
    chunks = chunk_tokens([([1, 2], 1.0), ([], BREAK_WEIGHT), ([3], 1.5)], comma_id=COMMA)
    assert chunks == [([1, 2], [1.0, 1.0]), ([3], [1.5])]
    assert chunk_tokens([([], BREAK_WEIGHT), ([3], 1.0)], comma_id=COMMA)[0] == ([], [])


def test_a_multi_vector_embedding_is_never_split_across_chunks():
    # A1111 moves an embedding that does not fit into the next chunk (the chunk before it ends short)
    filler = list(range(100, 173))                       # 73 tokens, no comma
    embedding = [900, 901, 902]                          # tok tok_1 tok_2
    chunks = chunk_tokens([(filler + embedding + [5], 1.0)], comma_id=None, atomic={900: embedding})
    assert [len(ids) for ids, _ in chunks] == [73, 4]
    assert chunks[1][0] == embedding + [5]
    # without the embedding table the ids are cut at 75, as plain tokens
    plain = chunk_tokens([(filler + embedding + [5], 1.0)], comma_id=None)
    assert [len(ids) for ids, _ in plain] == [75, 2]
    # an embedding that fits stays where it is; its weight is the piece's
    fits = chunk_tokens([(filler[:10], 1.0), (embedding, 1.2)], comma_id=None, atomic={900: embedding})
    assert fits == [(filler[:10] + embedding, [1.0] * 10 + [1.2] * 3)]
