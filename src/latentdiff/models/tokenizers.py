"""Tokenizers without transformers: CLIP's byte-level BPE and any `tokenizers` pipeline (tokenizer.json).

Stable Diffusion's `tokenizer/` folder and the built-in model's word-level tokenizer are `tokenizers`
pipelines behind a thin transformers class (CLIPTokenizer, PreTrainedTokenizerFast). Importing transformers
for that costs seconds of a cold start, so this module builds the same pipeline from the same files and
keeps the part of the transformers interface latentdiff uses: `tok(prompts, padding="max_length",
max_length=77, truncation=True, return_tensors="pt")`, the unpadded form, `model_max_length`, the special
tokens and their ids, `len`, `get_vocab`, `decode` and `save_pretrained` (which writes back the files it
read, so transformers loads the saved folder to the same tokenizer).

"The same pipeline" means the same `tokenizers` calls in transformers 5's order: CLIPTokenizer's normalizer
(NFC, white space runs -> " ", lower case), its pre-tokenizer regex and byte-level split, BPE with the
`</w>` end-of-word suffix, <|startoftext|> ... <|endoftext|> around each prompt; special tokens from
tokenizer_config.json / special_tokens_map.json / tokenizer.json with transformers' precedence. A setting
this module does not reproduce (extra special tokens, added_tokens.json, add_bos_token ...) is a ConfigError
naming it, on which `load_tokenizer` falls back to transformers.

Calls keep no state: truncation and padding are applied per call to the encodings, never set on the shared
backend, so two threads can share one tokenizer.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import CheckpointError, ConfigError, InputError, LatentDiffError, describe

TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer_config.json", "special_tokens_map.json"
TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON, MERGES_TXT = "vocab.json", "merges.txt"
# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order (the order special tokens are added in).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
NO_LIMIT = int(1e30)        # transformers' VERY_LARGE_INTEGER: model_max_length when the folder sets none
LIMIT_THRESHOLD = int(1e20)  # transformers' LARGE_INTEGER: above it, max_length defaults mean "no limit"
CLIP_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
# CLIPTokenizer's defaults for special tokens a folder does not name.
CLIP_DEFAULTS = {"unk_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                 "pad_token": "<|endoftext|>"}
# CLIPTokenizer's pre-tokenizer: the special tokens, English contractions, letter runs, single digits,
# runs of other non-space characters (OpenAI's CLIP `pat`, as transformers writes it).
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
END_OF_WORD = "</w>"
# tokenizer_config.json keys that change no token id (file names, decode-only and bookkeeping settings).
# do_lower_case / add_prefix_space: CLIPTokenizer always lower-cases and never adds a prefix space; the
# generic class only stores them.
INERT_KEYS = frozenset({"name_or_path", "special_tokens_map_file", "errors", "clean_up_tokenization_spaces",
                        "backend", "is_local", "local_files_only", "tokenizer_file", "vocab_file", "merges_file",
                        "processor_class", "do_lower_case", "tokenizer_class", "use_fast"})
SETTING_KEYS = frozenset({"model_max_length", "padding_side", "truncation_side", "model_input_names",
                          "added_tokens_decoder", "add_prefix_space", "split_special_tokens",
                          "additional_special_tokens", "extra_special_tokens"})
# Accepted only at these values (transformers' defaults); anything else falls back to transformers.
FIXED_SETTINGS: dict[str, tuple[Any, ...]] = {
    "add_prefix_space": (False,), "split_special_tokens": (False,), "additional_special_tokens": ([], None),
    "extra_special_tokens": ([], {}, None), "padding_side": ("right", "left"), "truncation_side": ("right", "left")}


@contextlib.contextmanager
def tokenizer_errors(where: str, *, doing: str = "reading the tokenizer") -> Iterator[None]:
    """Errors of the `tokenizers` library (and of malformed files) as a CheckpointError naming `where`.

    The library raises plain Exceptions for bad files and, for a pre-tokenizer regex that backtracks past
    Oniguruma's retry limit, a pyo3 PanicException, which derives from BaseException: caught by name, so that
    KeyboardInterrupt and SystemExit still go through."""
    try:
        yield
    except LatentDiffError:
        raise
    except BaseException as e:
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"malformed tokenizer: {doing} failed ({type(e).__name__}: {first})", where=where,
                              expected="a well-formed tokenizer folder (vocab.json + merges.txt, or tokenizer.json; "
                                       "pre-tokenizer patterns that match in bounded time)") from None


class BatchEncoding(dict):
    """transformers' BatchEncoding, as far as it is used: a dict whose keys read as attributes too."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _special(name: str) -> property:
    return property(lambda self: self.special_tokens.get(name), doc=f"the {name.replace('_', ' ')}, or None")


