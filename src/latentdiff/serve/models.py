"""ModelCatalog: the checkpoints, VAEs, LoRAs and embeddings the server can use, and the pipelines it has loaded.

What clients see are names, never server paths: a checkpoint is named by its file or folder name relative to
`models_dir` ("x.safetensors", "sub/y.ckpt", "folder"), the startup model by `--model` as given (a built-in name,
a Hub id) or by its file name; A1111's lists (`/sd-models`, `/sd-vae`, `/loras`, `/embeddings`) are built from
those. Every name a request sends goes through `resolve` / `resolve_vae`, which only ever return names of the
lists (a path with `..`, an absolute path or an unknown name is a RequestError naming the field).

Loaded pipelines live in an LRU bounded by `settings.model_budget_bytes` (the bytes of their weights); the model
used last and the current one are kept even over budget. The engine's worker and HTTP threads call in at once:
one lock guards the tables, and a load runs outside it, once per (model, VAE) however many threads ask (they
wait on the loader's Future; a failure reaches every waiter and is not remembered, so the next call tries again).
"""
from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..errors import LatentDiffError
from ..generation.settings import GenerateSettings, load_pipeline
from ..model_source import SINGLE_FILE_SUFFIXES, locate_model
from .controlnet import ControlNetCatalog
from .folders import Entry, refuse_path, scan_files
from .preview import LatentPreview, TinyDecoderPreview, tiny_preview_for
from .requests import RequestError
from .settings import ServeSettings
from .switches import apply_switches

VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
LORA_SUFFIXES = (".safetensors",)                   # what `<lora:NAME:W>` tags find (adapters.api)
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
NO_VAE = {"", "automatic", "none"}                  # sd_vae values meaning "the model's own" (A1111)
TITLE_HASH = re.compile(r"^(?P<name>.+) \[(?P<hash>[0-9a-f]{10})\]$")
HASH_CHUNK = 1024 * 1024
# the request keys that set what `load_pipeline` loads: its error messages name these (the command line's, its flags)
SETTING_KEYS = {"model": "sd_model_checkpoint", "vae": "sd_vae", "sampler": "sampler_name", "schedule": "scheduler"}


def startup_entry(model: str, models_dir: Path | None) -> Entry:
    """The `--model` checkpoint: a local file or folder by its name relative to models_dir (or its own name), a
    built-in name or Hub id as given. Located now, so that a wrong --model fails at start."""
    source = locate_model(model)
    if source.kind not in ("single_file", "folder"):
        return Entry(model, None, model)
    path = Path(source.name)
    if models_dir is not None:
        try:
            return Entry(path.relative_to(models_dir.resolve()).as_posix(), path, source.name)
        except ValueError:
            pass
    return Entry(path.name, path, source.name)


# ---- file facts: hashes and safetensors metadata, cached per (path, mtime, size) ------------------------------------
class FileFacts:
    """sha256 digests and safetensors `__metadata__` of files, each computed once per version of a file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, int, int], Any] = {}

    def get(self, kind: str, path: Path, compute: Any) -> Any:
        """compute(path), remembered for this version of the file."""
        stat = path.stat()
        key = (kind, str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        value = compute(path)                   # outside the lock: hashing a large file takes seconds
        with self._lock:
            self._cache[key] = value
        return value

    def sha256(self, path: Path) -> str:
        def digest(p: Path) -> str:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(HASH_CHUNK):
                    h.update(chunk)
            return h.hexdigest()
        return self.get("sha256", path, digest)

    def metadata(self, path: Path) -> dict[str, Any]:
        """The `__metadata__` of a safetensors header (JSON-looking values parsed, as A1111 shows them); {} for a
        file whose header cannot be read."""
        from ..safetensors_header import check_safetensors_header

        def read(p: Path) -> dict[str, Any]:
            try:
                raw = check_safetensors_header(p).get("__metadata__") or {}
            except (LatentDiffError, OSError):
                return {}
            return {k: _maybe_json(v) for k, v in raw.items()}
        return self.get("metadata", path, read)


def _maybe_json(value: str) -> Any:
    if value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


def weight_bytes(pipe: Any) -> int:
    """Bytes of the parameters and buffers of the pipeline's networks (each tensor counted once)."""
    import torch

    seen: set[int] = set()
    total = 0
    for part in getattr(pipe, "components", {}).values():
        module = part if isinstance(part, torch.nn.Module) else getattr(part, "model", None)
        if not isinstance(module, torch.nn.Module):
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def load_checkpoint(entry: Entry, vae: Entry | None, *, dtype: str, device: Any) -> Any:
    """Load a checkpoint (and a VAE replacing its own) as `latentdiff generate --model M --vae V` does."""
    settings = GenerateSettings(prompt=None, negative=None, seed=0, steps=None, guidance=None, sampler=None,
                                eta=None, height=None, width=None, n=1, model=entry.model, dtype=dtype,
                                tokenizer=None, vae=None if vae is None else vae.model)
    return load_pipeline(locate_model(entry.model), settings, device=device, names=SETTING_KEYS)


