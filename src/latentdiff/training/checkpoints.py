"""Training checkpoints that resume exactly: written atomically, the last K kept, checked on resume.

`checkpoints/checkpoint-00001000/` holds accelerate's `save_state` (optimizers, grad scaler, the RNG states
of every process), the trained modules and the EMA as safetensors, the run's config (`train_config.json`)
and `progress.json` (step, batches consumed, skipped images), written last. The folder is written under a
hidden temporary name and renamed into place: a kill leaves either the old set of checkpoints or the new
one, never a half-written folder that looks complete. accelerate writes its own files as pickles (and
reads them back with weights_only=False): resume only from checkpoints you trust.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from .. import hub
from ..errors import CheckpointError
from .ema import EMA

CHECKPOINT_PREFIX = "checkpoint-"
PROGRESS_FILE = "progress.json"
CONFIG_FILE = "train_config.json"
# Settings whose change would make a resumed run differ from the one it continues (the data section bar the
# loader's worker count and the corrupt-image policy, the model section, and these train keys).
RESUME_FREE_DATA = ("num_workers", "on_corrupt")
RESUME_FIXED_TRAIN = ("seed", "batch_size", "gradient_accumulation_steps")
PROGRESS_COUNTERS = ("step", "batches", "skipped")


class Checkpoints:
    """checkpoint-NNNNNNNN folders under `root`: atomic saves, the last `keep_last` kept, resume look-up."""

    def __init__(self, root: Path, *, keep_last: int):
        self.root, self.keep_last = root, keep_last

    def name(self, step: int) -> Path:
        return self.root / f"{CHECKPOINT_PREFIX}{step:08d}"

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first (a folder counts once its progress file is there)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                 and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / PROGRESS_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def resolve(self, resume: str | None) -> Path | None:
        """resume: None (start fresh), "latest" (the newest complete one, or fresh), or a checkpoint folder."""
        if resume is None:
            return None
        if resume == "latest":
            done = self.complete()
            return done[-1] if done else None
        path = Path(resume)
        if not (path / PROGRESS_FILE).is_file():
            raise CheckpointError("not a complete latentdiff training checkpoint", where=str(path),
                                  expected=f"a {CHECKPOINT_PREFIX}N folder with {PROGRESS_FILE}",
                                  found=sorted(p.name for p in path.iterdir()) if path.is_dir() else "no folder")
        return path

    def save(self, step: int, accelerator: Any, write: Callable[[Path], None]) -> Path:
        """All processes call this. `write(folder)` adds the main process's own files before the rename."""
        final = self.name(step)
        tmp = self.root / f".{final.name}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            write(tmp)
            hub.replace_folder(tmp, final)   # atomic where the OS can; else clean_partial restores the old one
            for stale in self.complete()[:-self.keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def clean_partial(self) -> None:
        """Tidy the hidden folders a killed save left (main process, before training): a checkpoint renamed aside
        just before the crash (`.checkpoint-N.*.old`, its folder missing) is put back; every other leftover
        (unfinished `.checkpoint-N.tmp`, old copies whose checkpoint is in place) is removed."""
        if not self.root.is_dir():
            return
        for p in sorted(self.root.iterdir()):
            if not p.name.startswith(f".{CHECKPOINT_PREFIX}"):
                continue
            final = self.root / p.name[1:].split(".")[0]
            if p.name.endswith(".old") and not final.exists():
                os.rename(p, final)   # the only copy of that checkpoint: an error here must not delete it
                continue
            shutil.rmtree(p, ignore_errors=True)


def save_modules(folder: Path, modules: dict[str, nn.Module], ema: EMA | None, progress: dict[str, Any],
                 config: dict[str, Any]) -> None:
    """The main process's share of a checkpoint: module weights, EMA, progress, config."""
    for name, module in modules.items():
        hub.save_safetensors(module.state_dict(), folder / f"{name}.safetensors")
    if ema is not None:
        state = ema.state_dict()
        hub.save_safetensors(state["shadow"], folder / "ema.safetensors",
                             metadata={"num_updates": str(state["num_updates"]), "decay": str(state["decay"])})
    hub.write_json(config, folder / CONFIG_FILE)
    hub.write_json(progress, folder / PROGRESS_FILE)  # last: its presence marks the folder complete


def load_modules(folder: Path, modules: dict[str, nn.Module], ema: EMA | None) -> dict[str, Any]:
    """Load weights (strictly) and the EMA of a checkpoint; -> its progress dict."""
    from ..models.base import check_state_dict

    for name, module in modules.items():
        state = hub.load_safetensors(folder / f"{name}.safetensors")
        check_state_dict(module, state, source=str(folder / f"{name}.safetensors"))
        module.load_state_dict(state, strict=True)
    if ema is not None:
        path = folder / "ema.safetensors"
        if not path.is_file():
            raise CheckpointError("the checkpoint has no EMA weights but this run keeps an EMA", where=str(folder))
        meta = hub.check_safetensors_header(path).get("__metadata__") or {}
        updates = meta.get("num_updates", "0")
        if not updates.isdigit():
            raise CheckpointError("corrupt EMA metadata", where=f"{path}: num_updates", expected="a whole number",
                                  found=repr(updates)[:60])
        ema.load_state_dict({"shadow": hub.load_safetensors(path), "num_updates": int(updates)})
    return read_progress(folder)


def read_json_file(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file as a dict, or a CheckpointError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError("a checkpoint file is missing", where=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"corrupt checkpoint file: not JSON ({e})", where=str(path)) from None
    if not isinstance(data, dict):
        raise CheckpointError("corrupt checkpoint file: not a JSON object", where=str(path),
                              expected="a JSON object", found=type(data).__name__)
    return data


def read_progress(folder: Path) -> dict[str, Any]:
    """progress.json, its counters checked (whole numbers >= 0)."""
    path = folder / PROGRESS_FILE
    progress = read_json_file(path)
    for key in PROGRESS_COUNTERS:
        value = progress.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError("corrupt progress file", where=f"{path}: {key}", expected="a whole number >= 0",
                                  found=repr(value)[:60])
    return progress


def restore_accelerate_state(accelerator: Any, folder: Path) -> None:
    """accelerate's `load_state` (optimizers, schedulers, scaler, RNG states), any failure a CheckpointError
    naming the file that fails to load (a truncated optimizer.bin, a pickle asking for more than tensors ...)."""
    try:
        accelerator.load_state(str(folder))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 -- torch / pickle / zip errors of every kind, all meaning a bad file
        wanted = re.search(r"GLOBAL ([\w.]+)", str(e))  # a weights-only unpickler's refusal names what was asked
        what = f"refusing to unpickle {wanted.group(1)}; nothing in it was run" if wanted else \
            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        raise CheckpointError(f"cannot restore the training state ({what})", where=_failing_state_file(folder),
                              expected="the files accelerate wrote (resume only from checkpoints you trust)") from None


def _failing_state_file(folder: Path) -> str:
    """The first of accelerate's pickled files in `folder` that does not load (only called after a failure)."""
    from accelerate.utils import load

    for path in sorted(folder.iterdir()):
        if path.suffix in (".bin", ".pkl", ".pt", ".pth"):
            try:
                load(str(path), map_location="cpu")
            except Exception:  # noqa: BLE001 -- this is the one
                return str(path)
    return str(folder)


def check_resumable(saved: dict[str, Any], current: dict[str, Any], *, where: str) -> None:
    """A resumed run must train the same model on the same data with the same batches."""
    def section(config: dict[str, Any], name: str) -> dict[str, Any]:
        value = config.get(name, {})
        return value if isinstance(value, dict) else {"<not a mapping>": repr(value)[:40]}

    def data(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in section(config, "data").items() if k not in RESUME_FREE_DATA}

    pairs = {"data": (data(saved), data(current)), "model": (section(saved, "model"), section(current, "model"))}
    changed = [f"{name}.{k}" for name, (a, b) in pairs.items() for k in sorted(set(a) | set(b))
               if a.get(k) != b.get(k)]
    changed += [f"train.{k}" for k in RESUME_FIXED_TRAIN
                if section(saved, "train").get(k) != section(current, "train").get(k)]
    if changed:
        raise CheckpointError("the config differs from the checkpoint's in settings a resumed run cannot change",
                              where=where, expected="the same data, model, seed and batch settings", found=changed)


# ---- the output folder ------------------------------------------------------------------------------
LOCK_FILE = ".lock"


@contextlib.contextmanager
def output_lock(folder: Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `folder`/.lock (flock: released when the process ends, however it ends): two runs
    writing one output folder at once would interleave checkpoints and replace each other's export. Where flock
    is missing (Windows) this does nothing."""
    try:
        import fcntl
    except ImportError:
        enabled = False
    if not enabled:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise CheckpointError("another training run is writing to this output folder", where=str(folder),
                                  expected="one run per train.output_dir (wait for it, or choose another folder)",
                                  found=f"{folder / LOCK_FILE} held by {holder}") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
