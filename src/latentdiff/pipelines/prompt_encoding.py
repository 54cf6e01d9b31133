"""A1111's prompt syntax on a text encoder: weighted, chunked encoding, and conditioning that changes per step.

    cond = encode_weighted(text_encoder, [parse_attention("a (castle:1.3), " * 40)])   # (1, 77 * 3, D)

Encoding ("Original" emphasis, A1111's FrozenCLIPEmbedderWithCustomWords): the pieces are tokenized without
special tokens and cut into 75-token chunks (`prompt_syntax.chunk_tokens`: comma backtrack, BREAK); each chunk
is BOS + tokens + EOS + padding (the tokenizer's pad token: EOS for SD 1.x's CLIP, "!" for SD 2.x's, so a
prompt of one chunk is exactly the tokenizer's row), encoded on its own (with clip_skip), its hidden states
multiplied by the tokens' weights and rescaled to the chunk's original mean; chunks are concatenated on the
token axis (77 * k tokens). Prompts of fewer chunks than others in the batch, and a prompt or negative prompt
of fewer chunks than the other, are padded with the encoding of the empty prompt's chunk (A1111's
pad_cond_uncond).

Prompt editing, alternation and AND change the conditioning per step: `PromptSchedule` holds the encoded
conditioning of every step range and gives the sampler a guided `denoise(x_t, t)` that picks it; the step is
counted by the step callback, so multi-evaluation samplers (Heun, DPM-2) see one conditioning per step.
"""
from __future__ import annotations

import bisect
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..diffusion.guidance import combine_guidance
from ..diffusion.samplers.base import StepCounting
from ..errors import InputError, describe
from ..limits import MAX_PROMPT_CHUNKS
from ..models.text_encoder import TextEncoder
from ..prompt_syntax import BREAK_WEIGHT, CHUNK_TOKENS, Pieces, SubPrompt, chunk_tokens, conditioning_plan, has_syntax

SYNTAXES = ("a1111", "plain")
Encoded = torch.Tensor   # (B, 77 * k, D)


def check_prompt_syntax(value: Any) -> str:
    """`value` if it names a prompt syntax, else an InputError naming prompt_syntax."""
    if value not in SYNTAXES:
        raise InputError("unknown prompt syntax", where="prompt_syntax", expected=" or ".join(map(repr, SYNTAXES)),
                         found=describe(value) if not isinstance(value, str) else repr(value))
    return str(value)


def chunks_supported(text_encoder: Any) -> bool:
    """Whether the encoder reads A1111's chunks: a CLIP-like TextEncoder (BOS and EOS tokens, 77 positions)."""
    tokenizer = getattr(text_encoder, "tokenizer", None)
    return (type(text_encoder) is TextEncoder and getattr(tokenizer, "bos_token_id", None) is not None
            and getattr(tokenizer, "eos_token_id", None) is not None and text_encoder.max_length == CHUNK_TOKENS + 2)


def _special(tokenizer: Any) -> tuple[int, int, int, int | None]:
    bos, eos = int(tokenizer.bos_token_id), int(tokenizer.eos_token_id)
    pad = getattr(tokenizer, "pad_token_id", None)
    comma = _ids(tokenizer, [","], bos, eos)[0]
    return bos, eos, eos if pad is None else int(pad), comma[0] if len(comma) == 1 else None


def _ids(tokenizer: Any, texts: list[str], bos: int, eos: int) -> list[list[int]]:
    """Token ids of each text without BOS / EOS, never truncated."""
    out = []
    for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]:
        ids = list(ids)
        if ids and ids[0] == bos:
            ids = ids[1:]
        if ids and ids[-1] == eos:
            ids = ids[:-1]
        out.append(ids)
    return out


def _embedding_units(text_encoder: TextEncoder, bos: int, eos: int) -> dict[int, list[int]]:
    """{first id: ids} of each multi-vector textual-inversion embedding (`tok tok_1 ...`): kept in one chunk."""
    expansions = getattr(text_encoder, "token_expansions", None) or {}
    texts = list(expansions.values())
    return {ids[0]: ids for ids in _ids(text_encoder.tokenizer, texts, bos, eos) if len(ids) > 1} if texts else {}


