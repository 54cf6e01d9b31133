"""`latentdiff generate --embedding FILE[:TOKEN]` (issue 16): textual-inversion embeddings for a run.

    latentdiff generate "a photo of <cat-toy>" --embedding learned_embeds.bin
    latentdiff generate "a castle" --negative "easynegative" --embedding ~/emb/easynegative.safetensors
    latentdiff generate "a cattoy dog" --embedding CatToy.pt:cattoy          # the token chosen

Repeatable. TOKEN defaults as `pipe.load_textual_inversion` does: a diffusers file's own token, else the file's
stem. The files are read and checked before the model loads; each is recorded in the PNG as
{"path": absolute path, "token": the token used, "sha256": the file's digest} under `embedding`, and `--from`
loads the same files again (warning when a file's sha256 changed, and naming each local file the PNG chose).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from pathlib import Path
from typing import Any

from ..errors import LatentDiffError, UsageError
from ..limits import MAX_EMBEDDING_FILE_BYTES, MAX_EMBEDDING_FILES
from .generate_settings import FLAGS, GenerateSettings

KEY = "embedding"


def add_embedding_flags(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--embedding", action="append", default=None, metavar="FILE[:TOKEN]",
                     help="a textual-inversion embedding (A1111 .pt / .safetensors, diffusers learned_embeds); "
                          "TOKEN: the word that uses it in prompts (default: the file's own token or its stem); "
                          "repeatable")


def split_spec(spec: str) -> tuple[str, str | None]:
    """FILE[:TOKEN] -> (file, token or None); a name that is an existing file is taken whole (C:\\x, a:b.pt)."""
    if Path(spec).expanduser().is_file() or ":" not in spec:
        return spec, None
    file, token = spec.rsplit(":", 1)
    if not token or "/" in token or "\\" in token:
        return spec, None
    return file, token


def _entries(value: Any, *, where: str) -> list[dict[str, Any]]:
    """The flag's FILE[:TOKEN] strings or a PNG's recorded dicts, as {"path", "token", "sha256"} (checked: a PNG
    is untrusted input)."""
    if not isinstance(value, (list, tuple)) or not 0 < len(value) <= MAX_EMBEDDING_FILES:
        raise UsageError("bad value for embedding", where=where,
                         expected=f"1 to {MAX_EMBEDDING_FILES} embeddings (limits.MAX_EMBEDDING_FILES)",
                         found=repr(value)[:200])
    out = []
    for item in value:
        if isinstance(item, str):
            path, token = split_spec(item)
            item = {"path": path, "token": token, "sha256": None}
        ok = isinstance(item, dict) and isinstance(item.get("path"), str) and 0 < len(item["path"]) <= 4096 \
            and not any(ord(c) < 32 for c in item["path"]) \
            and all(item.get(k) is None or isinstance(item[k], str) and len(item[k]) <= 256
                    for k in ("token", "sha256"))
        if not ok:
            raise UsageError("bad value for embedding", where=where,
                             expected='FILE[:TOKEN], or {"path": ..., "token": ..., "sha256": ...}',
                             found=repr(item)[:200])
        out.append({"path": item["path"], "token": item.get("token"), "sha256": item.get("sha256")})
    return out


def settle_embeddings(args: argparse.Namespace, settings: GenerateSettings) -> tuple[GenerateSettings, list[Any]]:
    """The run's embeddings read and checked (format, shape, tokens) before the model loads; the settings with each
    recorded as {"path", "token", "sha256"}. -> (settings, the Embeddings to apply once the model is loaded)."""
    from ..adapters.embeddings import read_any

    value = getattr(settings, KEY)
    if value is None:
        return settings, []
    from_flag = getattr(args, KEY, None) is not None
    where = FLAGS.get(KEY, "--embedding") if from_flag else f"{args.from_png}: {KEY}"
    recorded: list[dict[str, Any]] = []
    embeddings: list[Any] = []
    tokens: set[str] = set()
    for entry in _entries(value, where=where):
        path = Path(entry["path"]).expanduser().resolve()
        if not path.is_file():
            raise UsageError("no such embedding file", where=where, expected="an embedding file", found=str(path))
        if not from_flag:
            print(f"latentdiff: warning: {args.from_png} names the local embedding {path}: using it (pass "
                  "--embedding to choose another)", file=sys.stderr)
        if path.stat().st_size > MAX_EMBEDDING_FILE_BYTES:
            raise UsageError("too large for an embedding file", where=where,
                             expected=f"at most {MAX_EMBEDDING_FILE_BYTES} bytes (limits.MAX_EMBEDDING_FILE_BYTES)",
                             found=f"{path}: {path.stat().st_size} bytes")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if entry["sha256"] is not None and entry["sha256"] != digest:
            print(f"latentdiff: warning: {path} changed since {args.from_png} was made (its sha256 differs): the "
                  "image will differ", file=sys.stderr)
        try:
            embedding = read_any(path, token=entry["token"])   # one vector set, or SDXL's two
        except LatentDiffError as e:
            raise UsageError(f"cannot use this embedding: {e}", where=where, found=str(path)) from None
        token = next(iter(embedding.values())).token if isinstance(embedding, dict) else embedding.token
        if token in tokens:
            raise UsageError("two embeddings with one token", where=where, expected="a token per embedding "
                             "(FILE:TOKEN)", found=token)
        tokens.add(token)
        embeddings.append(embedding)
        recorded.append({"path": str(path), "token": token, "sha256": digest})
    return dataclasses.replace(settings, embedding=recorded), embeddings


def apply_embeddings(pipe: Any, settings: GenerateSettings, embeddings: list[Any]) -> None:
    """Add the run's embeddings to the loaded pipeline's text encoders (a UsageError for a width or a model family
    it does not take: an SDXL file on SD 1.x, an SD 1.x file on SDXL)."""
    if not embeddings:
        return
    from ..adapters.embeddings import add_to_pipeline, for_pipeline

    try:
        add_to_pipeline(pipe, [for_pipeline(pipe, e) for e in embeddings],
                        files={e["token"]: e["path"] for e in getattr(settings, KEY) or ()})
    except LatentDiffError as e:
        raise UsageError(f"cannot use this embedding with this model: {e}", where="--embedding") from None
