"""Textual-inversion embeddings: reading the files people use, and adding their tokens to a text encoder.

    pipe.load_textual_inversion("easynegative.safetensors")                  # token: the file's stem
    pipe.load_textual_inversion("sd-concepts-library/cat-toy")               # a Hub repo (learned_embeds.*)
    pipe.load_textual_inversion({"<cat-toy>": tensor}, token="<cat-toy>")    # a state dict
    pipe.unload_textual_inversion()                                          # the tokenizer and table as before

Formats (Gal et al. 2022; the files A1111, kohya and diffusers write):

    A1111 .pt            {"string_to_param": {"*": (n, d)}, "name": ..., ...}  read only with weights_only=True
    A1111 / kohya .safetensors   {"emb_params": (n, d)}
    diffusers learned_embeds.bin / .safetensors   {"<token>": (d,) or (n, d)}
    SDXL .safetensors    {"clip_l": (n, 768), "clip_g": (n, 1280)}: one vector set per text encoder, loaded into
                         both of an SDXL pipeline's at once (the refiner, bigG only: clip_g); an SDXL file on a
                         pipeline with one text encoder, or a one-set file on SDXL, is a CheckpointError

The token is `token=`, else the diffusers file's own key, else (A1111 files, whose token is their file name in
A1111) the file's stem. An embedding of n > 1 vectors adds the tokens `tok`, `tok_1` ... `tok_{n-1}`, as diffusers
does, and the prompt's `tok` expands to all n (`TextEncoder.expand_tokens`).

Applying builds a new tokenizer (a copy of the original with the tokens added) and a new token-embedding table
(the original rows bit for bit, then the new ones) and swaps both in only when everything is checked: a failed load
changes nothing. The originals are kept, so unloading restores them exactly (the very objects, not a subtraction).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, InputError, describe
from ..hub import contained, is_hub_id, load_safetensors, load_torch_pickle, resolve
from ..limits import MAX_EMBEDDING_FILE_BYTES, MAX_EMBEDDING_VECTORS, MAX_EMBEDDING_WIDTH
from ..registry import ADAPTERS
from ..safetensors_header import check_safetensors_header

PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")
SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# What a folder or Hub repo of an embedding holds when weight_name is not given (diffusers' names, in its order).
DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
A1111_KEY, KOHYA_KEY = "string_to_param", "emb_params"
SDXL_KEYS = ("clip_l", "clip_g")
# which SDXL pipeline component each vector set of an SDXL file goes to (CLIP ViT-L, OpenCLIP ViT-bigG)
SDXL_ENCODERS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
# Where a text model keeps its token embedding (latentdiff's CLIP, transformers' CLIP / BERT); the first found.
TABLE_PATHS = ("embeddings.token_embedding", "text_model.embeddings.token_embedding", "embeddings.word_embeddings",
               "model.embed_tokens", "embed_tokens")


@dataclasses.dataclass(frozen=True)
class Embedding:
    """One embedding read from a file: its token, its vectors (n, d) and where they came from (for errors)."""

    token: str
    vectors: torch.Tensor
    where: str                        # "file: key"

    @property
    def tokens(self) -> list[str]:
        """The tokens it adds: `tok`, then `tok_1` ... for a multi-vector embedding (diffusers' names)."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.vectors.shape[0])]


# ---- reading ---------------------------------------------------------------------------------------------------
def find_file(source: str | os.PathLike, *, weight_name: str | None = None, revision: str | None = None,
              cache_dir: str | os.PathLike | None = None, hub_token: str | bool | None = None,
              local_files_only: bool | None = None) -> Path:
    """The embedding file of `source`: a file, a folder (weight_name, else learned_embeds.*) or a Hub repo."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        if path.suffix in SUFFIXES or not is_hub_id(str(source)):
            raise CheckpointError("embedding file not found", where=str(source),
                                  expected=f"a file ({', '.join(SUFFIXES)}), a folder or a Hub id", found="nothing")
        names = [weight_name] if weight_name else list(DIFFUSERS_NAMES)
        path = resolve(str(source), allow_patterns=names, revision=revision, cache_dir=cache_dir, token=hub_token,
                       local_files_only=local_files_only)
    if weight_name is not None:
        found = contained(path, weight_name, file=str(path), entry="weight_name")
        if not found.is_file():
            raise CheckpointError("no such embedding file in the folder", where=f"{path}: weight_name",
                                  expected="a file in the folder", found=weight_name)
        return found
    for name in DIFFUSERS_NAMES:
        if (path / name).is_file():
            return path / name
    raise CheckpointError("no embedding file in the folder", where=str(path),
                          expected=f"one of {DIFFUSERS_NAMES}, or weight_name=",
                          found=sorted(p.name for p in path.iterdir())[:20])


def read_state(path: Path) -> Any:
    """A file's contents: safetensors (shapes checked from the header before any tensor is read) or a pickle read
    with weights_only=True (nothing in it runs)."""
    size = path.stat().st_size
    if size > MAX_EMBEDDING_FILE_BYTES:
        raise CheckpointError("too large for an embedding file", where=str(path),
                              expected=f"at most {MAX_EMBEDDING_FILE_BYTES} bytes (limits.MAX_EMBEDDING_FILE_BYTES)",
                              found=f"{size} bytes")
    if path.suffix == ".safetensors":
        header = check_safetensors_header(path)
        for key, info in header.items():
            if key != "__metadata__" and isinstance(info, dict):
                _check_shape(tuple(info.get("shape", ())), where=f"{path}: {key}")
        return load_safetensors(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError("not an embedding file", where=str(path), expected=f"a name ending in {SUFFIXES}",
                              found=path.suffix or "no suffix")
    return load_torch_pickle(path)


def embedding_from_state(state: Any, *, where: str, token: str | None, stem: str | None) -> Embedding:
    """The Embedding of a file's (or a given) contents; `stem`: the A1111 token when `token` is None."""
    if isinstance(state, torch.Tensor):           # a bare tensor (diffusers reads one too, with token=)
        name, key, tensor = token or stem, "", state
    elif not isinstance(state, Mapping):
        raise CheckpointError("not an embedding", where=where, expected="a dict of tensors", found=describe(state))
    elif any(k in state for k in SDXL_KEYS):
        raise CheckpointError("an SDXL embedding (one vector set per text encoder) on a pipeline with one text "
                              "encoder", where=where,
                              expected=f"an SD 1.x / 2.x embedding ({A1111_KEY!r}, {KOHYA_KEY!r} or one token)",
                              found=sorted(str(k) for k in state)[:10])
    elif A1111_KEY in state:
        params = state[A1111_KEY]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise CheckpointError("an A1111 embedding holds one vector set", where=f"{where}: {A1111_KEY}",
                                  expected='{"*": tensor (n, d)}',
                                  found=sorted(map(str, params)) if isinstance(params, Mapping) else describe(params))
        star, tensor = next(iter(params.items()))
        name, key = token or stem, f"{A1111_KEY}.{star}"
    elif KOHYA_KEY in state:
        name, key, tensor = token or stem, KOHYA_KEY, state[KOHYA_KEY]
    elif len(state) == 1:                         # diffusers: {"<token>": tensor}
        key, tensor = next(iter(state.items()))
        name, key = token or str(key), str(key)
    else:
        raise CheckpointError("not an embedding file of a known format", where=where,
                              expected=f"{A1111_KEY!r} (A1111 .pt), {KOHYA_KEY!r} (A1111 / kohya .safetensors) or one "
                                       "token -> tensor (diffusers learned_embeds)",
                              found=sorted(str(k) for k in state)[:10])
    where = f"{where}: {key}" if key else where
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise CheckpointError("an embedding must be a float tensor", where=where, expected="a float tensor (n, d)",
                              found=describe(tensor))
    vectors = tensor[None] if tensor.dim() == 1 else tensor
    _check_shape(tuple(vectors.shape), where=where)
    if not torch.isfinite(vectors).all():
        raise CheckpointError("an embedding holds NaN or Inf", where=where, expected="finite values",
                              found="non-finite values")
    if not isinstance(name, str) or not name or name != name.strip() or any(c.isspace() for c in name):
        raise InputError("an embedding token must be one word", where="token",
                         expected="a non-empty string without spaces", found=repr(name))
    return Embedding(name, vectors.detach(), where)


def _check_shape(shape: tuple[int, ...], *, where: str) -> None:
    if len(shape) == 1:
        shape = (1, *shape)
    if len(shape) != 2 or not 1 <= shape[0] <= MAX_EMBEDDING_VECTORS or not 1 <= shape[1] <= MAX_EMBEDDING_WIDTH:
        raise CheckpointError("an embedding is a (vectors, width) tensor of bounded size", where=where,
                              expected=f"shape (n, d) with 1 <= n <= {MAX_EMBEDDING_VECTORS}, 1 <= d <= "
                                       f"{MAX_EMBEDDING_WIDTH}", found=f"shape {shape}")


def read_source(source: Any, *, weight_name: str | None = None, **hub: Any) -> tuple[Any, str, str | None]:
    """(contents, where (for errors), stem (the A1111 token; None for a state dict)) of a file, folder, Hub id or
    state dict."""
    if isinstance(source, (Mapping, torch.Tensor)):
        return source, "state dict", None
    if not isinstance(source, (str, os.PathLike)):
        raise InputError("an embedding is a path, a Hub id or a state dict", where="pretrained_model_name_or_path",
                         expected="str | os.PathLike | dict[str, Tensor]", found=describe(source))
    path = find_file(source, weight_name=weight_name, **hub)
    return read_state(path), str(path), path.stem


def read_embedding(source: Any, *, token: str | None = None, weight_name: str | None = None,
                   **hub: Any) -> Embedding:
    """The Embedding of a file, folder, Hub id or state dict (see the module docstring)."""
    state, where, stem = read_source(source, weight_name=weight_name, **hub)
    return embedding_from_state(state, where=where, token=token, stem=stem)


def sdxl_embeddings(state: Any, *, where: str, token: str | None, stem: str | None) -> dict[str, Embedding]:
    """An SDXL file's two vector sets -> {"text_encoder": Embedding (clip_l), "text_encoder_2": Embedding
    (clip_g)}, both under one token (`token`, else the file's stem, as A1111). A file of one vector set (SD 1.x /
    2.x) or with other keys is a CheckpointError naming the file and its keys."""
    keys = sorted(str(k) for k in state)[:10] if isinstance(state, Mapping) else describe(state)
    if not isinstance(state, Mapping) or set(state) != set(SDXL_KEYS):
        raise CheckpointError("an SDXL pipeline takes SDXL embeddings: one vector set per text encoder", where=where,
                              expected=f"exactly the keys {list(SDXL_KEYS)} (CLIP-L (n, 768) and bigG (n, 1280) "
                                       "vectors; an SD 1.x / 2.x embedding has one set, for one text encoder)",
                              found=keys)
    if token is None and stem is None:
        raise InputError("an SDXL state dict has no token of its own", where="token",
                         expected="load_textual_inversion(state, token='<name>')", found=None)
    return {component: embedding_from_state(state[key], where=f"{where}: {key}", token=token, stem=stem)
            for component, key in SDXL_ENCODERS.items()}


def read_any(source: Any, *, token: str | None = None, weight_name: str | None = None,
             **hub: Any) -> Embedding | dict[str, Embedding]:
    """An SDXL file's two vector sets ({component: Embedding}, `sdxl_embeddings`), else the one Embedding of any
    other format: read and checked before it is known which pipeline takes it (`for_pipeline` then says)."""
    state, where, stem = read_source(source, weight_name=weight_name, **hub)
    if isinstance(state, Mapping) and any(k in state for k in SDXL_KEYS):
        return sdxl_embeddings(state, where=where, token=token, stem=stem)
    return embedding_from_state(state, where=where, token=token, stem=stem)


# ---- applying ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Loaded:
    """What a text encoder held before any embedding was loaded, and the embeddings loaded since, in order."""

    tokenizer: Any
    weight: torch.Tensor             # the original Parameter itself
    embeddings: dict[str, Embedding]
    files: dict[str, str] = dataclasses.field(default_factory=dict)     # token -> file (for the CLI's record)


# diffusers' Hub keywords of load_textual_inversion -> find_file's (`token` there is the embedding's token)
HUB_OPTIONS = {"revision": "revision", "cache_dir": "cache_dir", "local_files_only": "local_files_only",
               "hf_token": "hub_token"}
STATE = "_textual_inversion"     # the TextEncoder attribute holding its `Loaded`


def token_table(model: torch.nn.Module, *, where: str = "text_encoder") -> torch.nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    table = None
    if callable(get):
        try:
            table = get()
        except NotImplementedError:
            table = None
    for path in TABLE_PATHS if table is None else ():
        found: Any = model
        for part in path.split("."):
            found = getattr(found, part, None)
        if isinstance(found, torch.nn.Embedding):
            table = found
            break
    if not isinstance(table, torch.nn.Embedding):
        raise InputError("this text encoder has no token-embedding table to add embeddings to", where=where,
                         expected="a CLIP or BERT-like text model", found=type(model).__name__)
    return table


@ADAPTERS.register("loaded_tokens")
def loaded_tokens(text_encoder: Any) -> list[str]:
    """The tokens of the embeddings loaded into `text_encoder` (base tokens, in load order)."""
    state = getattr(text_encoder, STATE, None)
    return list(state.embeddings) if state is not None else []


def _add_tokens(tokenizer: Any, tokens: list[str]) -> Any:
    new = copy.deepcopy(tokenizer)
    backend = getattr(new, "backend_tokenizer", None)
    if backend is not None and not hasattr(new, "add_tokens"):     # latentdiff's FastTokenizer
        backend.add_tokens(tokens)
    else:                                                          # transformers' tokenizers
        new.add_tokens(tokens)
    return new


def apply(text_encoder: Any, embeddings: Sequence[Embedding], *, files: Mapping[str, str] | None = None) -> None:
    """Add `embeddings` to the text encoder (tokenizer + token table): all or nothing."""
    _install(text_encoder, *plan(text_encoder, embeddings, files=files))


def plan(text_encoder: Any, embeddings: Sequence[Embedding], *, files: Mapping[str, str] | None = None,
         ) -> tuple[torch.nn.Embedding, Any, torch.Tensor, dict[str, Embedding], dict[str, str]]:
    """Every check of adding `embeddings` (width, tokens), changing nothing: -> `_install`'s arguments (the
    table, the original tokenizer and weight, the embeddings then loaded, their files)."""
    state: Loaded | None = getattr(text_encoder, STATE, None)
    table = token_table(text_encoder.model)
    base_tokenizer = text_encoder.tokenizer if state is None else state.tokenizer
    vocab = base_tokenizer.get_vocab()
    width = table.embedding_dim
    current = dict(state.embeddings) if state is not None else {}
    taken = {t for e in current.values() for t in e.tokens}
    for embedding in embeddings:
        if embedding.vectors.shape[1] != width:
            raise CheckpointError("the embedding's width differs from the text encoder's", where=embedding.where,
                                  expected=f"vectors of width {width} (the text encoder's hidden size)",
                                  found=f"shape {tuple(embedding.vectors.shape)}")
        clash = [t for t in embedding.tokens if t in vocab or t in taken]
        if clash:
            raise InputError(f"token {clash[0]!r} is already in the tokenizer's vocabulary (or loaded); choose another "
                             "token, or unload_textual_inversion it first", where="token",
                             expected="a token not in the vocabulary", found=clash[0])
        taken.update(embedding.tokens)
        current[embedding.token] = embedding
    return (table, base_tokenizer, table.weight if state is None else state.weight, current,
            {**(state.files if state else {}), **(files or {})})


def _install(text_encoder: Any, table: torch.nn.Embedding, tokenizer: Any, weight: torch.Tensor,
             embeddings: dict[str, Embedding], files: dict[str, str]) -> None:
    """Build the tokenizer and table for `embeddings` from the originals, then swap them in (or restore the
    originals exactly when there are none)."""
    current = table.weight
    if weight.device != current.device or weight.dtype != current.dtype:   # the pipeline was moved since
        weight = torch.nn.Parameter(weight.detach().to(current), requires_grad=weight.requires_grad)
    if not embeddings:
        text_encoder.tokenizer, table.weight = tokenizer, weight
        table.num_embeddings = weight.shape[0]
        text_encoder.token_expansions = {}
        if hasattr(text_encoder, STATE):
            delattr(text_encoder, STATE)
        return
    tokens = [t for e in embeddings.values() for t in e.tokens]
    new_tokenizer = _add_tokens(tokenizer, tokens)
    ids = [new_tokenizer.get_vocab().get(t) for t in tokens]
    if any(i is None or i < 0 for i in ids):
        raise CheckpointError("the tokenizer did not take the embedding's tokens", where="tokenizer",
                              expected=f"ids for {tokens}", found=ids)
    rows = max(weight.shape[0], max(i for i in ids if i is not None) + 1)
    with torch.no_grad():
        grown = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
        grown[: weight.shape[0]] = weight
        if rows > weight.shape[0]:
            grown[weight.shape[0]:] = 0
        vectors = torch.cat([e.vectors for e in embeddings.values()]).to(grown)
        grown[torch.tensor(ids, device=grown.device)] = vectors
    state = Loaded(tokenizer, weight, embeddings, files)
    text_encoder.tokenizer = new_tokenizer
    table.weight = torch.nn.Parameter(grown, requires_grad=weight.requires_grad)
    table.num_embeddings = rows
    text_encoder.token_expansions = {e.token: " ".join(e.tokens) for e in embeddings.values() if len(e.tokens) > 1}
    object.__setattr__(text_encoder, STATE, state)


def remove(text_encoder: Any, tokens: str | Sequence[str] | None = None) -> None:
    """Unload the embeddings of `tokens` (None: all), restoring the tokenizer and table exactly when none is left."""
    state: Loaded | None = getattr(text_encoder, STATE, None)
    if state is None:
        if tokens:
            raise InputError("no textual-inversion embedding is loaded", where="tokens", expected="None",
                             found=tokens)
        return
    names = list(state.embeddings) if tokens is None else [tokens] if isinstance(tokens, str) else list(tokens)
    unknown = [t for t in names if t not in state.embeddings]
    if unknown:
        raise InputError("no embedding is loaded with that token", where="tokens",
                         expected=f"one of {list(state.embeddings)}", found=unknown)
    left = {t: e for t, e in state.embeddings.items() if t not in names}
    files = {t: f for t, f in state.files.items() if t in left}
    _install(text_encoder, token_table(text_encoder.model), state.tokenizer, state.weight, left, files)


# ---- the pipeline hooks (registry.ADAPTERS) ------------------------------------------------------------------------
def text_encoders(pipe: Any) -> tuple[dict[str, Any], bool]:
    """({component: TextEncoder} that take embeddings, whether the pipeline is SDXL): SDXL's two (the refiner's
    text_encoder_2 only), else the one text encoder."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    names = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
    found = {n: getattr(pipe, n, None) for n in names}
    return {n: e for n, e in found.items() if e is not None and hasattr(e, "tokenizer")}, sdxl


def _tokens_of(token: str | Sequence[str] | None, count: int, many: bool) -> list[str | None]:
    if many:
        tokens: list[str | None] = [None] * count if token is None else [token] if isinstance(token, str) \
            else list(token)
        if len(tokens) != count:
            raise InputError("one token per embedding", where="token", expected=f"a list of {count} tokens",
                             found=len(tokens))
        return tokens
    if token is not None and not isinstance(token, str):
        raise InputError("token must be a string for one embedding", where="token", expected="str | None",
                         found=describe(token))
    return [token]


@ADAPTERS.register("load_textual_inversion")
def load_textual_inversion(pipe: Any, pretrained_model_name_or_path: Any, token: str | Sequence[str] | None = None,
                           *, weight_name: str | None = None, **hub: Any) -> None:
    """`pipe.load_textual_inversion`: one source or a list (with a list of tokens, or None), all or nothing. On
    SDXL each file's clip_l vectors go to text_encoder and its clip_g vectors to text_encoder_2 under one token
    (diffusers takes two calls with text_encoder= / tokenizer= for this), both checked before either changes."""
    encoders, sdxl = text_encoders(pipe)
    if not encoders:
        raise InputError("this pipeline has no text encoder to add embeddings to", where=type(pipe).__name__,
                         expected="a text-conditioned pipeline")
    many = isinstance(pretrained_model_name_or_path, (list, tuple))
    sources = list(pretrained_model_name_or_path) if many else [pretrained_model_name_or_path]
    tokens = _tokens_of(token, len(sources), many)
    unknown = sorted(set(hub) - set(HUB_OPTIONS))
    if unknown:
        raise InputError("unknown option of load_textual_inversion", where=unknown[0],
                         expected=f"weight_name or one of {list(HUB_OPTIONS)}", found=unknown)
    options = {HUB_OPTIONS[k]: v for k, v in hub.items()}
    sets, files = [], {}
    for source, name in zip(sources, tokens, strict=True):
        found = for_pipeline(pipe, read_any(source, token=name, weight_name=weight_name, **options))
        sets.append(found)
        if isinstance(source, (str, os.PathLike)):
            files[next(iter(found.values())).token] = os.fspath(source)
    add_to_pipeline(pipe, sets, files=files)


def for_pipeline(pipe: Any, found: Embedding | dict[str, Embedding]) -> dict[str, Embedding]:
    """What `read_any` found, per text encoder of `pipe` ({component: Embedding}): an SDXL file's sets on SDXL
    (the refiner: clip_g), one set on a pipeline with one text encoder; the other pairings are CheckpointErrors."""
    encoders, sdxl = text_encoders(pipe)
    if sdxl and isinstance(found, Embedding):
        raise CheckpointError("an SDXL pipeline takes SDXL embeddings: one vector set per text encoder",
                              where=found.where, expected=f"a file with the keys {list(SDXL_KEYS)} (CLIP-L (n, 768) "
                              "and bigG (n, 1280) vectors)", found=f"one vector set of shape "
                              f"{tuple(found.vectors.shape)} (an SD 1.x / 2.x embedding)")
    if not sdxl and isinstance(found, dict):
        where = found["text_encoder"].where.rsplit(": ", 1)[0]
        raise CheckpointError("an SDXL embedding (one vector set per text encoder) on a pipeline with one text "
                              "encoder", where=where, expected=f"an SD 1.x / 2.x embedding ({A1111_KEY!r}, "
                              f"{KOHYA_KEY!r} or one token)", found=list(SDXL_KEYS))
    return {c: e for c, e in found.items() if c in encoders} if isinstance(found, dict) else {"text_encoder": found}


def add_to_pipeline(pipe: Any, sets: Sequence[Mapping[str, Embedding]], *,
                    files: Mapping[str, str] | None = None) -> None:
    """Add embeddings ({component: Embedding} each, `for_pipeline`) to the pipeline's text encoders: every check
    for every encoder first, then the swaps (all or nothing)."""
    encoders, _ = text_encoders(pipe)
    per = {c: [s[c] for s in sets if c in s] for c in encoders}
    plans = {c: plan(encoders[c], per[c], files=files) for c in encoders if per[c]}
    done: list[str] = []
    try:
        for component, args in plans.items():
            _install(encoders[component], *args)
            done.append(component)
    except Exception:
        for component in done:   # the first encoder took them, the second could not: none keeps them
            remove(encoders[component], [e.token for e in per[component]])
        raise


@ADAPTERS.register("unload_textual_inversion")
def unload_textual_inversion(pipe: Any, tokens: str | Sequence[str] | None = None) -> None:
    """`pipe.unload_textual_inversion`: the tokenizer and embedding table back as they were (tokens=None: all),
    in every text encoder (both of SDXL's)."""
    encoders, _ = text_encoders(pipe)
    if tokens is None:
        for encoder in encoders.values():
            remove(encoder, None)
        return
    names = [tokens] if isinstance(tokens, str) else list(tokens)
    loaded = {c: loaded_tokens(e) for c, e in encoders.items()}
    held = sorted({t for tokens_held in loaded.values() for t in tokens_held})
    unknown = [t for t in names if t not in held]
    if unknown:
        raise InputError("no embedding is loaded with that token" if held else
                         "no textual-inversion embedding is loaded", where="tokens",
                         expected=f"one of {held}" if held else "None", found=unknown)
    for component, encoder in encoders.items():
        mine = [t for t in names if t in loaded[component]]
        if mine:
            remove(encoder, mine)