def token_chunks(text_encoder: TextEncoder, pieces: Pieces) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted pieces -> (ids (k, 77) int64, weights (k, 77), attention mask (k, 77)): each chunk BOS + tokens +
    EOS + padding, the special tokens and padding of weight 1."""
    bos, eos, pad, comma = _special(text_encoder.tokenizer)
    texts = [text for text, weight in pieces if weight != BREAK_WEIGHT]
    texts = text_encoder.expand_tokens(texts) if texts else texts   # multi-vector embeddings: tok -> tok tok_1 ...
    tokens = iter(_ids(text_encoder.tokenizer, texts, bos, eos)) if texts else iter(())
    tokenized = [([], weight) if weight == BREAK_WEIGHT else (next(tokens), weight) for _, weight in pieces]
    chunks = chunk_tokens(tokenized, comma_id=comma, atomic=_embedding_units(text_encoder, bos, eos))
    if len(chunks) > MAX_PROMPT_CHUNKS:
        raise InputError("the prompt is longer than the chunks one prompt may have", where="prompt",
                         expected=f"at most {MAX_PROMPT_CHUNKS} chunks of 75 tokens (limits.MAX_PROMPT_CHUNKS)",
                         found=f"{len(chunks)} chunks ({sum(len(c[0]) for c in chunks)} tokens)")
    rows, weights, masks = [], [], []
    for ids, mults in chunks:
        fill = CHUNK_TOKENS - len(ids)
        rows.append([bos, *ids, eos] + [pad] * fill)
        weights.append([1.0, *mults, 1.0] + [1.0] * fill)
        masks.append([1] * (len(ids) + 2) + [0] * fill)
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(weights), torch.tensor(masks, dtype=torch.int64)


def encode_chunk(text_encoder: TextEncoder, ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, *,
                 clip_skip: int | None = None) -> torch.Tensor:
    """One chunk per row (B, 77) -> (B, 77, D): encoded, weighted, each row rescaled to its original mean."""
    attention = mask if text_encoder._use_mask else None
    z = text_encoder.encode_ids(ids, attention_mask=attention, clip_skip=clip_skip) if clip_skip else \
        text_encoder.encode_ids(ids, attention_mask=attention)
    return weighted(z, weights)


def weighted(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Encoded chunks z (B, 77, D) with their tokens' weights (B, 77): each token's state multiplied by its weight,
    each row rescaled to its original mean (A1111's "Original" emphasis); all weights 1: z itself."""
    if bool((weights == 1).all()):
        return z
    w = weights.to(device=z.device, dtype=z.dtype)[..., None]
    original = z.mean(dim=(1, 2), keepdim=True)
    z = z * w
    return z * (original / z.mean(dim=(1, 2), keepdim=True))


def encode_weighted(text_encoder: TextEncoder, prompts: Sequence[Pieces], *, clip_skip: int | None = None,
                    chunks: int | None = None) -> Encoded:
    """B prompts' weighted pieces -> (B, 77 * k, D), k the most chunks of any (at least `chunks`); shorter
    prompts padded with the empty prompt's chunk."""
    cut = [token_chunks(text_encoder, pieces) for pieces in prompts]
    empty = token_chunks(text_encoder, [("", 1.0)])
    k = max([len(c[0]) for c in cut] + [chunks or 1])
    encoded = []
    for i in range(k):
        parts = [tuple((c[j][i] if i < len(c[0]) else empty[j][0]) for j in range(3)) for c in cut]
        ids, weights, mask = (torch.stack([p[j] for p in parts]) for j in range(3))
        encoded.append(encode_chunk(text_encoder, ids, weights, mask, clip_skip=clip_skip))
    return torch.cat(encoded, dim=1)


def pad_chunks(embeddings: torch.Tensor, chunks: int, empty: torch.Tensor) -> torch.Tensor:
    """(B, 77 * j, D) -> (B, 77 * chunks, D), the missing chunks the empty prompt's encoding `empty` (1, 77, D)."""
    missing = chunks - embeddings.shape[1] // empty.shape[1]
    if missing <= 0:
        return embeddings
    fill = empty.to(embeddings.dtype).expand(embeddings.shape[0], -1, -1).repeat(1, missing, 1)
    return torch.cat([embeddings, fill], dim=1)


def empty_chunk(text_encoder: TextEncoder, *, clip_skip: int | None = None) -> torch.Tensor:
    """The empty prompt's one chunk, encoded: (1, 77, D)."""
    return encode_weighted(text_encoder, [[("", 1.0)]], clip_skip=clip_skip)


# ---- a whole prompt ---------------------------------------------------------------------------------------
def plans(prompts: Sequence[str], steps: int, *, composable: bool) -> list[list[SubPrompt]]:
    return [conditioning_plan(p, steps, composable=composable) for p in prompts]


