"""ControlNets as a pipeline part: the optional `controlnet` component of the Stable Diffusion pipelines, its
folders, and the call arguments that bind it to its hints.

    pipe = LatentDiffusionPipeline.from_pretrained(sd_path, controlnet=cn)         # or [cn1, cn2]
    image = pipe("a church", control_image=edges, controlnet_conditioning_scale=1.0,
                 control_guidance_start=0.0, control_guidance_end=0.8, guess_mode=False).images[0]

Folders as diffusers writes them: one ControlNet in `controlnet/` (model_index.json entry
["diffusers", "ControlNetModel"]); several (diffusers' MultiControlNetModel) in `controlnet/`, `controlnet_1/`,
`controlnet_2/` ... under one entry ["diffusers", "MultiControlNetModel"]. A pipeline with a ControlNet saves under
diffusers' ControlNet pipeline class of its task (`controlnet_class_name`), so diffusers loads the folder as one.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..errors import CheckpointError, ConfigError, InputError
from ..models.controlnet import ControlNet
from .control import Control, ControlNetUnit, check_controlnet_fits, control_settings, prepare_hint
from .folder import FolderPart, library_entry

ControlNets = ControlNet | Sequence[ControlNet] | None
MULTI_ENTRY = ("diffusers", "MultiControlNetModel")


def as_controlnet(value: ControlNets) -> ControlNet | tuple[ControlNet, ...] | None:
    """A ControlNet, a tuple of them (several: multi-ControlNet, each with its own hint), or None; anything else
    is a ConfigError."""
    if value is None or isinstance(value, ControlNet):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, ControlNet) for v in value):
        return tuple(value)
    raise ConfigError("controlnet must be a ControlNet or a non-empty list of them", where="controlnet",
                      expected="ControlNet | list[ControlNet] | None",
                      found=[type(v).__name__ for v in value] if isinstance(value, (list, tuple)) else
                      type(value).__name__)


class MultiControlNetFolders:
    """The loader of a MultiControlNetModel entry: `controlnet/`, `controlnet_1/` ... -> a tuple of ControlNets
    (diffusers reads the numbered folders until one is missing)."""

    @classmethod
    def from_pretrained(cls, root: Path, *, subfolder: str, **load: Any) -> tuple[ControlNet, ...]:
        folders = numbered_folders(root, subfolder, entry="MultiControlNetModel", noun="ControlNet",
                                   argument="controlnet")
        return tuple(ControlNet.from_pretrained(root, subfolder=name, **load) for name in folders)


def numbered_folders(root: Path, subfolder: str, *, entry: str, noun: str, argument: str) -> list[str]:
    """`subfolder`, `subfolder_1`, `subfolder_2` ... as long as they exist (diffusers' layout of several
    ControlNets or adapters under one model_index entry); fewer than two is a CheckpointError naming `entry`."""
    folders = [subfolder] + list(itertools.takewhile(lambda name: (Path(root) / name).is_dir(),
                                                     (f"{subfolder}_{i}" for i in itertools.count(1))))
    if len(folders) < 2:   # a Hub snapshot holds the index's subfolders only: the numbered ones are missing
        raise CheckpointError(f"a {entry} folder needs its numbered {noun} folders",
                              where=str(Path(root) / subfolder), expected=f"{subfolder}_1/ beside {subfolder}/",
                              found=f"{subfolder}/ only (download the whole folder, or pass {argument}=)")
    return folders


CONTROLNET_PART = FolderPart("controlnet", "controlnet", {("diffusers", "ControlNetModel"): ControlNet,
                                                          MULTI_ENTRY: MultiControlNetFolders}, optional=True)


def with_added(control: Control | None, added: tuple[Any, Any] | None) -> Control | None:
    """`control` with SDXL's added_cond of the conditional and unconditional rows (`added`), which ControlNets
    take as the UNet does; unchanged without either (a PromptSchedule hands the UNet its own per step)."""
    if control is None or added is None:
        return control
    return dataclasses.replace(control, added_cond=added[0], added_uncond=added[1])


class ControlNetParts:
    """The ControlNet side of a pipeline with a `unet` and a `vae` (mixed into LatentDiffusionPipeline)."""

    controlnet: ControlNet | tuple[ControlNet, ...] | None = None
    # diffusers' pipeline class of this task with a ControlNet: the `_class_name` saved when one is set
    controlnet_class_name: ClassVar[str] = "StableDiffusionControlNetPipeline"
    # the task's default controlnet_conditioning_scale (its `__call__`'s, diffusers': text-to-image 1.0,
    # image-to-image 0.8, inpainting 0.5)
    default_control_scale: ClassVar[float] = 1.0
    takes_control: ClassVar[bool] = True     # False: a class whose call does not run ControlNets yet

    @property
    def controlnets(self) -> tuple[ControlNet, ...]:
        """The ControlNets in their order (one, several, or none)."""
        cn = self.controlnet
        return () if cn is None else (cn,) if isinstance(cn, ControlNet) else tuple(cn)

    def check_controlnets(self) -> None:
        """Each ControlNet must be made for this base model (`control.check_controlnet_fits`): a ConfigError."""
        pipe: Any = self   # a DenoisingPipeline: its unet, vae and factor
        if self.controlnets and not self.takes_control:
            raise ConfigError(f"{type(self).__name__} does not run ControlNets yet", where="controlnet",
                              expected="controlnet=None (text-to-image runs them)",
                              found=f"{len(self.controlnets)} ControlNet(s)")
        many = not isinstance(self.controlnet, ControlNet)
        for i, cn in enumerate(self.controlnets):
            check_controlnet_fits(cn, pipe.unet, latent_channels=pipe.vae.latent_channels,
                                  factor=pipe.vae_scale_factor, where=f"controlnet[{i}]" if many else "controlnet")

    def control_for_call(self, arguments: Mapping[str, Any], *, height: int, width: int) -> Control | None:
        """`prepare_control` on a `__call__`'s arguments by name (its `locals()`): control_image,
        controlnet_conditioning_scale, control_guidance_start / end, guess_mode, control_resize_mode, and the
        prompt count (prompt or prompt_embeds) and num_images_per_prompt."""
        a = arguments
        prompt, embeds = a.get("prompt"), a.get("prompt_embeds")
        batch = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else \
            (embeds.shape[0] if embeds is not None else 1)
        return self.prepare_control(
            a.get("control_image"), scale=a.get("controlnet_conditioning_scale", self.default_control_scale),
            start=a.get("control_guidance_start", 0.0), end=a.get("control_guidance_end", 1.0),
            guess_mode=a.get("guess_mode", False), resize_mode=a.get("control_resize_mode", 0), height=height,
            width=width, batch=batch, num_images_per_prompt=a.get("num_images_per_prompt", 1))

    def prepare_control(self, control_image: Any, *, scale: float | Sequence[float], start: float | Sequence[float],
                        end: float | Sequence[float], guess_mode: bool, resize_mode: int | None, height: int,
                        width: int, batch: int, num_images_per_prompt: int) -> Control | None:
        """The call's control (None without a ControlNet): the arguments checked against the ControlNets (counts,
        ranges), each hint at height x width, one row per image (`prepare_hint`). Before any model runs."""
        nets = self.controlnets
        if not nets:
            given = {"control_image": control_image is not None, "guess_mode": bool(guess_mode),
                     "controlnet_conditioning_scale": scale != self.default_control_scale,
                     "control_guidance_start": start != 0.0, "control_guidance_end": end != 1.0}
            named = [k for k, v in given.items() if v]
            if named:
                raise InputError("control arguments need a ControlNet: load the pipeline with controlnet=",
                                 where=named[0], expected="a pipeline with a controlnet, or these left out",
                                 found=named)
            return None
        if control_image is None:
            raise InputError("a pipeline with a ControlNet needs a control_image", where="control_image",
                             expected="an image (one per ControlNet: a list)", found=None)
        if not isinstance(guess_mode, bool):
            raise InputError("guess_mode must be True or False", where="guess_mode", expected="bool",
                             found=repr(guess_mode))
        many = not isinstance(self.controlnet, ControlNet)
        settings = control_settings(len(nets), control_image, scale, start, end, multi=many)
        pipe: Any = self
        units = []
        for i, (cn, s) in enumerate(zip(nets, settings, strict=True)):
            hint = prepare_hint(s.image, height=height, width=width, batch=batch,
                                num_images_per_prompt=num_images_per_prompt, resize_mode=resize_mode,
                                name=f"control_image[{i}]" if many else "control_image", device=pipe.device,
                                dtype=cn.dtype)
            units.append(ControlNetUnit(cn, hint, scale=s.scale, start=s.start, end=s.end, guess_mode=guess_mode))
        return Control(tuple(units))

    def write_controlnets(self, folder: Path, *, variant: str | None = None) -> dict[str, list[str]]:
        """Write the ControlNets as diffusers does (module docstring); -> their model_index.json entry."""
        nets = self.controlnets
        if not nets:
            return {}
        if isinstance(self.controlnet, ControlNet):
            self.controlnet.write_files(folder / "controlnet", variant=variant)
            return {"controlnet": library_entry(self.controlnet)}
        for i, cn in enumerate(nets):
            cn.write_files(folder / ("controlnet" if i == 0 else f"controlnet_{i}"), variant=variant)
        return {"controlnet": list(MULTI_ENTRY)}


def _is_adapter_folder(folder: Path) -> bool:
    """Whether a local folder holds a T2I-Adapter (its config.json's class), not a ControlNet."""
    import json

    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name") in ("T2IAdapter", "MultiAdapter")
    except (OSError, ValueError, AttributeError):
        return False


def load_control_network(name: str, **load: Any) -> Any:
    """A ControlNet or a T2I-Adapter from a folder, a Hub id, a built-in name or an original single file (`load`:
    from_pretrained / from_single_file keywords, e.g. torch_dtype, device). A folder says which by its config.json;
    a file or Hub id is read as a ControlNet first, then as a T2I-Adapter (the two layouts share no keys), and the
    ControlNet's error is the one raised when neither reads it. The CLI's `--controlnet` and the server's
    `--controlnet-dir` load through it."""
    from ..errors import LatentDiffError
    from ..models.t2i_adapter import T2IAdapter

    path = Path(name).expanduser()
    try:
        kind = "file" if path.is_file() else "dir" if path.is_dir() else None
    except OSError:   # a name the OS refuses (too long ...): not local
        kind = None
    if kind == "dir" and _is_adapter_folder(path):
        return T2IAdapter.from_pretrained(name, **load)

    def read(cls: Any) -> Any:
        return cls.from_single_file(name, **load) if kind == "file" else cls.from_pretrained(name, **load)

    try:
        return read(ControlNet)
    except LatentDiffError as first:
        if kind == "dir":
            raise
        try:
            return read(T2IAdapter)
        except LatentDiffError:
            raise first from None