def _special_id(name: str) -> property:
    return property(lambda self: self.token_id(self.special_tokens.get(name)), doc=f"the id of the {name}, or None")


class FastTokenizer:
    """transformers' PreTrainedTokenizerFast over a `tokenizers.Tokenizer`, for what latentdiff calls on it.

        tok = load_fast_tokenizer(folder)                   # tokenizer.json (+ tokenizer_config.json)
        batch = tok(["a red circle"], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        batch["input_ids"], batch["attention_mask"]         # (1, 16) int64 each
    """

    # model_index.json entry when saved in a pipeline folder: diffusers loads the files with this class
    library_entry: ClassVar[tuple[str, str]] = ("transformers", "PreTrainedTokenizerFast")

    def __init__(self, backend: Any, *, special_tokens: Mapping[str, str], model_max_length: int = NO_LIMIT,
                 padding_side: str = "right", truncation_side: str = "right",
                 model_input_names: Sequence[str] = ("input_ids", "attention_mask"),
                 files: Mapping[str, bytes] | None = None, source: str | None = None):
        backend.no_truncation()  # a tokenizer.json may carry both; here each call sets its own
        backend.no_padding()
        self.backend_tokenizer = backend
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.model_max_length, self.padding_side, self.truncation_side = model_max_length, padding_side, truncation_side
        self.model_input_names = list(model_input_names)
        self.files = dict(files or {})
        self.source = source or type(self).__name__  # the folder it was read from: named by errors

    bos_token, eos_token, unk_token, pad_token = map(_special, ("bos_token", "eos_token", "unk_token", "pad_token"))
    sep_token, cls_token, mask_token = map(_special, ("sep_token", "cls_token", "mask_token"))
    bos_token_id, eos_token_id, unk_token_id = map(_special_id, ("bos_token", "eos_token", "unk_token"))
    pad_token_id, sep_token_id, cls_token_id = map(_special_id, ("pad_token", "sep_token", "cls_token"))
    mask_token_id = _special_id("mask_token")

    def token_id(self, token: str | None) -> int | None:
        """The id of `token` (the unknown token's for one outside the vocabulary, as transformers), None for None."""
        if token is None:
            return None
        index = self.backend_tokenizer.token_to_id(token)
        return index if index is not None else self.token_id(self.special_tokens.get("unk_token"))

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        return self.token_id(tokens) if isinstance(tokens, str) else [self.token_id(t) for t in tokens]

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary, without added tokens (transformers' vocab_size)."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab={len(self)}, model_max_length={self.model_max_length})"

    # ---- encoding -------------------------------------------------------------------------------
    def __call__(self, text: str | Sequence[str], *, padding: bool | str = False, truncation: bool | str | None = None,
                 max_length: int | None = None, return_tensors: str | None = None,
                 return_attention_mask: bool | None = None, return_token_type_ids: bool | None = None,
                 add_special_tokens: bool = True, verbose: bool = True) -> BatchEncoding:
        """Token ids of a string (flat lists) or a list of strings (one list each), as transformers' __call__:

        padding: False, True / "longest", or "max_length"; truncation: True / "longest_first", False, or None
        (truncate only when max_length is given without padding); max_length: None -> model_max_length.
        return_tensors="pt": int64 tensors (B, L). `verbose` is accepted for transformers' signature."""
        del verbose  # transformers logs over-long prompts with it; callers here check lengths themselves
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise InputError("text must be a string or a list of strings", where="text", expected="str | list[str]",
                             found=describe(text))
        pad_to, cut_to = self._lengths(padding, truncation, max_length)
        reserved = self.backend_tokenizer.num_special_tokens_to_add(False) if add_special_tokens else 0
        if cut_to is not None and cut_to < reserved:
            raise InputError("max_length leaves no room for the special tokens", where="max_length",
                             expected=f">= {reserved}", found=cut_to)
        encodings = []
        with tokenizer_errors(self.source, doing="tokenizing"):
            for encoding in self.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
                if cut_to is not None:  # what the backend's LongestFirst truncation does to one sequence
                    encoding.truncate(cut_to - reserved, direction=self.truncation_side)
                encodings.append(self.backend_tokenizer.post_process(encoding, add_special_tokens=add_special_tokens))
        pad_length = max(len(e.ids) for e in encodings) if isinstance(pad_to, str) else pad_to  # str: "longest"
        requested = {"input_ids": True, "token_type_ids": return_token_type_ids,
                     "attention_mask": return_attention_mask}
        keys = [k for k, wanted in requested.items() if wanted or (wanted is None and k in self.model_input_names)]
        columns: dict[str, Any] = {k: [self._padded(e, k, pad_length) for e in encodings] for k in keys}
        if return_tensors is not None:
            columns = {k: self._tensor(v, return_tensors) for k, v in columns.items()}
        elif isinstance(text, str):
            columns = {k: v[0] for k, v in columns.items()}
        return BatchEncoding(columns)

    def _lengths(self, padding: bool | str, truncation: bool | str | None,
                 max_length: int | None) -> tuple[int | str | None, int | None]:
        """(pad to: None, "longest" or a length; truncate to: None or a length), by transformers' rules."""
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise InputError("unknown padding", where="padding", expected="False, True, 'longest' or 'max_length'",
                             found=repr(padding))
        if truncation not in (None, False, True, "longest_first", "only_first", "do_not_truncate"):
            raise InputError("unknown truncation", where="truncation",
                             expected="None, False, True or 'longest_first'", found=repr(truncation))
        if truncation is None:  # transformers: a max_length without padding turns truncation on
            truncation = max_length is not None and padding is False
        truncate = truncation not in (False, "do_not_truncate")
        limit = max_length if max_length is not None else \
            self.model_max_length if self.model_max_length <= LIMIT_THRESHOLD else None
        pad_to = "longest" if padding in (True, "longest") else limit if padding == "max_length" else None
        if pad_to is not None and self.pad_token is None:
            raise InputError("asked to pad, but the tokenizer has no padding token", where="padding",
                             expected="padding=False, or a tokenizer with a pad_token", found=repr(padding))
        return pad_to, (limit if truncate else None)

    def _padded(self, encoding: Any, key: str, pad_to: int | None) -> list[int]:
        values = {"input_ids": encoding.ids, "token_type_ids": encoding.type_ids,
                  "attention_mask": encoding.attention_mask}[key]
        missing = 0 if pad_to is None else max(0, pad_to - len(values))
        if not missing:
            return values
        fill = [{"input_ids": self.pad_token_id, "token_type_ids": 0, "attention_mask": 0}[key]] * missing
        return fill + values if self.padding_side == "left" else values + fill

    @staticmethod
    def _tensor(rows: list[list[int]], kind: str) -> torch.Tensor:
        if kind != "pt":
            raise InputError("only PyTorch tensors are returned", where="return_tensors", expected="'pt' or None",
                             found=repr(kind))
        if len({len(r) for r in rows}) > 1:
            raise InputError("sequences of different lengths make no tensor; pad them", where="padding",
                             expected="padding='max_length' or True", found=sorted({len(r) for r in rows}))
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, token_ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        """Text of token ids (the backend's decoder; transformers' clean_up_tokenization_spaces is not applied)."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- saving -------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> tuple[str, ...]:
        """Write the files this tokenizer was read from into `save_directory`; transformers loads them to the
        same tokenizer. No keyword is taken (transformers' legacy_format ... are meaningless for a copy)."""
        if kwargs:
            raise TypeError(f"save_pretrained() got unexpected keyword argument(s) {sorted(kwargs)}")
        if not self.files:
            raise InputError("this tokenizer was not read from files, so it has none to write", where="save_pretrained",
                             expected="a tokenizer from load_fast_tokenizer / load_clip_tokenizer")
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (folder / name).write_bytes(data)
        return tuple(str(folder / name) for name in self.files)


class CLIPTokenizer(FastTokenizer):
    """CLIP's byte-level BPE tokenizer (transformers' CLIPTokenizer, which is tokenizers-backed in transformers 5)."""

    library_entry = ("transformers", "CLIPTokenizer")

    def decode(self, token_ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        # The BPE decoder keeps the end-of-word suffix; transformers' CLIPTokenizer turns it into spaces.
        return super().decode(token_ids, skip_special_tokens=skip_special_tokens).replace(END_OF_WORD, " ").strip()


# ---- loading ------------------------------------------------------------------------------------------
def load_fast_tokenizer(folder: str | Path) -> FastTokenizer:
    """The `tokenizers` pipeline of folder/tokenizer.json with tokenizer_config.json's settings, as transformers'
    PreTrainedTokenizerFast.from_pretrained(folder) builds it. ConfigError: a setting not reproduced here."""
    folder = Path(folder)
    with tokenizer_errors(str(folder)):
        return _load_fast_tokenizer(folder)


def _load_fast_tokenizer(folder: Path) -> FastTokenizer:
    from tokenizers import Tokenizer

    files = _read_files(folder, (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP))
    if TOKENIZER_JSON not in files:
        raise ConfigError(f"no {TOKENIZER_JSON} in the tokenizer folder", where=str(folder))
    config, named, decoder = _settings(folder, files, defaults={})
    with tokenizer_errors(str(folder / TOKENIZER_JSON)):
        backend = Tokenizer.from_str(files[TOKENIZER_JSON].decode("utf-8"))
    if backend.post_processor is None:  # transformers then installs a template of its own
        raise ConfigError("a tokenizer.json without a post-processor is not reproduced here",
                          where=str(folder / TOKENIZER_JSON), expected="a post_processor")
    _add_special_tokens(backend, named, decoder)
    return FastTokenizer(backend, special_tokens={k: str(v) for k, v in named.items()}, files=files,
                         source=str(folder), **_call_settings(config))


def load_clip_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """CLIP's tokenizer from vocab.json + merges.txt (or the vocabulary and merges of tokenizer.json, which
    transformers prefers when both are there) and tokenizer_config.json, as transformers' CLIPTokenizer."""
    folder = Path(folder)
    with tokenizer_errors(str(folder)):
        return _load_clip_tokenizer(folder)


def _load_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    files = _read_files(folder, (TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP))
    config, named, decoder = _settings(folder, files, defaults=CLIP_DEFAULTS)
    if config.get("tokenizer_class") not in CLIP_CLASSES:
        raise ConfigError("not a CLIP tokenizer folder", where=str(folder / TOKENIZER_CONFIG),
                          expected=f"tokenizer_class in {CLIP_CLASSES}", found=config.get("tokenizer_class"))
    absent = [k for k in ("bos_token", "eos_token", "unk_token") if k not in named]
    if absent:
        raise ConfigError(f"a CLIP tokenizer without {absent}", where=str(folder / TOKENIZER_CONFIG),
                          expected="strings or AddedTokens", found="null")
    vocab, merges = _clip_vocabulary(folder, files)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=str(named["unk_token"])))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, named, decoder)
    tokenizer = CLIPTokenizer(backend, special_tokens={k: str(v) for k, v in named.items()}, files=files,
                              source=str(folder), **_call_settings(config))
    bos, eos = str(named["bos_token"]), str(named["eos_token"])
    bos_id, eos_id = tokenizer.token_id(bos), tokenizer.token_id(eos)
    assert bos_id is not None and eos_id is not None  # _add_special_tokens put both in the vocabulary
    backend.post_processor = processors.RobertaProcessing((eos, eos_id), (bos, bos_id), False, False)
    return tokenizer