def _model_name(name: str) -> str:
    """A1111's model_name: the name with separators as "_" and without its file suffix."""
    flat = name.replace("/", "_").replace("\\", "_")
    suffix = Path(flat).suffix
    return flat[: -len(suffix)] if suffix.lower() in SINGLE_FILE_SUFFIXES else flat


def _unknown(what: str, name: str, names: list[str], *, field: str) -> RequestError:
    shown = names[:50] + (["..."] if len(names) > 50 else [])
    return RequestError(f"unknown {what}", field=field, expected=f"one of {shown}", found=name)


Key = tuple[str, "str | None"]      # (checkpoint name, VAE name or None)


class ModelCatalog:
    """The server's models (see the module doc). `current`: the checkpoint requests use when they name none."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.lora_dirs: tuple[Path, ...] = tuple(Path(d) for d in settings.lora_dirs)
        self.controlnets = ControlNetCatalog(settings.controlnet_dirs)   # --controlnet-dir (serve.controlnet)
        self._lock = threading.Lock()
        self._facts = FileFacts()
        self._startup = startup_entry(settings.model, settings.models_dir)
        self.current: str = self._startup.name
        self._checkpoints: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}           # every accepted spelling -> checkpoint name
        self._vaes: dict[str, Entry] = {}
        self._vae_aliases: dict[str, str] = {}
        self._loras: dict[str, Entry] = {}
        self._embedding_files: list[Entry] = []
        self._loaded: collections.OrderedDict[Key, Any] = collections.OrderedDict()   # oldest use first
        self._sizes: dict[Key, int] = {}
        self._reports: dict[Key, dict[str, dict[str, Any]]] = {}   # the embeddings each pipeline took / skipped
        self._loading: dict[Key, Future] = {}
        self._previews: dict[str, LatentPreview | TinyDecoderPreview] = {}
        self.refresh()

    # ---- the lists ------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rescan the folders. Loaded pipelines of names still listed stay loaded (with the embeddings they
        took); a current checkpoint that is gone falls back to the startup model."""
        s = self.settings
        checkpoints = {self._startup.name: self._startup}
        for entry in scan_files(s.models_dir, SINGLE_FILE_SUFFIXES, folders_with="model_index.json"):
            checkpoints.setdefault(entry.name, entry)
        aliases: dict[str, str] = {}
        for name in reversed(list(checkpoints)):     # the startup model's spellings win a clash
            aliases.update({name: name, _model_name(name): name})
        vaes = {e.name: e for e in scan_files(s.vae_dir, VAE_SUFFIXES, folders_with="config.json")}
        vae_aliases = {alias: name for name in reversed(list(vaes)) for alias in (name, _model_name(name),
                                                                                  name.rsplit(".", 1)[0])}
        loras: dict[str, Entry] = {}
        for folder in self.lora_dirs:                # the first folder wins, as the tags look them up
            for entry in scan_files(folder, LORA_SUFFIXES):
                loras.setdefault(entry.name[: -len(Path(entry.name).suffix)], entry)
        embeddings = scan_files(s.embeddings_dir, EMBEDDING_SUFFIXES)
        with self._lock:
            self._checkpoints, self._aliases, self._vaes, self._vae_aliases = checkpoints, aliases, vaes, vae_aliases
            self._loras, self._embedding_files = loras, embeddings
            if self.current not in checkpoints:
                self.current = self._startup.name
            for key in [k for k in self._loaded if k[0] not in checkpoints or (k[1] and k[1] not in vaes)]:
                self._forget(key)

    def checkpoints(self) -> list[dict[str, Any]]:
        """A1111's /sd-models items; `filename` is the name relative to models_dir, never a server path."""
        with self._lock:
            entries = list(self._checkpoints.values())
        items = []
        for entry in entries:
            sha = self._sha256(entry)
            short = sha[:10] if sha else None
            items.append({"title": f"{entry.name} [{short}]" if short else entry.name,
                          "model_name": _model_name(entry.name), "hash": short, "sha256": sha,
                          "filename": entry.name, "config": None})
        return items

    def vaes(self) -> list[dict[str, Any]]:
        """A1111's /sd-vae items (names relative to vae_dir)."""
        with self._lock:
            return [{"model_name": name, "filename": name} for name in self._vaes]

    def loras(self) -> list[dict[str, Any]]:
        """A1111's /loras items: `name` is what `<lora:NAME:W>` takes, `path` the file relative to its lora dir,
        `metadata` the safetensors header's __metadata__ (kohya's ss_* keys), read without loading the weights."""
        with self._lock:
            entries = list(self._loras.items())
        return [{"name": name, "alias": name, "path": entry.name,
                 "metadata": self._facts.metadata(entry.path)}   # type: ignore[arg-type]
                for name, entry in entries]

    def embeddings(self) -> dict[str, dict[str, Any]]:
        """A1111's /embeddings for the current model (loading it when it is not yet): the files it took, and those
        it skipped (unreadable, another text encoder width, a token its vocabulary has)."""
        key: Key = (self.current, None)
        with self._lock:
            report = self._reports.get(key)
        if report is None:
            self.pipeline(key[0])
            with self._lock:
                report = self._reports.get(key, {"loaded": {}, "skipped": {}})
        return {"loaded": dict(report["loaded"]), "skipped": dict(report["skipped"])}

    # ---- names ----------------------------------------------------------------------------------------------
    def resolve(self, name: str, *, field: str) -> str:
        """The checkpoint `name` spells (a title with or without its hash, a model_name, a file name relative to
        models_dir, the startup model's name); a RequestError for anything else."""
        refuse_path(name, field=field, what="a checkpoint")
        with self._lock:
            found = self._aliases.get(name)
            match = TITLE_HASH.match(name) if found is None else None
            if match is not None:
                found = self._aliases.get(match["name"])
            entry = self._checkpoints.get(found) if found is not None else None
            names = list(self._checkpoints)
        if entry is None:
            raise _unknown("checkpoint", name, names, field=field)
        if match is not None:
            sha = self._sha256(entry)
            if sha is None or sha[:10] != match["hash"]:
                raise RequestError("the checkpoint's hash differs from the title's", field=field,
                                   expected=f"{entry.name} [{sha[:10]}]" if sha else entry.name, found=name)
        return entry.name

    def _sha256(self, entry: Entry) -> str | None:
        """A single file's sha256 (None for a folder, a Hub id, or a file gone or unreadable since the scan)."""
        if entry.path is None or not entry.is_file:
            return None
        try:
            return self._facts.sha256(entry.path)
        except OSError:
            return None

    def resolve_vae(self, name: str | None, *, field: str) -> str | None:
        """None for the model's own autoencoder (None, "", "Automatic", "None"), else a listed VAE's name."""
        if name is None or (isinstance(name, str) and name.strip().lower() in NO_VAE):
            return None
        refuse_path(name, field=field, what="a VAE")
        with self._lock:
            found = self._vae_aliases.get(name)
            names = list(self._vaes)
        if found is None:
            raise _unknown("VAE", name, ["Automatic", "None", *names], field=field)
        return found

    # ---- loaded pipelines -----------------------------------------------------------------------------------
    def pipeline(self, name: str, vae: str | None = None) -> Any:
        """The pipeline of checkpoint `name` (with VAE `vae` replacing its own), loaded once; callers asking while
        it loads wait for that load, and share its failure (which is not remembered: the next call retries)."""
        key: Key = (self.resolve(name, field="sd_model_checkpoint"), self.resolve_vae(vae, field="sd_vae"))
        with self._lock:
            pipe = self._loaded.get(key)
            if pipe is not None:
                self._loaded.move_to_end(key)
                return pipe
            future = self._loading.get(key)
            owner = future is None
            if future is None:
                future = self._loading[key] = Future()
                entry, vae_entry = self._checkpoints[key[0]], None if key[1] is None else self._vaes[key[1]]
                embedding_files = list(self._embedding_files)
        if not owner:
            return future.result()
        try:
            pipe = load_checkpoint(entry, vae_entry, dtype=self.settings.dtype, device=self.settings.device)
            apply_switches(pipe, self.settings, name=entry.name)   # --deepcache / --freeu / --tome ...
            report = self._add_embeddings(pipe, embedding_files)
            size = weight_bytes(pipe)
        except BaseException as error:
            with self._lock:
                del self._loading[key]
            future.set_exception(error)
            raise
        with self._lock:
            del self._loading[key]
            self._loaded[key], self._sizes[key], self._reports[key] = pipe, size, report
            self._evict()
        future.set_result(pipe)
        return pipe

    def loaded(self) -> list[Key]:
        """The (checkpoint, VAE) pairs loaded now, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def set_current(self, name: str) -> None:
        """Make `name` the default checkpoint (A1111's sd_model_checkpoint option), loading it first."""
        canonical = self.resolve(name, field="sd_model_checkpoint")
        self.pipeline(canonical)
        with self._lock:
            self.current = canonical

    def preview(self, name: str) -> LatentPreview | TinyDecoderPreview:
        """The live preview of the checkpoint, made once: its tiny autoencoder's decode (--preview-vae, or the
        built-in one), else the linear map fitted to its own first stage."""
        canonical = self.resolve(name, field="sd_model_checkpoint")
        with self._lock:
            fitted = self._previews.get(canonical)
        if fitted is not None:
            return fitted
        vae = self.pipeline(canonical).vae
        fitted = tiny_preview_for(vae, canonical, self.settings.preview_vae) or LatentPreview.fit(vae)
        with self._lock:
            return self._previews.setdefault(canonical, fitted)

    def _evict(self) -> None:
        """Drop the least recently used pipelines while over budget, never the last used nor the current one
        (called with the lock held)."""
        keep = {next(reversed(self._loaded)), (self.current, None)} if self._loaded else set()
        total = sum(self._sizes.values())
        for key in list(self._loaded):
            if total <= self.settings.model_budget_bytes:
                break
            if key not in keep:
                total -= self._sizes.get(key, 0)
                self._forget(key)

    def _forget(self, key: Key) -> None:
        """(lock held) A render still holding the pipeline keeps it alive until it returns."""
        self._loaded.pop(key, None)
        self._sizes.pop(key, None)
        self._reports.pop(key, None)

    def _add_embeddings(self, pipe: Any, files: list[Entry]) -> dict[str, dict[str, Any]]:
        """Load every embedding file into the pipeline (token: the file's stem, as A1111); -> the /embeddings
        report of this pipeline."""
        from ..adapters.embeddings import add_to_pipeline, for_pipeline, read_any

        report: dict[str, dict[str, Any]] = {"loaded": {}, "skipped": {}}
        for entry in files:
            token = Path(entry.name).stem
            info: dict[str, Any] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                    "shape": None, "vectors": None}
            try:   # SD 1.x / 2.x files: one vector set; SDXL's: clip_l + clip_g (A1111's shape: their widths summed)
                found = self._facts.get(f"embedding:{token}", entry.path,   # type: ignore[arg-type]
                                        lambda p, t=token: read_any(p, token=t))
                sets = list(found.values()) if isinstance(found, dict) else [found]
                info.update(shape=sum(int(e.vectors.shape[1]) for e in sets), vectors=int(sets[0].vectors.shape[0]))
                add_to_pipeline(pipe, [for_pipeline(pipe, found)], files={token: str(entry.path)})
            except (LatentDiffError, OSError):
                report["skipped"][token] = info
                continue
            report["loaded"][token] = info
        return report


__all__ = ["ModelCatalog", "Entry", "FileFacts", "load_checkpoint", "refuse_path", "scan_files", "weight_bytes"]
