"""Where `latentdiff generate`'s model is, found without loading it: a built-in name, a diffusers folder, a Hub id,
or an original single file; with the settings its folder's `latentdiff_generate.json` holds.

Below the command line (it needs only `builtin` and `hub`), so that `latentdiff serve` and the Ray integration find
a model as `latentdiff generate` does without importing `latentdiff.cli`; `cli.generate_model` re-exports it. Its
errors are `UsageError`s naming the command's `--model` flag: a library caller turns them into its own."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from . import builtin, hub
from .builtin import GENERATE_SETTINGS, builtin_names, builtin_path
from .errors import CheckpointError, ConfigError, UsageError

# latentdiff_generate.json key -> the setting it gives ("_"-prefixed keys are comments)
SETTINGS_KEYS = {"num_inference_steps": "steps", "guidance_scale": "guidance", "sampler": "sampler", "eta": "eta",
                 "height": "height", "width": "width", "negative_prompt": "negative"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: kind is "builtin", "folder", "hub" or "single_file"."""

    name: str               # what resolves from anywhere (recorded in the PNG): a local file or folder as an
                            # absolute path, a built-in name or a Hub id as given
    kind: str
    path: Path              # the folder (a Hub snapshot), or the single file
    settings: dict[str, Any]   # {setting: value} from its latentdiff_generate.json, as read (checked in `settle`)


def local_kind(path: str | Path) -> str | None:
    """"file", "dir" or None (nothing there, or a name the OS refuses: too long, a NUL byte ...), never raising:
    the value may come from an untrusted PNG."""
    try:
        path = Path(path).expanduser()
        return "file" if path.is_file() else "dir" if path.is_dir() else "other" if path.exists() else None
    except (OSError, ValueError, RuntimeError):   # ENAMETOOLONG, embedded NUL, ~user that does not exist
        return None


def locate_model(model: str) -> ModelSource:
    """Find the model without loading it: a single file, a folder, a built-in name, or a Hub id."""
    kind = local_kind(model)
    path = Path(model).expanduser() if kind else Path(model)
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if kind != "file":
            raise UsageError("no such checkpoint file", where="--model", expected="an existing .safetensors/.ckpt",
                             found=model)
        return ModelSource(str(path.resolve()), "single_file", path, {})
    if kind == "dir":
        if not (path / "model_index.json").is_file():
            raise UsageError("this folder is not a pipeline folder (no model_index.json)", where=model,
                             expected="a diffusers-format folder")
        return ModelSource(str(path.resolve()), "folder", path, read_settings(path))
    if model in builtin.BUILTIN_MODELS:
        folder = builtin_path(model)
        if folder is None:
            missing = builtin.ROOT / builtin.BUILTIN_MODELS[model] / "model_index.json"
            raise UsageError("the built-in model is not installed in this copy of latentdiff", where=model,
                             expected=str(missing), found="no such file",
                             hint="reinstall latentdiff, or pass --model FOLDER")
        return ModelSource(model, "builtin", folder, read_settings(folder))
    known = f"a built-in model ({', '.join(builtin_names())}), a folder, a .safetensors/.ckpt file, or a Hub id"
    if kind is not None or not hub.is_hub_id(model):
        raise UsageError("no such model folder or file", where="--model", expected=known, found=model)
    folder = find_on_hub(model, known)
    return ModelSource(model, "hub", folder, read_settings(folder))


def find_on_hub(model: str, known: str) -> Path:
    """The Hub snapshot of `model` holding model_index.json (and the generate settings when the repo has them)."""
    hint = f"built-in models: {', '.join(builtin_names())}"
    if hub.is_offline():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model, "model_index.json")
        except ValueError:           # not a valid repo id
            cached = None
        if not isinstance(cached, str):
            raise UsageError("unknown model: not built in, not a folder, and not in the Hub cache (offline)",
                             where="--model", expected=known, found=model, hint=hint)
        return Path(cached).parent
    try:
        return hub.resolve(model, allow_patterns=["model_index.json", GENERATE_SETTINGS])
    except CheckpointError as e:
        raise UsageError(f"unknown model ({e.message})", where="--model", expected=known, found=model,
                         hint=hint) from None


def read_settings(folder: Path) -> dict[str, Any]:
    """latentdiff_generate.json as {setting: value} ({} when the folder has none); unknown keys are errors."""
    where = str(folder / GENERATE_SETTINGS)
    try:
        data = builtin.generate_settings(folder)
    except ConfigError:
        raise
    except (ValueError, OSError) as e:
        raise ConfigError(f"cannot read the model's generate settings ({e})", where=where) from None
    if not isinstance(data, dict):
        raise ConfigError("the model's generate settings are not a JSON object", where=where,
                          expected="an object of settings", found=type(data).__name__)
    unknown = sorted(k for k in data if k not in SETTINGS_KEYS and not k.startswith("_"))
    if unknown:
        raise ConfigError("unknown key(s) in the generate settings", where=where, expected=sorted(SETTINGS_KEYS),
                          found=unknown)
    return {SETTINGS_KEYS[k]: v for k, v in data.items() if k in SETTINGS_KEYS}


def tokenizer_file(source: ModelSource, tokenizer: str | None) -> Path | None:
    """Where the model's `tokenizers` file would be on this machine (None: a single file without --tokenizer)."""
    if source.kind != "single_file":
        return source.path / "tokenizer" / "tokenizer.json"
    return None if tokenizer is None else Path(tokenizer) / "tokenizer.json"
