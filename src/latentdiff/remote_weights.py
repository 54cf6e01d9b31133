"""Published weight files that are not Hub repos (`RemoteFile`: LPIPS, VGG16, FID's Inception): read from a local
file, a URL or the default release, cached once, checked against their published sha256, never downloaded with
HF_HUB_OFFLINE=1; the file is then read by `hub` (safetensors first, pickles only with `weights_only=True`)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .hub import is_offline, load_safetensors, load_torch_pickle

DOWNLOAD_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """A published weights file: its cache name, where to get it, and the sha256 it must have."""

    filename: str
    urls: tuple[str, ...]
    sha256: str | None  # None: a URL the caller chose, no published checksum


def read_state_dict(source: str | os.PathLike | None, *, default: RemoteFile,
                    cache_dir: str | os.PathLike | None = None,
                    known: Sequence[RemoteFile] = ()) -> tuple[dict[str, Any], str]:
    """Read a state dict from a local file, a URL, or (source None) the `default` release. A URL of one of the
    `known` files is cached under its name and checked against its sha256. -> (state, where)"""
    import torch

    if source is None:
        path = download_weights(default, cache_dir=cache_dir)
    elif str(source).startswith(("https://", "http://", "file://")):
        url = str(source)
        match = next((f for f in known if url in f.urls), None)
        suffix = ".safetensors" if urllib.parse.urlparse(url).path.endswith(".safetensors") else ".pth"
        remote = match or RemoteFile(f"url-{hashlib.sha256(url.encode()).hexdigest()[:16]}{suffix}", (url,), None)
        path = download_weights(remote, cache_dir=cache_dir)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise CheckpointError("weights file not found", where=str(path),
                                  expected="an existing .safetensors or .pth file")
    state = load_safetensors(path) if path.suffix == ".safetensors" else load_torch_pickle(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("weights file is not a flat state dict", where=str(path),
                              expected="a dict of name -> tensor", found=type(state).__name__)
    return state, str(path)


def download_weights(remote: RemoteFile, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached copy of `remote` (default folder: torch's hub cache), downloaded first if missing (never with
    HF_HUB_OFFLINE=1). -> local path"""
    import torch

    folder = Path(cache_dir).expanduser() if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / remote.filename
    if path.is_file():
        return path
    how = f"download {remote.urls[0]} yourself and pass its local path, or place it at {path}"
    if is_offline():
        raise CheckpointError("weights are not in the cache and HF_HUB_OFFLINE=1 forbids downloading them",
                              where=remote.urls[0], expected=how)
    failures = []
    for url in remote.urls:
        try:
            _download(url, path, sha256=remote.sha256)
            return path
        except (OSError, CheckpointError) as e:  # URLError, HTTPError and timeouts are OSErrors
            failures.append(f"{url}: {e}")
    raise CheckpointError("could not download weights", where=str(path), expected=how, found="; ".join(failures))


def _download(url: str, path: Path, *, sha256: str | None) -> None:
    """Stream `url` to `path` under a temporary name, hashing as it goes; rename only if the sha256 matches."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise CheckpointError("downloaded file has the wrong sha256 (corrupt or changed upstream)", where=url,
                                  expected=sha256, found=digest.hexdigest())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
