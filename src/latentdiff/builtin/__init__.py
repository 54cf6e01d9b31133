"""Models that ship inside the package: trained by latentdiff itself, loadable offline by a short name.

    LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64")   # the packaged folder, never the Hub

A built-in name resolves to its folder here before any Hub look-up (`hub.resolve`), so it works with the
network off. Each folder is an ordinary pipeline folder (model_index.json + one subfolder per part) plus
`latentdiff_generate.json`, the settings the model was evaluated at (the `latentdiff generate` defaults).
How shapes-64 was trained, and how well it does: docs/builtin.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import parse_json

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = "latentdiff/shapes-64"
# short name -> folder under this package
BUILTIN_MODELS: dict[str, str] = {"latentdiff/shapes-64": "shapes-64"}
GENERATE_SETTINGS = "latentdiff_generate.json"


def builtin_names() -> list[str]:
    """The built-in model names, sorted."""
    return sorted(BUILTIN_MODELS)


def builtin_path(name: str) -> Path | None:
    """The packaged folder of a built-in model name (case as given), or None when `name` is not one."""
    folder = BUILTIN_MODELS.get(str(name))
    if folder is None:
        return None
    path = ROOT / folder
    return path if (path / "model_index.json").is_file() else None


def generate_settings(folder: str | Path) -> dict[str, Any]:
    """The generation defaults a model folder ships (`latentdiff_generate.json`), or {} when it has none."""
    path = Path(folder) / GENERATE_SETTINGS
    if not path.is_file():
        return {}
    return parse_json(path.read_text(encoding="utf-8"), where=str(path))
