"""ControlNets in the server, as AUTOMATIC1111's sd-webui-controlnet extension exposes them: the models of
`--controlnet-dir` and the preprocessors ("modules") it runs.

Models: the ControlNet files (.safetensors, .pth, .ckpt, .pt, .bin) and diffusers ControlNet folders (a
`config.json`) of each `--controlnet-dir` and its sub-folders (one level, as the other folders), listed as the
extension lists them: `"<stem> [<hash>]"`, the hash being A1111's short model hash (the first 8 hex digits of the
sha256 of 64 KiB at offset 1 MiB: cheap on multi-GB files; folders have none). A request names a model with or
without its "[hash]" (case-insensitive, as the extension looks names up); a hash that differs from the file's, a
path, or an unknown name is a RequestError naming the field. Models load on first use
(`pipelines.control_pipeline.load_control_network`: folders and original single files), in the pipeline's dtype and
device, and the MAX_LOADED used last stay loaded.

Modules: the extension's model-free preprocessors latentdiff reproduces (`MODULES`), each with the extension's
slider ranges and defaults: a threshold outside its slider's range takes the slider's default, as the extension
resets it (`bound_check_params`).

    none       the image is the hint
    canny      cv2.Canny on the RGB image, thresholds threshold_a (low) / threshold_b (high): latentdiff.control.canny
               with grayscale=False (the extension's call, not the grayscale one)
    threshold  white where every channel is above threshold_a (the extension's rule: the minimum over R, G, B)
    invert     255 - image (white lines on black from black lines on white: scribbles, line art)
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .folders import refuse_path, scan_files
from .requests import RequestError

CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")   # the extension's CN_MODEL_EXTS
MAX_LOADED = 4                      # ControlNets kept loaded (least recently used dropped first)
NAME_HASH = re.compile(r"^(?P<name>.+?)\s*\[(?P<hash>[0-9a-fA-F]{8,10})\]$")
API_VERSION = 3                     # the extension's get_api_version() of the routes reproduced here


@dataclasses.dataclass(frozen=True)
class Slider:
    """One of a module's sliders, with the extension's label, range and default (its `api_json`)."""

    label: str
    minimum: float
    maximum: float
    default: float
    step: float = 1.0

    def value(self, given: float | None) -> float:
        """The extension's rule: a value outside the range (its -1 "not given" included) is the default."""
        return self.default if given is None or not self.minimum <= given <= self.maximum else float(given)

    def api_json(self) -> dict[str, Any]:
        return {"name": self.label, "value": self.default, "min": self.minimum, "max": self.maximum,
                "step": self.step}


RESOLUTION = Slider("Resolution", 64, 2048, 512, 8)


@dataclasses.dataclass(frozen=True)
class Module:
    name: str
    label: str                      # the extension's alias (its UI name)
    sliders: tuple[Slider, ...] = ()   # threshold_a, threshold_b
    resolution: bool = False        # shows the processor resolution slider


MODULES: dict[str, Module] = {m.name: m for m in (
    Module("none", "none"),
    Module("canny", "canny", (Slider("Low Threshold", 1, 255, 100), Slider("High Threshold", 1, 255, 200)), True),
    Module("threshold", "threshold", (Slider("Binarization Threshold", 0, 255, 127),), True),
    Module("invert", "invert (from white bg & black line)"),
)}
MODULE_NAMES = {**{m.label: m.name for m in MODULES.values()}, **{name: name for name in MODULES}}


def module_named(name: Any, *, field: str) -> Module:
    """The module a request names (its name or its UI label); a RequestError listing those there are."""
    found = MODULE_NAMES.get(name) if isinstance(name, str) else None
    if found is None:
        raise RequestError("unknown ControlNet module (preprocessor)", field=field,
                           expected=f"one of {sorted(MODULES)} (GET /controlnet/module_list; latentdiff runs the "
                                    "model-free ones: send other hints as images with module \"none\")",
                           found=repr(name)[:120])
    return MODULES[found]


def run_module(module: Module, image: Image.Image, *, threshold_a: float | None = None,
               threshold_b: float | None = None) -> Image.Image:
    """The hint `module` makes of an RGB image (module docstring), at the image's size."""
    from ..control import canny

    if module.name == "canny":
        low, high = (s.value(v) for s, v in zip(module.sliders, (threshold_a, threshold_b), strict=True))
        return canny(image, low=int(low), high=int(high), grayscale=False)   # the extension's int() of the sliders
    rgb = np.asarray(image.convert("RGB"))
    if module.name == "threshold":
        level = module.sliders[0].value(threshold_a)
        mask = rgb.min(axis=2) > level
        return Image.fromarray(np.repeat((mask * np.uint8(255))[:, :, None], 3, axis=2), "RGB")
    if module.name == "invert":
        return Image.fromarray(255 - rgb, "RGB")
    return image.convert("RGB")


