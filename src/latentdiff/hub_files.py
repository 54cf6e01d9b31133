"""Single files on the Hugging Face Hub: what every `from_single_file` takes besides a local path.

    ControlNet.from_single_file("https://huggingface.co/lllyasviel/ControlNet-v1-1/blob/main/control_v11p_sd15_canny.pth")
    ControlNet.from_single_file("lllyasviel/ControlNet-v1-1/control_v11p_sd15_canny.pth")     # owner/repo/file

`local_file` turns either form into the cached local file (`hf_hub_download`: downloaded once, then read from the
cache; with HF_HUB_OFFLINE=1 only the cache is consulted), as diffusers' `from_single_file` accepts them. A local
path that exists is returned as given; anything else is returned as given too, so the loader's own "not found"
error names it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError
from .hub import is_hub_id, is_offline

# the weight-file suffixes a Hub shorthand "owner/repo/path/file.ext" may end with
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
_URL = re.compile(r"https?://(?:www\.)?huggingface\.co/([^/]+/[^/]+)/(?:blob|resolve)/([^/]+)/(.+)")


def hub_file(name: str) -> tuple[str, str | None, str] | None:
    """(repo id, revision or None, file path in the repo) of a Hub file URL or an "owner/repo/file" shorthand;
    None for anything else (a local path)."""
    match = _URL.fullmatch(name)
    if match:
        repo, revision, filename = match.groups()
        return repo, revision, filename.split("?", 1)[0]
    parts = name.split("/")
    if len(parts) >= 3 and name.endswith(SINGLE_FILE_SUFFIXES) and is_hub_id("/".join(parts[:2])) \
            and not name.startswith((".", "/", "~")) and ".." not in parts:
        return "/".join(parts[:2]), None, "/".join(parts[2:])
    return None


def local_file(path: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
               token: str | bool | None = None, local_files_only: bool | None = None) -> str | os.PathLike:
    """The local file of `path`: itself when it exists (or is no Hub file name), else the Hub file it names,
    downloaded into (or found in) the Hub cache. A CheckpointError names what could not be found and where."""
    name = os.fspath(path)
    if Path(name).expanduser().exists():
        return path
    found = hub_file(name)
    if found is None:
        return path
    repo, url_revision, filename = found
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = is_offline() if local_files_only is None else local_files_only
    try:
        return Path(hf_hub_download(repo, filename, revision=revision or url_revision, token=token,
                                    cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                                    local_files_only=offline))
    except LocalEntryNotFoundError:
        raise CheckpointError("not a local file, and not in the local Hub cache" + (" (offline mode)" if offline
                              else " (the Hub could not be reached)"), where=name,
                              expected=f"{filename} of the Hub repository {repo}, downloaded before",
                              found="nothing in the cache") from None
    except EntryNotFoundError:
        raise CheckpointError("no such file in the Hub repository", where=name, expected=filename,
                              found=f"the repository {repo} without it") from None
    except RepositoryNotFoundError:
        raise CheckpointError("no such Hub repository (or it is private: pass token=)", where=name) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"could not download from the Hub ({type(e).__name__}: {e})", where=name,
                              expected="network access, or HF_HUB_OFFLINE=1 with a cached copy") from None
