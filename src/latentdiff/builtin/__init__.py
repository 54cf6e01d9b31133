"""Models that ship inside the package: trained by latentdiff itself, loadable offline by a short name.

    LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64")   # the packaged folder, never the Hub
    ControlNet.from_pretrained("latentdiff/shapes-64-silhouette")     # a component folder, the same way
    AutoencoderTiny.from_pretrained("latentdiff/shapes-64-tiny-vae")  # its tiny autoencoder (TAESD), for previews
    pipe.load_lora_weights("latentdiff/shapes-64-lcm-lora")           # a LoRA folder (its LCM-LoRA, docs/lcm.md)

A built-in name resolves to its folder here before any Hub look-up (`hub.resolve`), so it works with the
network off. A pipeline's folder is an ordinary pipeline folder (model_index.json + one subfolder per part)
plus `latentdiff_generate.json`, the settings the model was evaluated at (the `latentdiff generate` defaults);
a component's (the silhouette ControlNet for shapes-64) is a diffusers component folder (config.json + weights).
How they were trained, and how well they do: docs/builtin.md, docs/control.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import parse_json

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = "latentdiff/shapes-64"
# short name -> folder under this package
BUILTIN_MODELS: dict[str, str] = {"latentdiff/shapes-64": "shapes-64"}
# short name -> folder of a built-in component (no pipeline of its own: `latentdiff generate` does not list it)
BUILTIN_COMPONENTS: dict[str, str] = {"latentdiff/shapes-64-silhouette": "shapes-64-silhouette",
                                      "latentdiff/shapes-64-tiny-vae": "shapes-64-tiny-vae",
                                      "latentdiff/shapes-64-lcm-lora": "shapes-64-lcm-lora"}
# built-in model -> the built-in tiny autoencoder (TAESD) of its latent space: previews and `--fast-decode`
BUILTIN_TINY_AUTOENCODERS: dict[str, str] = {"latentdiff/shapes-64": "latentdiff/shapes-64-tiny-vae"}
# what marks a component folder as complete: a diffusers config, or (a LoRA) diffusers' LoRA weight file
COMPONENT_MARKERS = ("config.json", "pytorch_lora_weights.safetensors")
GENERATE_SETTINGS = "latentdiff_generate.json"


def builtin_names() -> list[str]:
    """The built-in model names, sorted."""
    return sorted(BUILTIN_MODELS)


def builtin_path(name: str) -> Path | None:
    """The packaged folder of a built-in model or component name (case as given), or None when `name` is not one."""
    for table, markers in ((BUILTIN_MODELS, ("model_index.json",)), (BUILTIN_COMPONENTS, COMPONENT_MARKERS)):
        folder = table.get(str(name))
        if folder is not None:
            path = ROOT / folder
            return path if any((path / marker).is_file() for marker in markers) else None
    return None


def generate_settings(folder: str | Path) -> dict[str, Any]:
    """The generation defaults a model folder ships (`latentdiff_generate.json`), or {} when it has none."""
    path = Path(folder) / GENERATE_SETTINGS
    if not path.is_file():
        return {}
    return parse_json(path.read_text(encoding="utf-8"), where=str(path))
