"""Folders written atomically: a save goes to a hidden temporary folder beside its destination, which then takes
the destination's place in one step, so a reader (or a crash) sees the old folder or the new one, never half of
either; and what a killed save left beside it is tidied by the next save or load (`recover_folder`).

    with atomic_folder(dest) as tmp:      # write into tmp; on success tmp becomes dest
        ...

`hub` re-exports these names (`hub.atomic_folder` is how the rest of the package calls them).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success it replaces `dest` in one step (`replace_folder`).

    If the body raises (or the process dies), `dest` is untouched and the temporary folder is removed (or left
    under a hidden `.name.ld-<pid>-*.tmp` name, never mistaken for the checkpoint, and removed by the next save of
    the same `dest` once its writer is gone: `recover_folder`). The folder gets the usual modes (0755 / 0644 under
    a 022 umask), not the 0700 of a private temporary folder: a re-saved shared model stays readable by the
    accounts that read it before.
    """
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(dest)
    tmp = dest.with_name(_sibling_name(dest, "tmp"))
    tmp.mkdir()
    try:
        yield tmp
        tmp.chmod(0o777 & ~current_umask())
        replace_folder(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# renameat2(2) flag: swap two paths atomically (Linux 3.15+, glibc 2.28+; not every file system)
RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` in one atomic step (renameat2 RENAME_EXCHANGE). -> False where that is not available
    (another OS, an old libc or kernel, a file system without it): the caller falls back to two renames."""
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_folder(new: Path, dest: Path) -> None:
    """Put the finished folder `new` at `dest`, deleting what was there. Where the OS can, the two are exchanged
    in one atomic step (a crash leaves the old or the new folder at `dest`, never nothing); elsewhere the old one
    is renamed aside to `.dest.ld-<pid>-*.old` first, and `recover_folder` brings it back after a crash between
    the two renames."""
    if dest.exists() or dest.is_symlink():
        if exchange(new, dest):
            shutil.rmtree(new, ignore_errors=True)   # `new` now holds the old folder
            return
        old = dest.with_name(_sibling_name(dest, "old"))
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)


# A hidden sibling of a save: `.dest.ld-<pid>-<random>.tmp|old` (the writer's pid in the name), or the names of
# latentdiff before (`.dest.<mkdtemp>.tmp`, `.dest.<uuid hex>.old`), which count as abandoned after a day.
_SIBLING = re.compile(r"^ld-(?P<pid>\d+)-[A-Za-z0-9_]+\.(?:tmp|old)$|^(?:[A-Za-z0-9_]{8}\.tmp|[0-9a-f]{32}\.old)$")
STALE_WITHOUT_PID_S = 24 * 3600


def _sibling_name(dest: Path, kind: str) -> str:
    return f".{dest.name}.ld-{os.getpid()}-{uuid.uuid4().hex[:12]}.{kind}"


def _save_siblings(dest: Path) -> dict[Path, int | None]:
    """The hidden leftovers of saves of `dest` beside it -> their writer's pid (None: an older name)."""
    prefix = f".{dest.name}."
    try:
        names = [n for n in os.listdir(dest.parent) if n.startswith(prefix)]
    except OSError:
        return {}
    found = {}
    for name in names:
        m = _SIBLING.match(name[len(prefix):])
        if m:
            found[dest.parent / name] = int(m["pid"]) if m["pid"] else None
    return found


def _writer_gone(path: Path, pid: int | None) -> bool:
    """Whether the save that left `path` is over: its process is not running (a name without a pid: a day old)."""
    if pid is None:
        import time

        try:
            return time.time() - path.lstat().st_mtime > STALE_WITHOUT_PID_S
        except FileNotFoundError:
            return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another account's process: running
        return False
    return False


def recover_folder(dest: str | os.PathLike) -> bool:
    """Tidy what a killed save of `dest` left beside it: when `dest` is missing, the newest `.dest.*.old` (the
    previous folder, renamed aside just before the crash) is renamed back; hidden `.tmp` / `.old` siblings whose
    writer is gone are deleted. Called by every save (`atomic_folder`) and every load of a local folder
    (`resolve`). -> whether a folder was restored."""
    dest = Path(dest).absolute()
    siblings = _save_siblings(dest)
    if not siblings:
        return False
    restored = False
    if not dest.exists() and not dest.is_symlink():
        olds = sorted((p for p in siblings if p.name.endswith(".old")), key=lambda p: p.lstat().st_mtime,
                      reverse=True)
        for old in olds:   # an old folder is the only copy left: restored whatever its age
            if siblings[old] is None or _writer_gone(old, siblings[old]):
                try:
                    os.rename(old, dest)
                except OSError:
                    continue
                restored = True
                break
    for path, pid in siblings.items():
        if (dest.exists() or path.name.endswith(".tmp")) and os.path.lexists(path) and _writer_gone(path, pid):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    return restored


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting (not thread-safe, but only on the save path)
    os.umask(mask)
    return mask