def module_list(*, alias_names: bool) -> dict[str, Any]:
    """GET /controlnet/module_list: {"module_list": names, "module_detail": {name: {model_free, sliders}}}."""
    names = [m.label if alias_names else m.name for m in MODULES.values()]
    detail = {}
    for name, module in zip(names, MODULES.values(), strict=True):
        sliders = ([RESOLUTION] if module.resolution else []) + list(module.sliders)
        detail[name] = {"model_free": True, "sliders": [s.api_json() for s in sliders]}
    return {"module_list": names, "module_detail": detail}


def short_hash(path: Path) -> str:
    """A1111's short model hash (sd_models.model_hash): sha256 of 64 KiB at offset 1 MiB, 8 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        digest.update(f.read(0x10000))
    return digest.hexdigest()[:8]


class ControlNetCatalog:
    """The ControlNets of `--controlnet-dir` (module docstring): names, and the models loaded (an LRU)."""

    def __init__(self, folders: tuple[Path, ...]):
        self.folders = tuple(Path(f) for f in folders)
        self._lock = threading.Lock()
        self._loaded: collections.OrderedDict[tuple[str, str, str], Any] = collections.OrderedDict()

    def entries(self) -> dict[str, tuple[Path, str | None]]:
        """name (the file's stem, or the folder's name) -> (path, short hash or None); the first folder wins."""
        found: dict[str, tuple[Path, str | None]] = {}
        for folder in self.folders:
            for entry in scan_files(folder, CONTROLNET_SUFFIXES, folders_with="config.json"):
                path = entry.path
                assert path is not None
                if path.is_file() and path.parent != folder and (path.parent / "config.json").is_file():
                    continue           # the weights of a diffusers folder (listed as the folder)
                name = Path(entry.name).stem if path.is_file() else Path(entry.name).name
                if name == "None" or name in found:
                    continue
                try:
                    found[name] = (path, short_hash(path) if path.is_file() else None)
                except OSError:        # unreadable since the scan: not listed
                    continue
        return found

    def model_list(self) -> list[str]:
        """GET /controlnet/model_list's names: "<name> [<hash>]" (a folder: its name)."""
        return [f"{name} [{digest}]" if digest else name for name, (_, digest) in self.entries().items()]

    def resolve(self, name: Any, *, field: str) -> str:
        """The listed name `name` spells: with or without its " [hash]", any case; RequestError otherwise."""
        refuse_path(name, field=field, what="a ControlNet model")
        entries = self.entries()
        match = NAME_HASH.match(name.strip())
        bare = match["name"] if match else name.strip()
        found = bare if bare in entries else next((n for n in entries if n.lower() == bare.lower()), None)
        if found is None:
            shown = self.model_list()
            raise RequestError("unknown ControlNet model", field=field,
                               expected=f"one of {shown[:50]} (GET /controlnet/model_list; --controlnet-dir)"
                               if shown else "a model of --controlnet-dir (this server has none)", found=name)
        digest = entries[found][1]
        if match and digest is not None and not digest.startswith(match["hash"].lower()[:8]):
            raise RequestError("the ControlNet model's hash differs from the name's", field=field,
                               expected=f"{found} [{digest}]", found=name)
        return found

    def load(self, name: str, *, dtype: Any, device: Any, field: str) -> Any:
        """The ControlNet `name` (a resolved name) in `dtype` on `device`, loaded once while it stays among the
        MAX_LOADED used last."""
        from ..errors import LatentDiffError
        from ..pipelines.control_pipeline import load_control_network

        key = (name, str(dtype), str(device))
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
        path = self.entries()[name][0]
        try:
            model = load_control_network(str(path), torch_dtype=dtype, device=device)
        except LatentDiffError as e:
            raise RequestError(f"the ControlNet model does not load: {e.message}", field=field,
                               expected=e.expected, found=e.found) from None
        with self._lock:
            self._loaded[key] = model
            while len(self._loaded) > MAX_LOADED:
                self._loaded.popitem(last=False)
        return model
