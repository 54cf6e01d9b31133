"""Where checkpoints come from and go to: local folders, the Hugging Face Hub, safetensors and pickle files
(published weight files, `RemoteFile`, are in `latentdiff.remote_weights`; a safetensors header's checks in
`latentdiff.safetensors_header`).

Everything that touches the file system or the network for weights goes through here, so the
rules hold everywhere: safetensors first, pickles only through `torch.load(weights_only=True)`,
`HF_HUB_OFFLINE=1` honoured (a cached model never calls the Hub, a cached file is never downloaded again),
downloads checked against their published sha256, and every write atomic (written under a temporary name,
then renamed; a folder through `latentdiff.atomic_folders`, whose names stay importable from here).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic_folders import (  # noqa: F401  (re-exported: they were defined here)
    RENAME_EXCHANGE,
    STALE_WITHOUT_PID_S,
    atomic_folder,
    current_umask,
    exchange,
    recover_folder,
    replace_folder,
)
from .errors import CheckpointError
from .safetensors_header import check_safetensors_header

WEIGHTS_NAME = "diffusion_pytorch_model"


def contained(root: str | os.PathLike, name: str | os.PathLike, *, file: str | os.PathLike, entry: str,
              plain_name: bool = False) -> Path:
    """`root / name` resolved, refused unless it stays inside `root` (symlinks are followed: a link is fine while
    its target stays inside). Every path that comes from a file or a request goes through here: a shard name in a
    `*.safetensors.index.json`, a subfolder in `model_index.json`, a YAML or metadata reference, a name in a
    request. `plain_name=True`: a bare file or folder name is expected (no separators at all).

    -> the resolved path; CheckpointError naming `file`, `entry` and the resolved path otherwise."""
    text = os.fspath(name)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise CheckpointError("a path in a file is empty or not text", where=f"{file}: {entry}",
                              expected="a relative path inside the folder", found=repr(name))
    if plain_name and (text in {".", ".."} or "/" in text or "\\" in text):
        raise CheckpointError("expected a plain name, found a path", where=f"{file}: {entry}",
                              expected="a file or folder name without separators", found=text)
    base = Path(root).resolve()
    target = (base / text).resolve()
    if Path(text).is_absolute() or (target != base and base not in target.parents):
        raise CheckpointError("a path in a file points outside its folder; refusing to read it",
                              where=f"{file}: {entry}", expected=f"a path inside {base}", found=str(target))
    return target


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}


@dataclasses.dataclass(frozen=True)
class HubLocation:
    """Where a Hub id is looked up: the four keywords every `from_pretrained` takes, passed down as one value.

    `HubLocation()` is the default everywhere: the main branch, the default cache, the saved token, and the
    network unless HF_HUB_OFFLINE=1. Local folders ignore it.
    """

    revision: str | None = None                       # branch, tag or commit
    cache_dir: str | os.PathLike | None = None        # None: the Hub's default cache
    token: str | bool | None = None                   # None: the saved token
    local_files_only: bool | None = None              # None: HF_HUB_OFFLINE decides

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> HubLocation:
        """The location among a call's keywords (`Pipeline.from_pretrained(path, **kwargs)`), the rest ignored."""
        return cls(**{field.name: kwargs.get(field.name) for field in dataclasses.fields(cls)})

    def resolve(self, path_or_id: str | os.PathLike, *, allow_patterns: Sequence[str] | None = None) -> Path:
        """`resolve(path_or_id, allow_patterns=..., **this location)`."""
        return resolve(path_or_id, allow_patterns=allow_patterns, revision=self.revision, cache_dir=self.cache_dir,
                       token=self.token, local_files_only=self.local_files_only)