def _clip_vocabulary(folder: Path, files: Mapping[str, bytes]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    if TOKENIZER_JSON in files:
        model = json.loads(files[TOKENIZER_JSON]).get("model", {})
        if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise ConfigError("tokenizer.json does not hold a BPE vocabulary", where=str(folder / TOKENIZER_JSON),
                              expected="model.type BPE", found=model.get("type"))
        # pairs as the file spells them ("a b" or ["a", "b"]); BPE refuses anything else
        merges: list[Any] = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        return model["vocab"], merges
    if VOCAB_JSON not in files or MERGES_TXT not in files:
        raise ConfigError("a CLIP tokenizer needs vocab.json and merges.txt (or tokenizer.json)", where=str(folder),
                          expected=[VOCAB_JSON, MERGES_TXT], found=sorted(files))
    from tokenizers.models import BPE

    with tokenizer_errors(f"{folder / VOCAB_JSON}, {folder / MERGES_TXT}"):
        vocab, pairs = BPE.read_file(str(folder / VOCAB_JSON), str(folder / MERGES_TXT))
    return vocab, pairs


def _read_files(folder: Path, names: Sequence[str]) -> dict[str, bytes]:
    if (folder / "added_tokens.json").is_file():  # transformers' legacy added tokens: not reproduced here
        raise ConfigError("added_tokens.json is not reproduced here", where=str(folder / "added_tokens.json"))
    return {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}


def _json(files: Mapping[str, bytes], name: str, folder: Path) -> dict[str, Any]:
    if name not in files:
        return {}
    try:
        data = json.loads(files[name])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{name} is not valid JSON ({e})", where=str(folder / name)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name} does not hold a JSON object", where=str(folder / name), found=describe(data))
    return data