def is_static(plan: Sequence[SubPrompt]) -> bool:
    """One sub-prompt of weight 1 whose text never changes: one conditioning for every step."""
    return len(plan) == 1 and plan[0].weight == 1.0 and len(plan[0].schedule) == 1


def encode_a1111(text_encoder: Any, prompts: Sequence[str], *, clip_skip: int | None = None,
                 composable: bool = True) -> Encoded:
    """Prompts whose conditioning is the same at every step -> (B, 77 * k, D); an InputError for AND, prompt
    editing or alternation (they change per step: `PromptSchedule`). A text encoder that does not read chunks
    (LDMBert) encodes syntax-free prompts as they are (escapes read), and any other as "plain" with a warning."""
    if not chunks_supported(text_encoder):
        return _plain_only(text_encoder, prompts, clip_skip)
    static = plans(prompts, 1, composable=composable)
    for prompt, plan in zip(prompts, static, strict=True):
        if not is_static(plan) or len(plans([prompt], 2, composable=composable)[0][0].schedule) > 1:
            raise per_step_error(prompt)
    return encode_weighted(text_encoder, [list(plan[0].schedule[0][1]) for plan in static], clip_skip=clip_skip)


def per_step_error(prompt: str) -> InputError:
    return InputError("AND, [from:to:when] and [a|b] change the conditioning per step: encode_prompt cannot return "
                      "one tensor for them", where="prompt", expected="a prompt without them here (the pipeline's "
                      "__call__ runs them), or prompt_syntax='plain'", found=repr(prompt[:80]))


def _plain_only(text_encoder: Any, prompts: Sequence[str], clip_skip: int | None) -> Encoded:
    """A1111's syntax on an encoder without chunks: prompts whose only syntax is escapes, read; else the prompts
    as written ("plain"), with a warning naming the first."""
    texts = []
    for prompt in prompts:
        plan = conditioning_plan(prompt, 2, composable=False)
        pieces = plan[0].schedule[0][1]
        if len(plan[0].schedule) > 1 or len(pieces) != 1 or pieces[0][1] != 1.0:
            warnings.warn(f"{type(text_encoder).__name__} does not read A1111's weights, BREAK or per-step syntax: "
                          f"prompt {prompt[:60]!r} encoded as written (prompt_syntax='plain' says so, silently)",
                          UserWarning, stacklevel=4)
            texts = list(prompts)
            break
        texts.append(pieces[0][0])
    return text_encoder(texts, clip_skip=clip_skip) if clip_skip else text_encoder(texts)


def needs_schedule(prompts: Sequence[str] | None, steps: int, *, composable: bool) -> bool:
    """Whether any prompt has AND (when composable), prompt editing or alternation at `steps` steps."""
    return prompts is not None and any(has_syntax(p) and not is_static(plan)
                                       for p, plan in zip(prompts, plans(prompts, steps, composable=composable),
                                                          strict=True))