def resolve(path_or_id: str | os.PathLike, *, revision: str | None = None,
            allow_patterns: Sequence[str] | None = None, cache_dir: str | os.PathLike | None = None,
            token: str | bool | None = None, local_files_only: bool | None = None) -> Path:
    """Return a local folder for `path_or_id`: the folder itself, a built-in model's packaged folder
    (`latentdiff.builtin`, e.g. "latentdiff/shapes-64"), or a Hub snapshot.

    A Hub id downloads only `allow_patterns`; with `HF_HUB_OFFLINE=1` (or
    `local_files_only=True`) only the local cache is consulted and the network is never used.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if not path.exists() and path.parent.is_dir() and recover_folder(path):  # a save killed mid-swap
        return path
    name = str(path_or_id)
    from .builtin import builtin_path

    packaged = builtin_path(name)   # a model that ships inside the package: before any Hub look-up
    if packaged is not None:
        return packaged
    if path.exists():
        raise CheckpointError("expected a folder or a Hub id, got a file", where=name,
                              expected="a folder (or use from_single_file for single files)", found="a file")
    if name.count("/") > 1 or name.startswith((".", "/", "~")) or not name.strip():
        raise CheckpointError("no such folder", where=name, expected="an existing folder or a Hub id 'owner/name'",
                              found="nothing at that path")
    check_hub_id(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = is_offline() if local_files_only is None else local_files_only
    try:
        folder = snapshot_download(name, revision=revision, allow_patterns=list(allow_patterns or []) or None,
                                   cache_dir=None if cache_dir is None else os.fspath(cache_dir), token=token,
                                   local_files_only=offline)
    except LocalEntryNotFoundError:
        if offline:   # HF_HUB_OFFLINE=1 or local_files_only=True: the cache was the only place looked at
            raise CheckpointError("not a local folder, and not in the local Hub cache (offline mode)", where=name,
                                  expected="a folder, or a Hub id downloaded before",
                                  found="nothing in the cache") from None
        # online, yet the Hub could not be reached (huggingface_hub then falls back to the cache, which lacks it)
        raise CheckpointError("could not reach the Hub (no network?), and the repository is not in the local "
                              "cache", where=name, expected="network access to huggingface.co, or a copy "
                              "downloaded before (HF_HUB_OFFLINE=1 then uses only the cache)",
                              found="no network, nothing in the cache") from None
    except RepositoryNotFoundError:
        raise CheckpointError("no such Hub repository (or it is private: pass token=)", where=name) from None
    except HFValidationError as e:  # the revision, or an id the Hub's own rules refuse
        raise CheckpointError(f"not a valid Hub id or revision ({e})", where=name, expected=HUB_ID_RULE,
                              found=repr(name) if revision is None else f"{name!r} at revision {revision!r}") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"could not download from the Hub ({type(e).__name__}: {e})", where=name,
                              expected="network access, or HF_HUB_OFFLINE=1 with a cached copy") from None
    return Path(folder)


# ---- weights read from a file: copied (the default) or memory-mapped -----------------------------------
@dataclasses.dataclass(frozen=True)
class MappedFile:
    """A weights file as it was when its weights were mapped: what `check` compares it with."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> MappedFile:
        st = os.stat(path)
        return cls(os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def check(self) -> None:
        """CheckpointError when the file was rewritten or truncated in place since it was mapped (reading a mapped
        page of a truncated file kills the process with SIGBUS; a same-size rewrite changes the weights). A file
        replaced by a rename, or deleted, is fine: the mapping keeps the old file's bytes."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == (self.dev, self.ino) and (st.st_size, st.st_mtime_ns) != (self.size,
                                                                                                 self.mtime_ns):
            raise CheckpointError(
                "the weights file changed on disk under a model that reads its weights from it (mmap_weights=True); "
                "refusing to read it again (a truncated file would kill the process, a rewritten one change the "
                "weights): load the model again", where=self.path,
                expected=f"{self.size} bytes, modified at {self.mtime_ns} ns",
                found=f"{st.st_size} bytes, modified at {st.st_mtime_ns} ns")


_MAPPED: contextvars.ContextVar[list[MappedFile] | None] = contextvars.ContextVar("latentdiff_mapped", default=None)


@contextlib.contextmanager
def mapped_weights(enabled: bool | None = True) -> Iterator[list[MappedFile]]:
    """Within the block, models loaded keep their weights memory-mapped from the files (zero copy: pages can be
    released and re-read, `utils.memory`); each file read is appended to the list yielded. Outside (the default),
    loads copy the weights into the process's own memory, as diffusers does, and the file is closed after the load:
    rewriting or truncating it later changes nothing. `enabled=None`: as the enclosing block says."""
    if enabled is None:
        yield _MAPPED.get() or []
        return
    files: list[MappedFile] = []
    token = _MAPPED.set(files if enabled else None)
    try:
        yield files
    finally:
        _MAPPED.reset(token)


def weights_mapped() -> bool:
    """Whether loads here keep weights mapped from their files (`mapped_weights`), else copy them."""
    return _MAPPED.get() is not None


def _note_mapped(path: Path) -> None:
    files = _MAPPED.get()
    if files is not None:
        files.append(MappedFile.of(path))


# A Hub id as the Hub spells them: [owner/]name, each part letters, digits, '-', '_', '.', not starting or ending
# with '-' or '.', no '--' or '..', at most 96 characters.
HUB_ID_RULE = "a folder, or a Hub id 'owner/name' (letters, digits, '-', '_', '.'; no '..' or '--')"
_HUB_ID_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")


def is_hub_id(name: str) -> bool:
    """Whether `name` is spelled as a Hub id (HUB_ID_RULE); it may still not exist."""
    parts = name.split("/")
    return len(parts) <= 2 and "--" not in name and ".." not in name and all(_HUB_ID_PART.fullmatch(p) for p in parts)


def check_hub_id(name: str) -> None:
    """Refuse a string that is neither an existing folder nor a valid Hub id, before the Hub is asked."""
    if not is_hub_id(name):
        raise CheckpointError("no such folder, and not a valid Hub id", where=name, expected=HUB_ID_RULE,
                              found=repr(name))


def load_safetensors(path: str | os.PathLike, *, device: str = "cpu") -> dict[str, Any]:
    """Read a safetensors file (memory-mapped: the model loaders copy the tensors unless `mapped_weights`), with a
    CheckpointError naming the file if it is bad."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    check_safetensors_header(path)
    _note_mapped(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"corrupt safetensors file ({e})", where=str(path)) from None


def load_torch_pickle(path: str | os.PathLike) -> Any:
    """Load a pickled checkpoint safely: `weights_only=True`, nothing in the file is executed."""
    import pickle
    import zipfile

    import torch

    _note_mapped(Path(path))
    try:
        # mmap (no copy of the whole file into memory) works for the zip format torch.save writes since 1.6.
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        import re

        wanted = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise CheckpointError(
            "refusing to unpickle: the file asks for more than tensors and plain containers; nothing in it was run. "
            "If you trust its source, convert it to safetensors outside latentdiff", where=str(path),
            expected="tensors, dicts, lists, numbers, strings",
            found=wanted.group(1) if wanted else str(e).split("\n")[0]) from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        # a malformed pickle fails in many ways (a zip without its records, a wrong storage size ...)
        raise CheckpointError(f"corrupt or truncated checkpoint ({type(e).__name__}: {e})", where=str(path)) from None
    check_pickled_tensors(obj, where=str(path))
    return obj


def pickled_tensors(obj: Any, *, key: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(dotted key, tensor) for every tensor in a loaded pickle's dicts, lists and tuples (8 levels deep)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield key, obj
    elif depth < 8 and isinstance(obj, dict):
        for k, v in obj.items():
            yield from pickled_tensors(v, key=f"{key}.{k}" if key else str(k), depth=depth + 1)
    elif depth < 8 and isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from pickled_tensors(v, key=f"{key}[{i}]", depth=depth + 1)


def check_pickled_tensors(obj: Any, *, where: str) -> None:
    """Refuse a loaded pickle holding a tensor without data (meta device: it would fail at the first copy), then
    one that claims more elements than its storage holds: a pickle can store a stride-0 view of 10^10 elements in
    4 bytes, which `.double()`, `.tolist()` or a copy would then materialise (80 GB)."""
    tensors = list(pickled_tensors(obj))
    for key, tensor in tensors:
        if tensor.is_meta:
            raise CheckpointError("a tensor in the checkpoint has no data (meta device)", where=f"{where}: {key}",
                                  expected="tensors with data", found=f"a meta tensor of shape {tuple(tensor.shape)}")
    for key, tensor in tensors:
        if tensor.numel() == 0:
            continue
        held = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
        if tensor.numel() > held:
            raise CheckpointError("a tensor claims more elements than its storage holds (an overlapping, e.g. "
                                  "stride-0, view): refused before it is materialised", where=f"{key} in {where}",
                                  expected=f"at most {held} elements (its storage)",
                                  found=f"shape {tuple(tensor.shape)}, stride {tensor.stride()}, "
                                        f"{tensor.numel()} elements")


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to `path` atomically (temporary name in the same folder, then rename)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        tmp.chmod(0o666 & ~current_umask())   # safetensors creates its files 0600: the usual modes instead
        os.replace(tmp, path)
    except SafetensorError as e:  # the library's I/O errors (a full disk ...) are not OSErrors
        raise CheckpointError(f"could not write the weights file ({e})", where=str(path),
                              expected="a writable folder with free space for it") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_json(data: dict[str, Any], path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                       token: str | None = None, commit_message: str = "Upload with latentdiff",
                       revision: str | None = None) -> str:
    """Create `repo_id` if needed and upload `folder` to it; returns the commit URL."""
    from huggingface_hub import HfApi

    if is_offline():
        raise CheckpointError("cannot push to the Hub with HF_HUB_OFFLINE=1", where=repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                             revision=revision)
    return str(getattr(info, "commit_url", info))