def _settings(folder: Path, files: Mapping[str, bytes], *, defaults: Mapping[str, str]) -> tuple[dict, dict, dict]:
    """(tokenizer_config, named special tokens, added tokens by id), resolved as transformers'
    PreTrainedTokenizerBase.from_pretrained does: a config's added_tokens_decoder wins; without one,
    special_tokens_map.json overrides the config and tokenizer.json's added tokens are the decoder."""
    config = _json(files, TOKENIZER_CONFIG, folder)
    where = str(folder / TOKENIZER_CONFIG)
    # add_bos_token / add_eos_token among them: transformers then rebuilds the post-processor.
    known = INERT_KEYS | SETTING_KEYS | set(SPECIAL_TOKENS)
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise ConfigError(f"tokenizer setting(s) {unknown} not reproduced here", where=where,
                          expected=f"keys among {sorted(known)}", found=unknown)
    for key, allowed in FIXED_SETTINGS.items():
        if key in config and config[key] not in allowed:
            raise ConfigError(f"tokenizer setting {key!r} not reproduced here", where=where, expected=allowed,
                              found=repr(config[key]))

    def token(value: Any) -> Any:  # "__type": "AddedToken" dicts (and special_tokens_map's dicts) -> AddedToken
        return added_token(value, where=where) if isinstance(value, dict) else value

    named = {**defaults, **{k: token(config[k]) for k in SPECIAL_TOKENS if k in config}}
    if "added_tokens_decoder" in config:
        decoder = {int(i): token(t) for i, t in config["added_tokens_decoder"].items()}
    else:
        for key, value in _json(files, SPECIAL_TOKENS_MAP, folder).items():
            if key not in SPECIAL_TOKENS:
                if value:  # extra special tokens: not reproduced here
                    raise ConfigError(f"special token list {key!r} not reproduced here",
                                      where=str(folder / SPECIAL_TOKENS_MAP), found=value)
                continue
            named[key] = added_token(value, where=str(folder / SPECIAL_TOKENS_MAP), special=True) \
                if isinstance(value, dict) else value
        added = json.loads(files[TOKENIZER_JSON]).get("added_tokens", []) if TOKENIZER_JSON in files else []
        decoder = {t["id"]: added_token(t, where=str(folder / TOKENIZER_JSON)) for t in added}
    by_content = {str(t): t for t in decoder.values()}
    named = {k: by_content.get(str(named[k]), named[k]) for k in SPECIAL_TOKENS if named.get(k) is not None}
    return config, named, decoder


