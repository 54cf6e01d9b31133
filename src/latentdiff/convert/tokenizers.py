"""The tokenizer an original single file lacks: from the caller, the local Hub cache, or the Hub.

CompVis / Stability AI checkpoints hold the text encoder's weights but not its tokenizer (the original
code downloads it by name at start-up). The conventional sources, in the order they are tried:

    clip      SD 1.x, FrozenCLIPEmbedder      openai/clip-vit-large-patch14 (what the original code loads),
                                              stable-diffusion-v1-5/stable-diffusion-v1-5, tokenizer/
    openclip  SD 2.x, FrozenOpenCLIPEmbedder  stabilityai/stable-diffusion-2, tokenizer/ (diffusers' single-file
                                              loader), stabilityai/stable-diffusion-2-1, tokenizer/
    openclip-projection  SDXL's bigG          stabilityai/stable-diffusion-xl-base-1.0, tokenizer_2/ (diffusers'
              (FrozenOpenCLIPEmbedder2)       single-file loader), stabilityai/stable-diffusion-xl-refiner-1.0,
                                              tokenizer_2/ (SDXL's CLIP-L is "clip" above)
    ldmbert   LDM text-to-image, BERTEmbedder CompVis/ldm-text2im-large-256, tokenizer/;
                                              google-bert/bert-base-uncased (formerly bert-base-uncased)

OpenCLIP pads prompts with token 0 ("!"), not <|endoftext|>; the SD 2 repos' tokenizers are configured so
(pad_token "!"). laion/CLIP-ViT-H-14-laion2B-s32B-b79K pads with <|endoftext|>, which changes every
unconditional embedding, so it is deliberately not a fallback.

`tokenizer=` (an object, a folder, or a Hub id) wins; else every candidate is looked up in the local cache;
else, unless offline (HF_HUB_OFFLINE=1 or local_files_only=True), the first one is downloaded. Failing all
three, the CheckpointError names the repositories looked for, the cache, the network state and `tokenizer=`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import hub
from ..errors import CheckpointError

# The folder of a pipeline (a Hub id or a local folder given as tokenizer=) that holds the tokenizer of a kind.
SUBFOLDERS = {"openclip-projection": "tokenizer_2"}
TOKENIZER_REPOS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "clip": (("openai/clip-vit-large-patch14", None), ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer")),
    "openclip": (("stabilityai/stable-diffusion-2", "tokenizer"), ("stabilityai/stable-diffusion-2-1", "tokenizer")),
    "openclip-projection": (("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
                            ("stabilityai/stable-diffusion-xl-refiner-1.0", "tokenizer_2")),
    "ldmbert": (("CompVis/ldm-text2im-large-256", "tokenizer"), ("google-bert/bert-base-uncased", None),
                ("bert-base-uncased", None)),
}


def resolve_tokenizer(kind: str, tokenizer: Any = None, *, cache_dir: str | os.PathLike | None = None,
                      local_files_only: bool | None = None, source: str = "single file") -> Any:
    """The tokenizer for a text encoder of `kind` ("clip", "openclip", "openclip-projection", "ldmbert"); see the
    module doc."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    load = _loader(kind)
    if tokenizer is not None:
        return _from_name(tokenizer, load, cache_dir=cache_dir, local_files_only=local_files_only,
                          sub=SUBFOLDERS.get(kind, "tokenizer"))
    if kind not in TOKENIZER_REPOS:
        raise CheckpointError("no known tokenizer for this text encoder; pass tokenizer=", where=source,
                              expected=f"one of {sorted(TOKENIZER_REPOS)}", found=kind)
    candidates = TOKENIZER_REPOS[kind]
    for repo, sub in candidates:
        found = _cached(repo, sub, load, cache_dir=cache_dir)
        if found is not None:
            return found
    offline = hub.is_offline() if local_files_only is None else local_files_only
    looked = ", ".join(f"{repo}" + (f" ({sub}/)" if sub else "") for repo, sub in candidates)
    cache = str(cache_dir) if cache_dir is not None else _default_cache()
    if offline:
        network = "the network is off (HF_HUB_OFFLINE=1 or local_files_only=True), so nothing was downloaded"
    else:
        repo, sub = candidates[0]
        try:
            folder = hub.resolve(repo, allow_patterns=_patterns(sub), cache_dir=cache_dir, local_files_only=False)
            return load(folder / sub if sub else folder)
        except CheckpointError as e:
            network = f"downloading {repo} failed ({e})"
    raise CheckpointError(
        f"the single file holds no tokenizer, and none was found: not in the local Hub cache ({cache}; looked for "
        f"{looked}); {network}", where=source,
        expected="tokenizer= (a transformers tokenizer, a tokenizer folder or a Hub id), a cached copy of "
                 f"{candidates[0][0]}, or network access")


def _loader(kind: str) -> Any:
    """The function that loads a local tokenizer folder for `kind` (never the network)."""
    if kind == "ldmbert":
        from ..models.ldm_bert import load_bert_tokenizer

        return load_bert_tokenizer
    from ..models.text_encoder import load_tokenizer

    return load_tokenizer


def _from_name(name: str | os.PathLike, load: Any, *, cache_dir: Any, local_files_only: bool | None,
               sub: str = "tokenizer") -> Any:
    """A tokenizer from a local folder, or a Hub id (its root or its `sub` folder: a pipeline's `tokenizer/`, or
    SDXL's `tokenizer_2/` for its second encoder)."""
    path = Path(name).expanduser()
    if path.is_dir():
        inner = path / sub
        return load(inner if inner.is_dir() and not _has_vocab(path) else path)
    folder = hub.resolve(str(name), allow_patterns=_patterns(None) + _patterns(sub), cache_dir=cache_dir,
                         local_files_only=local_files_only)
    return load(folder if _has_vocab(folder) else folder / sub)


def _cached(repo: str, sub: str | None, load: Any, *, cache_dir: Any) -> Any:
    """The tokenizer of `repo` (in `sub`) from the local Hub cache, or None when it is not there."""
    try:
        folder = hub.resolve(repo, allow_patterns=_patterns(sub), cache_dir=cache_dir, local_files_only=True)
    except CheckpointError:
        return None
    folder = folder / sub if sub else folder
    return load(folder) if _has_vocab(folder) else None


def _has_vocab(folder: Path) -> bool:
    from ..models.text_encoder import VOCAB_FILES

    return any((folder / name).is_file() for name in VOCAB_FILES)


def _patterns(sub: str | None) -> list[str]:
    from ..models.text_encoder import TOKENIZER_FILES

    return [f"{sub}/{name}" if sub else name for name in TOKENIZER_FILES]


def _default_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