# ---- conditioning per step -----------------------------------------------------------------------------
@dataclasses.dataclass
class PromptSchedule(StepCounting):
    """The conditioning of every step range: `ends` (last 1-based step of each range), and per range the
    sub-prompt contexts `conds[r][j]` (B, L, D) with weights `weights[j]` (B,), and the negative `unconds[r]`."""

    ends: list[int]
    conds: list[list[torch.Tensor]]
    weights: list[torch.Tensor]
    unconds: list[torch.Tensor | None]
    step: int = 0          # the sampler step (0-based) the next denoise call belongs to
    # the UNet's added conditioning of each range's sub-prompts and negative, as conds / unconds (SDXL's
    # {"text_embeds": pooled, "time_ids": ...}, `encode` of build_schedule); None: the UNet takes none
    added_conds: list[list[dict[str, torch.Tensor]]] | None = None
    added_unconds: list[dict[str, torch.Tensor] | None] | None = None

    def range_of(self, step: int) -> int:
        return min(bisect.bisect_left(self.ends, step + 1), len(self.ends) - 1)

    def at(self, step: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        r = self.range_of(step)
        return self.conds[r], self.unconds[r]

    def added(self, r: int, j: int, *, guided: bool) -> dict[str, Any]:
        """The model keywords of range r, sub-prompt j: {"added_cond": ...} ([uncond; cond] rows when guided)."""
        if self.added_conds is None:
            return {}
        cond = self.added_conds[r][j]
        uncond = self.added_unconds[r] if self.added_unconds is not None else None
        if not guided or uncond is None:
            return {"added_cond": cond}
        return {"added_cond": {k: torch.cat([uncond[k], cond[k]]) for k in cond}}

    def first(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        conds, uncond = self.at(0)
        return conds[0], uncond

    def denoiser(self, model: Callable[..., torch.Tensor], *, guidance_scale: float,
                 guidance_rescale: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A guided denoise(x_t, t) with this step's conditioning: uncond + s * sum_j w_j (cond_j - uncond)
        (composable diffusion, Liu et al. 2022), then the optional rescale; without an uncond, the
        conditional model of the one sub-prompt."""
        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            r = self.range_of(self.step)
            conds, uncond = self.conds[r], self.unconds[r]
            if uncond is None:
                return model(x_t, t, context=conds[0], **self.added(r, 0, guided=False))
            tt = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim == 1 else t
            pred_uncond: torch.Tensor | None = None
            composed = torch.zeros(())
            for j, (cond, weight) in enumerate(zip(conds, self.weights, strict=True)):
                pred_u, pred_c = model(torch.cat([x_t, x_t]), tt, context=torch.cat([uncond, cond]),
                                       **self.added(r, j, guided=True)).chunk(2)
                if pred_uncond is None:
                    pred_uncond, composed = pred_u, pred_u
                w = weight.to(device=pred_c.device, dtype=pred_c.dtype).view(-1, *([1] * (pred_c.ndim - 1)))
                composed = composed + w * (pred_c - pred_uncond)
            assert pred_uncond is not None
            return combine_guidance(pred_uncond, composed, guidance_scale, guidance_rescale=guidance_rescale)

        return denoise


Encoder = Callable[[list[list[tuple[str, float]]]], tuple[torch.Tensor, "dict[str, torch.Tensor] | None"]]


def build_schedule(text_encoder: TextEncoder | None, prompts: Sequence[str], negatives: Sequence[str] | None, *,
                   steps: int, num_images_per_prompt: int = 1, clip_skip: int | None = None,
                   dtype: torch.dtype | None = None, guidance: bool = True,
                   negative_embeds: torch.Tensor | None = None, encode_pieces: Encoder | None = None,
                   empty: torch.Tensor | None = None) -> PromptSchedule:
    """Encode every step range of the prompts (AND sub-prompts, edits, alternation) and of the negative prompts
    (edits and alternation; AND is text there, as in A1111; `negative_embeds` (B, L, D) instead: the same at
    every step; "" when neither), all padded to one chunk count. guidance=False: no negative (AND refused).
    encode_pieces, empty: a pipeline's own encoding of B prompts' weighted pieces -> (context, its added
    conditioning per row or None) and its empty chunk (1, 77, D) (SDXL's two encoders), in place of
    `encode_weighted` on `text_encoder`."""
    if encode_pieces is None and not chunks_supported(text_encoder):
        raise InputError(f"{type(text_encoder).__name__} does not read A1111's per-step syntax", where="prompt",
                         expected="a prompt without AND, [from:to:when] or [a|b], or prompt_syntax='plain'",
                         found=repr(prompts[0][:80]))
    positive = plans(prompts, steps, composable=True)
    if guidance and negatives is None and negative_embeds is None:
        negatives = [""] * len(prompts)
    negative = plans(negatives, steps, composable=False) if guidance and negative_embeds is None \
        and negatives is not None else None
    if not guidance and any(len(plan) > 1 for plan in positive):
        raise InputError("AND (composable diffusion) needs classifier-free guidance", where="guidance_scale",
                         expected="> 1 with AND in the prompt", found="guidance off")
    ends = sorted({last for plan in positive + (negative or []) for sub in plan for last, _ in sub.schedule})
    count = max(len(plan) for plan in positive)
    weights = [torch.tensor([plan[j].weight if j < len(plan) else 0.0 for plan in positive])
               .repeat_interleave(num_images_per_prompt) for j in range(count)]
    cache: dict[tuple, tuple[torch.Tensor, dict[str, torch.Tensor] | None]] = {}
    def weighted_only(batch: list[list[tuple[str, float]]]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        assert text_encoder is not None   # checked above: chunks_supported
        return encode_weighted(text_encoder, batch, clip_skip=clip_skip), None

    own = encode_pieces if encode_pieces is not None else weighted_only

    def encode(batch: list[tuple[tuple[str, float], ...]]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        key = tuple(batch)   # each text once ([a|b] repeats)
        if key not in cache:
            cache[key] = own([list(pieces) for pieces in batch])
        return cache[key]

    raw = []
    for end in ends:
        conds = [encode([plan[min(j, len(plan) - 1)].pieces_at(end) for plan in positive]) for j in range(count)]
        uncond = (negative_embeds, None) if negative is None else \
            encode([plan[0].pieces_at(end) for plan in negative])
        raw.append((conds, uncond if guidance else None))
    encoded = [c for conds, _ in raw for c, _ in conds]
    encoded += [u[0] for _, u in raw if u is not None and u[0] is not None]
    chunks = max(t.shape[1] for t in encoded)
    if empty is None:
        assert text_encoder is not None
        empty = empty_chunk(text_encoder, clip_skip=clip_skip)
    pad = empty

    def ready(t: torch.Tensor) -> torch.Tensor:
        t = pad_chunks(t, chunks // pad.shape[1], pad).repeat_interleave(num_images_per_prompt, dim=0)
        return t if dtype is None else t.to(dtype)

    def ready_added(added: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        rows = {k: v.repeat_interleave(num_images_per_prompt, dim=0) for k, v in (added or {}).items()}
        return rows if dtype is None else {k: v.to(dtype) for k, v in rows.items()}

    schedule = PromptSchedule(ends=ends, conds=[[ready(c) for c, _ in conds] for conds, _ in raw], weights=weights,
                              unconds=[None if u is None or u[0] is None else ready(u[0]) for _, u in raw])
    if encode_pieces is not None:
        schedule.added_conds = [[ready_added(a) for _, a in conds] for conds, _ in raw]
        schedule.added_unconds = [None if u is None else ready_added(u[1]) for _, u in raw]
    return schedule


def encode_for_call(pipe: Any, prompt: str | Sequence[str] | None, negative_prompt: str | Sequence[str] | None, *,
                    steps: int, num_images_per_prompt: int, guidance: bool, prompt_embeds: torch.Tensor | None,
                    negative_prompt_embeds: torch.Tensor | None, clip_skip: int | None,
                    prompt_syntax: str) -> tuple[torch.Tensor, torch.Tensor | None, PromptSchedule | None]:
    """A pipeline call's conditioning: (cond, uncond, None) from `pipe.encode_prompt` when it is the same at
    every step, else (the first step's cond, uncond, the PromptSchedule the denoiser follows)."""
    check_prompt_syntax(prompt_syntax)
    prompts = None if prompt is None or prompt_embeds is not None else \
        ([prompt] if isinstance(prompt, str) else list(prompt))
    negatives = None if negative_prompt is None or negative_prompt_embeds is not None else \
        ([negative_prompt] * len(prompts or [0]) if isinstance(negative_prompt, str) else list(negative_prompt))
    scheduled = prompt_syntax == "a1111" and prompts is not None and chunks_supported(pipe.text_encoder) and (
        needs_schedule(prompts, steps, composable=True)
        or (guidance and needs_schedule(negatives, steps, composable=False)))
    if not scheduled:
        cond, uncond = pipe.encode_prompt(prompt, negative_prompt, num_images_per_prompt=num_images_per_prompt,
                                          guidance=guidance, prompt_embeds=prompt_embeds,
                                          negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
                                          prompt_syntax=prompt_syntax)
        return cond, uncond, None
    assert prompts is not None
    if clip_skip is not None:
        pipe.text_encoder.check_clip_skip(clip_skip)
    schedule = build_schedule(pipe.text_encoder, prompts, negatives, steps=steps,
                              num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip,
                              dtype=pipe.unet.dtype, guidance=guidance, negative_embeds=negative_prompt_embeds)
    cond, uncond = schedule.first()
    return cond, uncond, schedule



def same_chunks(text_encoder: Any, cond: torch.Tensor, uncond: torch.Tensor, *,
                clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cond and uncond (B, 77 * k, D) of different chunk counts: the shorter padded with the empty prompt's chunk
    (A1111's pad_cond_uncond); of the same length, or not in 77-token chunks, as they are."""
    if cond.shape[1] == uncond.shape[1] or not chunks_supported(text_encoder):
        return cond, uncond
    empty = empty_chunk(text_encoder, clip_skip=clip_skip)
    if cond.shape[1] % empty.shape[1] or uncond.shape[1] % empty.shape[1]:
        return cond, uncond
    chunks = max(cond.shape[1], uncond.shape[1]) // empty.shape[1]
    return pad_chunks(cond, chunks, empty), pad_chunks(uncond, chunks, empty)