# The fields of an added token; the files' bookkeeping keys ("__type": "AddedToken" in tokenizer_config.json,
# "id" in tokenizer.json) are dropped here, so that `tokenizers` never prints "Ignored unknown kwarg option".
ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
ADDED_TOKEN_BOOKKEEPING = ("__type", "id")


def added_token(value: Mapping[str, Any], *, where: str, special: bool | None = None) -> Any:
    """An AddedToken from its JSON object (`special`: forced to that value); an unknown field is a ConfigError."""
    from tokenizers import AddedToken

    unknown = sorted(k for k in value if k not in ADDED_TOKEN_FIELDS and k not in ADDED_TOKEN_BOOKKEEPING)
    if unknown or not isinstance(value.get("content"), str):
        raise ConfigError("malformed added token", where=where, expected=f"a content string and fields among "
                          f"{list(ADDED_TOKEN_FIELDS)}", found=unknown or describe(value.get("content")))
    fields = {k: v for k, v in value.items() if k in ADDED_TOKEN_FIELDS}
    if special is not None:
        fields["special"] = special
    return AddedToken(**fields)


def _add_special_tokens(backend: Any, named: Mapping[str, Any], decoder: Mapping[int, Any]) -> None:
    """TokenizersBackend.__init__'s one `add_tokens` call: every added token by id, then the named special tokens
    the backend and that list lack (strings as special tokens), so each token keeps the flags transformers gives it."""
    from tokenizers import AddedToken

    present = list(backend.get_added_tokens_decoder().values())
    encoder = [t.content for t in present] + [str(t) for t in decoder.values()]
    tokens = [t for _, t in sorted(decoder.items())]
    for value in named.values():
        if str(value) not in encoder and value not in tokens:
            tokens.append(value)
    names = {str(v) for v in named.values()}
    out = []
    for t in tokens:
        if isinstance(t, str):
            t = AddedToken(t, special=True)
        elif not t.special and t.content in names:
            t.special = True
        out.append(t)
    backend.encode_special_tokens = False
    if out:
        backend.add_tokens(out)


