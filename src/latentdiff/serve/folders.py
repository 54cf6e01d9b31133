"""The server's folders as names: the files and folders a flag's directory lists (`scan_files`), and the check
that a name a client sends is a name, never a path (`refuse_path`)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from .requests import RequestError


@dataclasses.dataclass(frozen=True)
class Entry:
    """A listed file or folder: `name` is what clients see and send, `path` where it is (never shown)."""

    name: str
    path: Path | None               # None: a built-in model or Hub id (located by `model`)
    model: str                      # what locate_model / vae_source take

    @property
    def is_file(self) -> bool:
        return self.path is not None and self.path.is_file()


# ---- scanning folders (one level of sub-folders, as A1111 lists models/Stable-diffusion/sub/x.safetensors) -------
def _children(folder: Path | None) -> list[tuple[str, Path]]:
    """(name relative to folder, path) of the folder's entries and those of its sub-folders, sorted, hidden skipped."""
    if folder is None or not folder.is_dir():
        return []
    found = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        found.append((child.name, child))
        if child.is_dir() and not (child / "model_index.json").is_file():
            try:
                found += [(f"{child.name}/{sub.name}", sub) for sub in sorted(child.iterdir())
                          if not sub.name.startswith(".")]
            except OSError:         # a sub-folder this process may not read: not listed
                continue
    return found


def scan_files(folder: Path | None, suffixes: tuple[str, ...], *, folders_with: str | None = None) -> list[Entry]:
    """The files of `folder` ending in `suffixes`, and the folders holding a `folders_with` file."""
    entries = []
    for name, path in _children(folder):
        if (path.is_file() and path.suffix.lower() in suffixes) or \
                (folders_with is not None and path.is_dir() and (path / folders_with).is_file()):
            entries.append(Entry(name, path, str(path.resolve())))
    return entries


def refuse_path(name: Any, *, field: str, what: str) -> str:
    """`name` if it is a plain relative name; RequestError for an absolute path, `..`, a NUL or a non-string."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise RequestError(f"{what} must be a name", field=field, expected="a name from the list", found=repr(name))
    parts = re.split(r"[\\/]", name)
    if "\x00" in name or name.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise RequestError(f"{what} names a path outside the server's folders; refused", field=field,
                           expected="a name from the list", found=name)
    return name
