"""`latentdiff generate` with Stable Diffusion XL models (issue 18): the refiner hand-off, the micro-conditioning
flags, A1111's clip skip on SDXL, and the SDXL pipeline classes where the command runs image-to-image.

    latentdiff generate "a church at dusk" --model sdxl-base/                        # 1024 px, guidance 5, 50 steps
    latentdiff generate "a church at dusk" --model sdxl-base/ --refiner sdxl-refiner/ --refiner-switch 0.8
    latentdiff generate "a church at dusk" --model sdxl-base/ --original-size 4096x4096 --crop-top-left 0,0

The model's family is read before anything loads (model_index.json's `_class_name`, a single file's tensor names),
so a flag of the other family is an error naming it before the weights are read (the SDXL flags on an SD model).
`--mask` runs `StableDiffusionXLInpaintPipeline`; the hires fix on SDXL is `sdxl_hires_fix`, composed as
`pipelines.hires.hires_fix` composes SD's. The calls themselves (`call_sdxl`, `sdxl_hires_fix`, the refiner's
sampler, clip skip, the family read from the files) are `latentdiff.generation.sdxl` and `.settings`, which the
server uses too; they stay importable from here.

How the refiner takes over from the base (`--refiner-switch`: the fraction of the noise schedule the base denoises)
and how A1111's clip skip counts on SDXL: the docstring of `latentdiff.generation.sdxl`.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..config import is_real
from ..errors import UsageError
from ..generation.sdxl import (  # noqa: F401  (re-exported: they were defined here)
    _PAIR,
    _SIZE,
    CONTROL_ARGUMENTS,
    a1111_clip_layers,
    a1111_clip_skip,
    call_sdxl,
    init_tensor,
    is_sdxl,
    micro_conditioning,
    parse_pair,
    refiner_sampler,
    sdxl_hires_fix,
)
from ..generation.settings import (  # noqa: F401  (re-exported: they were defined here)
    SDXL_CLASS_NAMES,
    SDXL_FILE_PREFIX,
    inpainting_folder,
    model_family,
)
from .generate_a1111 import A1111_REFINER
from .generate_model import ModelSource, locate_model
from .generate_settings import FLAGS, GenerateSettings, warn

SDXL_KEYS = ("refiner", "refiner_switch", "original_size", "target_size", "crop_top_left")
DEFAULT_REFINER_SWITCH = 0.8                   # A1111's and diffusers' examples'


def add_sdxl_flags(gen: argparse.ArgumentParser) -> None:
    group = gen.add_argument_group("SDXL (docs/sdxl.md)")
    add = group.add_argument
    add("--refiner", default=None, metavar="PATH|HUB_ID|FILE",
        help="an SDXL refiner (or any SDXL model) that denoises the end of the schedule: a folder, Hub id or file")
    add("--refiner-switch", type=float, default=None, metavar="F",
        help=f"the fraction of the noise schedule the base denoises before the refiner (default "
             f"{DEFAULT_REFINER_SWITCH}; A1111's 'Refiner switch at')")
    add("--original-size", default=None, metavar="WxH",
        help="SDXL micro-conditioning: the size the image 'was' before cropping (default: the image size)")
    add("--target-size", default=None, metavar="WxH", help="SDXL micro-conditioning: the target size (default: "
                                                           "the image size)")
    add("--crop-top-left", default=None, metavar="TOP,LEFT",
        help="SDXL micro-conditioning: the crop's top-left corner (default 0,0: an uncropped image)")


# ---- before the model loads --------------------------------------------------------------------------------------
def settle_sdxl(args: argparse.Namespace, stored: dict[str, Any], settings: GenerateSettings,
                source: ModelSource) -> GenerateSettings:
    """The SDXL settings checked (values, and against the model's family when the files tell it); defaults
    filled in; the refiner located. A refiner switch a --from PNG holds without its refiner is dropped (an A1111
    PNG's refiner names a model of that machine)."""
    origin = {key: FLAGS[key] if getattr(args, key, None) is not None else f"{args.from_png}: {key}"
              for key in SDXL_KEYS}
    values = {key: getattr(settings, key) for key in SDXL_KEYS}
    if values["refiner_switch"] is not None and values["refiner"] is None:
        if getattr(args, "refiner_switch", None) is not None:
            raise UsageError("--refiner-switch needs --refiner", where="--refiner-switch", expected="--refiner PATH",
                             found=values["refiner_switch"])
        name = stored.get(A1111_REFINER)
        warn(f"{args.from_png} was refined by {'the A1111 model ' + repr(name) if name else 'a model not named'}"
             f", switching at {values['refiner_switch']}: pass --refiner to refine it too")
        values["refiner_switch"] = None
    for key in ("original_size", "target_size"):
        if values[key] is not None:
            parse_pair(values[key], _SIZE, where=origin[key], expected="WIDTHxHEIGHT, e.g. 1024x1024")
    if values["crop_top_left"] is not None:
        parse_pair(values["crop_top_left"], _PAIR, where=origin["crop_top_left"], expected="TOP,LEFT, e.g. 0,0")
    check_family(model_family(source), settings, values, origin)
    switch = values["refiner_switch"]
    if values["refiner"] is not None:
        refiner = values["refiner"]
        if not isinstance(refiner, str) or not refiner or len(refiner) > 4096:
            raise UsageError("bad value for refiner", where=origin["refiner"], expected="a path or Hub id",
                             found=repr(refiner)[:200])
        try:
            found = locate_model(refiner)
        except UsageError as e:
            raise UsageError(e.message, where=origin["refiner"], expected=e.expected, found=refiner) from None
        if model_family(found) == "sd":
            raise UsageError("the refiner must be an SDXL model", where=origin["refiner"],
                             expected="an SDXL refiner (or base) folder, file or Hub id", found=refiner)
        values["refiner"] = found.name     # a local folder or file as its absolute path, a Hub id as given
        if switch is None:
            switch = DEFAULT_REFINER_SWITCH
        if not is_real(switch) or not 0.0 < float(switch) < 1.0:
            raise UsageError("bad value for refiner_switch", where=origin["refiner_switch"],
                             expected="a number strictly between 0 and 1", found=repr(switch))
        values["refiner_switch"] = float(switch)
        for key in ("hires_scale", "mask", "tile_size"):
            if getattr(settings, key) is not None:
                raise UsageError(f"{FLAGS[key]} cannot be combined with --refiner yet", where=FLAGS[key],
                                 expected=f"no {FLAGS[key]} with --refiner", found=repr(getattr(settings, key)))
    return dataclasses.replace(settings, **values)


def check_family(family: str | None, settings: GenerateSettings, values: dict[str, Any],
                 origin: dict[str, str]) -> None:
    """The flags of one family refused on the other (None: not known before loading; `check_loaded` then)."""
    if family == "sd":
        used = [key for key in SDXL_KEYS if values[key] is not None]
        if used:
            raise UsageError(f"{FLAGS[used[0]]} is for SDXL models", where=origin[used[0]],
                             expected="an SDXL --model (its model_index.json names StableDiffusionXLPipeline)",
                             found=settings.model)
    elif family == "sdxl" and settings.hires_scale is not None and settings.tile_size is not None:
        raise UsageError("--tile-size with the SDXL hires fix is not in `latentdiff generate` yet",
                         where=FLAGS["tile_size"], expected="no --tile-size with --hires-scale on SDXL",
                         found=settings.tile_size)


# ---- once the model is loaded --------------------------------------------------------------------------------------
def check_loaded(pipe: Any, settings: GenerateSettings) -> None:
    """The checks `settle_sdxl` could not make before loading (a .ckpt model), and a refiner as --model without
    an image to refine."""
    sdxl = is_sdxl(pipe)
    values = {key: getattr(settings, key) for key in SDXL_KEYS}
    check_family("sdxl" if sdxl else "sd", settings, values, {key: FLAGS[key] for key in SDXL_KEYS})
    if sdxl and pipe.requires_aesthetics_score and settings.init_image is None:
        raise UsageError("this is an SDXL refiner: it refines an image, it does not start from noise",
                         where="--model", expected="an SDXL base with --refiner REFINER, or --init-image",
                         found=settings.model)
    if sdxl and pipe.unet.config.in_channels != pipe.vae.latent_channels and settings.mask is None:
        raise UsageError("this is an SDXL inpainting model: it repaints the masked part of an image",
                         where="--model", expected="--init-image IMAGE --mask MASK (or an SDXL base model)",
                         found=settings.model)