def _call_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    settings = {"model_max_length": int(config.get("model_max_length") or NO_LIMIT),
                "padding_side": config.get("padding_side", "right"),
                "truncation_side": config.get("truncation_side", "right")}
    if config.get("model_input_names"):
        settings["model_input_names"] = tuple(config["model_input_names"])
    return settings


def check_token_ids(tokenizer: Any, model: torch.nn.Module) -> None:
    """Every id the tokenizer can produce must index the text model's token embedding (else an IndexError, or a
    device-side assert on CUDA, at the first prompt that uses it): checked once, when the two meet (a
    `TextEncoder` is built). Nothing to check where the model does not say its rows or the tokenizer its vocab."""
    rows = getattr(getattr(model, "config", None), "vocab_size", None)
    embeddings = getattr(model, "get_input_embeddings", None)
    with contextlib.suppress(Exception):  # transformers' models raise NotImplementedError where there is none
        table = embeddings() if callable(embeddings) else None
        rows = getattr(table, "num_embeddings", rows)
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not isinstance(rows, int) or not callable(get_vocab):
        return
    vocab = get_vocab()
    if not vocab:
        return
    token, top = max(vocab.items(), key=lambda item: item[1])
    if top >= rows or min(vocab.values()) < 0:
        raise CheckpointError("the tokenizer has token ids past the text encoder's embedding table",
                              where=f"tokenizer {getattr(tokenizer, 'source', type(tokenizer).__name__)}",
                              expected=f"ids in [0, {rows}) (the embedding's rows)",
                              found=f"token {token!r} with id {top}")
