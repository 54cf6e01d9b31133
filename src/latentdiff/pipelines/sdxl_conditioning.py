"""What Stable Diffusion XL conditions its UNet on (Podell et al. 2023, sec. 2.1-2.3), from its two text encoders.

    context   (B, L, 768 + 1280)  CLIP ViT-L/14's and OpenCLIP ViT-bigG/14's penultimate hidden states (without the
                                  final layer norm), concatenated on the width; the refiner: bigG's alone (1280)
    pooled    (B, 1280)           bigG's end-of-text state through its final norm and text projection
    time_ids  (B, 6)              micro-conditioning: original size (h, w), crop top-left (y, x), target size (h, w);
                                  the refiner: original size, crop top-left and an aesthetic score (5)

pooled and the Fourier features of time_ids go into the time embedding (the UNet's `text_time` add embedding,
`added_cond={"text_embeds": pooled, "time_ids": time_ids}`); the context into cross-attention.

Prompt syntax: "plain" tokenizes each prompt as diffusers' StableDiffusionXLPipeline does (each tokenizer pads to
77 tokens: CLIP-L with its end token, bigG's with "!"); "a1111" reads A1111's weights, BREAK and long prompts for
both encoders as A1111 does for SDXL: the same 75-token chunks for both (their vocabularies are the same), each
encoder's chunk weighted and rescaled to its own mean, the pooled embedding the bigG's of the first chunk,
unweighted. An empty negative prompt (None in "plain", like diffusers; None or "" in "a1111", like A1111) is all
zeros where the model's folder says `force_zeros_for_empty_prompt` (the base; the refiner encodes "").
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..config import is_int, is_real
from ..errors import InputError, describe
from ..models.text_encoder import TextEncoder
from ..prompt_syntax import Pieces, conditioning_plan
from . import prompt_encoding
from .prompt_encoding import pad_chunks, per_step_error, token_chunks

# SDXL's choice of hidden states for both encoders: hidden_states[-2], no final norm (clip_skip counts from there).
SDXL_LAYER: dict[str, Any] = dict(layer="penultimate", apply_final_norm=False)
Pair = tuple[int, int]


# ---- micro-conditioning --------------------------------------------------------------------------------------
def check_pair(value: Any, *, name: str) -> Pair:
    """(a, b) of two non-negative integers (a size or a crop corner), else an InputError naming `name`."""
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(
            is_int(v) and not isinstance(v, bool) and int(v) >= 0 for v in value):
        raise InputError(f"{name} must be a pair of non-negative integers", where=name,
                         expected="(height, width)" if "size" in name else "(top, left)",
                         found=repr(value) if isinstance(value, (tuple, list, int, float, str)) else describe(value))
    return int(value[0]), int(value[1])


def check_score(value: Any, *, name: str) -> float:
    if not is_real(value) or isinstance(value, bool) or value != value or abs(float(value)) == float("inf"):
        raise InputError(f"{name} must be a finite number", where=name, expected="e.g. 6.0 (aesthetic, 0-10)",
                         found=repr(value) if isinstance(value, (int, float, str)) else describe(value))
    return float(value)


def time_ids(original_size: Pair, crops_coords_top_left: Pair, target_size: Pair, *,
             aesthetic_score: float | None = None) -> list[float]:
    """The micro-conditioning numbers of one sample: original size + crop + target size (base), or original size +
    crop + aesthetic score (refiner: aesthetic_score given)."""
    tail: tuple[float, ...] = tuple(target_size) if aesthetic_score is None else (aesthetic_score,)
    return [float(v) for v in (*original_size, *crops_coords_top_left, *tail)]


def added_cond(pooled: torch.Tensor, ids: Sequence[float], *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The UNet's `added_cond` for B samples: pooled (B, P), time_ids (B, n) (one row repeated, in the embeddings'
    dtype as diffusers casts them)."""
    row = torch.tensor([list(ids)], dtype=dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": row.repeat(pooled.shape[0], 1)}


def with_added_cond(unet: Callable[..., torch.Tensor], cond: dict[str, torch.Tensor],
                    uncond: dict[str, torch.Tensor] | None) -> Callable[..., torch.Tensor]:
    """unet(x, t, context=...) -> the same call with SDXL's `added_cond`: the conditional rows for a batch of B,
    [uncond; cond] for the doubled batch of classifier-free guidance (built once, not per step)."""
    doubled = None if uncond is None else {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    rows = cond["text_embeds"].shape[0]

    def model(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        extra = cond if x.shape[0] == rows or doubled is None else doubled
        return unet(x, t, added_cond=extra, **kwargs)

    return model


# ---- the text ---------------------------------------------------------------------------------------------------
def encoders(pipe: Any) -> list[TextEncoder]:
    """The pipeline's text encoders in SDXL's order: [CLIP-L, bigG], or [bigG] for the refiner."""
    return [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]


def encode_plain(pipe: Any, prompts: list[str], prompts_2: list[str], *,
                 clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' encoding: each prompt (prompt_2 for bigG when there are two encoders) tokenized to 77 tokens by
    its encoder's tokenizer -> (context (B, 77, D1 + D2), pooled (B, P))."""
    hidden, pooled = [], None
    texts = [prompts, prompts_2] if pipe.text_encoder is not None else [prompts]
    for encoder, batch in zip(encoders(pipe), texts, strict=True):
        ids = encoder.tokenize(batch)
        h, pooled = encoder.encode_with_pooled(ids, clip_skip=clip_skip, **SDXL_LAYER)
        hidden.append(h)
    assert pooled is not None
    return torch.cat(hidden, dim=-1), pooled


def static_pieces(prompts: Sequence[str]) -> list[Pieces]:
    """A1111's weighted pieces of each prompt; AND, [from:to:when] and [a|b] (which change per step) refused."""
    out = []
    for prompt in prompts:
        plan = conditioning_plan(prompt, 2, composable=True)
        if not prompt_encoding.is_static(plan):
            raise per_step_error(prompt)
        out.append(list(plan[0].schedule[0][1]))
    return out


def encode_a1111(pipe: Any, prompts: list[str], prompts_2: list[str], *,
                 clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111's encoding for SDXL of prompts whose conditioning is the same at every step -> (context (B, 77 k,
    D1 + D2), pooled (B, P)); `encode_pieces` on each prompt's weighted pieces (AND, [from:to:when] and [a|b]
    refused: `build_schedule` runs them)."""
    if prompts_2 == prompts or pipe.text_encoder is None:
        context, added = encode_pieces(pipe, static_pieces(prompts), clip_skip=clip_skip)
        return context, added["text_embeds"]
    context, added = encode_pieces(pipe, static_pieces(prompts), static_pieces(prompts_2), clip_skip=clip_skip)
    return context, added["text_embeds"]


def encode_pieces(pipe: Any, pieces: Sequence[Pieces], pieces_2: Sequence[Pieces] | None = None, *,
                  clip_skip: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """B prompts' weighted pieces (`pieces_2`: bigG's, default the same) -> (context (B, 77 k, D1 + D2),
    {"text_embeds": pooled (B, P)}): per encoder, the 75-token chunks (`prompt_encoding.token_chunks`: BREAK,
    comma backtrack, embeddings kept whole) each encoded at SDXL's layer, weighted and rescaled to its own mean;
    shorter prompts padded with the empty prompt's chunk; pooled: the bigG's output of each prompt's first chunk,
    unweighted (A1111)."""
    hidden, pooled = [], None
    texts = [pieces, pieces_2 if pieces_2 is not None else pieces] if pipe.text_encoder is not None else [pieces]
    for encoder, batch in zip(encoders(pipe), texts, strict=True):
        cut = [token_chunks(encoder, list(p)) for p in batch]
        empty = token_chunks(encoder, [("", 1.0)])
        chunks = []
        for i in range(max(len(c[0]) for c in cut)):
            ids, weights, _ = (torch.stack([c[j][i] if i < len(c[0]) else empty[j][0] for c in cut])
                               for j in range(3))
            z, p = encoder.encode_with_pooled(ids, clip_skip=clip_skip, **SDXL_LAYER)
            chunks.append(prompt_encoding.weighted(z, weights))
            pooled = p if i == 0 else pooled
        hidden.append(torch.cat(chunks, dim=1))
    assert pooled is not None
    return torch.cat(hidden, dim=-1), {"text_embeds": pooled}


def empty_chunk(pipe: Any, *, clip_skip: int | None) -> torch.Tensor:
    """The empty prompt's chunk in A1111's encoding, (1, 77, D1 + D2): what pads the shorter of cond / uncond."""
    return encode_a1111(pipe, [""], [""], clip_skip=clip_skip)[0]


def same_chunks(pipe: Any, cond: torch.Tensor, uncond: torch.Tensor, *,
                clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cond / uncond of different chunk counts, the shorter padded with the empty prompt's chunk (A1111)."""
    if cond.shape[1] == uncond.shape[1]:
        return cond, uncond
    empty = empty_chunk(pipe, clip_skip=clip_skip).to(cond.dtype)
    chunks = max(cond.shape[1], uncond.shape[1]) // empty.shape[1]
    return pad_chunks(cond, chunks, empty), pad_chunks(uncond, chunks, empty)


def is_empty(prompts: Sequence[str] | None) -> bool:
    return prompts is None or all(p == "" for p in prompts)



def build_schedule(pipe: Any, prompts: list[str], negatives: list[str] | None, *, steps: int,
                   num_images_per_prompt: int, clip_skip: int | None, guidance: bool, ids: Sequence[float],
                   negative_ids: Sequence[float]) -> prompt_encoding.PromptSchedule:
    """A1111's per-step syntax (AND, [from:to:when], [a|b]) for SDXL: `prompt_encoding.build_schedule` with both
    encoders (`encode_pieces`): each range's sub-prompts get their own context and pooled embedding (A1111's
    SDXL conditioning is one dict of both per sub-prompt), the time ids added to every one; an empty negative is
    zeros where the model says force_zeros_for_empty_prompt."""
    dtype = pipe.unet.dtype
    schedule = prompt_encoding.build_schedule(
        None, prompts, negatives, steps=steps, num_images_per_prompt=num_images_per_prompt, dtype=dtype,
        guidance=guidance, encode_pieces=lambda batch: encode_pieces(pipe, batch, clip_skip=clip_skip),
        empty=empty_chunk(pipe, clip_skip=clip_skip))
    zeros = pipe.force_zeros_for_empty_prompt and is_empty(negatives)
    assert schedule.added_conds is not None and schedule.added_unconds is not None
    for r, conds in enumerate(schedule.added_conds):
        for added in conds:
            pooled = added["text_embeds"]
            added["time_ids"] = torch.tensor([list(ids)], dtype=dtype, device=pooled.device).repeat(len(pooled), 1)
        uncond = schedule.added_unconds[r]
        if uncond is None:
            continue
        if zeros:
            schedule.unconds[r] = torch.zeros_like(schedule.conds[r][0])
            uncond["text_embeds"] = torch.zeros_like(uncond["text_embeds"])
        pooled = uncond["text_embeds"]
        uncond["time_ids"] = torch.tensor([list(negative_ids)], dtype=dtype, device=pooled.device).repeat(
            len(pooled), 1)
    return schedule


def needs_schedule(prompts: list[str] | None, negatives: list[str] | None, *, steps: int, guidance: bool) -> bool:
    """Whether a call's prompts (or, with guidance, its negatives) change the conditioning per step."""
    return prompt_encoding.needs_schedule(prompts, steps, composable=True) or (
        guidance and prompt_encoding.needs_schedule(negatives, steps, composable=False))
