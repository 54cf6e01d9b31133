"""`latentdiff generate`'s image inputs, hires fix, performance flags and clip skip (issue 15), as A1111 users know
them:

    latentdiff generate "a watercolor" --init-image photo.png --strength 0.6          # img2img
    latentdiff generate "a cat" --init-image photo.png --mask mask.png                # inpainting (white: repaint)
    latentdiff generate "a castle" --hires-scale 2 --hires-strength 0.5                # hires fix
    latentdiff generate "a castle" --clip-skip 2 --vae my-vae/ --threads 4 --vae-tiling

Every file a flag names is checked (it exists, it is an image, the mask has the image's size) before the model
loads. What changes pixels is recorded in the PNG and read back by `--from` (clip skip, the init image and mask as
absolute paths with their sha256, strength, the hires settings, tile size, the VAE, VAE tiling); what changes only
speed is not (threads, offload, attention slicing).

`--clip-skip` counts as A1111 does: 1 = the last layer (no skip), 2 = the penultimate layer, and so on; the
library's `clip_skip=` (diffusers' numbering) is one less (SDXL, which encodes from the penultimate layer: two
less, see generate_sdxl). The PNG records A1111's number (`clip_skip`), the
number A1111's infotext "Clip skip: 2" holds.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import math
import sys
from pathlib import Path
from typing import Any

from .. import hub, limits
from ..config import is_int, is_real
from ..errors import InputError, UsageError
from ..generation.settings import load_vae, vae_source  # noqa: F401  (re-exported: they were defined here)
from .generate_control import control_options
from .generate_model import SINGLE_FILE_SUFFIXES, local_kind
from .generate_prompts import prompt_options
from .generate_sdxl import a1111_clip_layers, a1111_clip_skip, call_sdxl, is_sdxl
from .generate_settings import FLAGS, GenerateSettings, warn
from .generate_tome import apply_tome, fast_call_options

DEFAULT_STRENGTH = 0.75          # A1111's denoising strength of img2img and inpainting
DEFAULT_HIRES_STRENGTH = 0.7     # A1111's denoising strength of the hires pass (pipelines.hires.DEFAULT_STRENGTH)
HIRES_UPSCALERS = ("latent", "latent-nearest", "image")   # pipelines.hires.UPSCALERS (not imported: no torch here)
OFFLOAD_MODES = ("model", "sequential")
IMAGE_KEYS = ("init_image", "mask")
HIRES_KEYS = ("hires_steps", "hires_strength", "hires_upscaler")


def add_input_flags(gen: argparse.ArgumentParser) -> None:
    """The flags of this module, in one group of `latentdiff generate --help`."""
    group = gen.add_argument_group("image inputs, hires fix, performance (docs/cli.md)")
    add = group.add_argument
    add("--init-image", default=None, metavar="PATH", help="img2img: start from this image (its size by default)")
    add("--strength", type=float, metavar="F", default=None,
        help=f"img2img/inpainting denoising strength in (0, 1] (default {DEFAULT_STRENGTH}, as A1111)")
    add("--mask", default=None, metavar="PATH", help="inpainting: white = repaint, black = keep (needs --init-image)")
    add("--hires-scale", type=float, metavar="F", default=None,
        help="hires fix: upscale the first pass by this factor (e.g. 2)")
    add("--hires-steps", type=int, metavar="N", default=None,
        help="hires fix: steps of the second pass (0/absent: --steps)")
    add("--hires-strength", type=float, metavar="F", default=None,
        help=f"hires fix: denoising strength of the second pass (default {DEFAULT_HIRES_STRENGTH})")
    add("--hires-upscaler", metavar="NAME", default=None,
        help=f"hires fix: one of {', '.join(HIRES_UPSCALERS)} (default latent)")
    add("--tile-size", type=int, metavar="N", default=None, help="sample in overlapping tiles of this many pixels")
    add("--vae", default=None, metavar="PATH|HUB_ID|FILE",
        help="replace the model's autoencoder: an AutoencoderKL folder, a single .safetensors/.ckpt file, a Hub id")
    add("--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
        help="decode in tiles (bounded memory for large images; may change pixels slightly)")
    add("--clip-skip", type=int, metavar="N", default=None,
        help="A1111's clip skip: 1 = last layer (default), 2 = penultimate (diffusers' clip_skip=1)")
    add("--threads", type=int, metavar="N", default=None, help="CPU threads torch uses (torch.set_num_threads)")
    add("--offload", default=None, choices=OFFLOAD_MODES,
        help="CUDA only: keep weights on the CPU, move each network (model) or layer (sequential) when it runs")
    add("--attention-slicing", action="store_true", default=False, help="attention in slices (less memory)")


# ---- before the model loads --------------------------------------------------------------------------------------
def set_threads(threads: Any) -> None:
    """--threads: torch.set_num_threads, before anything is loaded."""
    if threads is None:
        return
    if not is_int(threads) or not 1 <= threads <= limits.MAX_THREADS:
        raise UsageError("bad value for --threads", where="--threads",
                         expected=f"an integer in [1, {limits.MAX_THREADS}] (limits.MAX_THREADS)", found=threads)
    import torch

    torch.set_num_threads(threads)


@dataclasses.dataclass(frozen=True)
class InputImages:
    """The init image and mask of a run (PIL images, RGB and L), read and checked before the model loads."""

    init: Any = None
    mask: Any = None


def settle_inputs(args: argparse.Namespace, stored: dict[str, Any],
                  settings: GenerateSettings) -> tuple[GenerateSettings, InputImages]:
    """This module's settings (already picked from flag / --from PNG `stored` by `settle`) checked, their defaults
    filled in, the image files read; a UsageError naming the flag or PNG key before the model loads. With an init
    image, a size only the model's settings gave is dropped: the image's own size is the default."""
    origin = {key: FLAGS[key] if getattr(args, key, None) is not None else f"{args.from_png}: {key}"
              for key in FLAGS}
    values = dataclasses.asdict(settings)
    check_input_values(values, origin)
    images: dict[str, Any] = {}
    for key in IMAGE_KEYS:
        if values[key] is not None:
            path = Path(values[key]).expanduser().resolve()
            images[key], digest = read_image(path, where=origin[key], mode="RGB" if key == "init_image" else "L")
            recorded = values[f"{key}_sha256"]
            if getattr(args, key, None) is None and isinstance(recorded, str) and recorded != digest:
                warn(f"{path} changed since {args.from_png} was made (its sha256 differs): the image will differ")
            values |= {key: str(path), f"{key}_sha256": digest}
        else:
            values[f"{key}_sha256"] = None
    init, mask = images.get("init_image"), images.get("mask")
    if mask is not None and init is not None and mask.size != init.size:
        raise UsageError("the mask must have the init image's size", where=origin["mask"],
                         expected=f"{init.size[0]} x {init.size[1]} (width x height of --init-image)",
                         found=f"{mask.size[0]} x {mask.size[1]}")
    if init is not None:
        for key in ("height", "width"):
            if getattr(args, key, None) is None and stored.get(key) is None:
                values[key] = None
        values["strength"] = DEFAULT_STRENGTH if values["strength"] is None else float(values["strength"])
    if values["hires_scale"] is not None:
        values["hires_strength"] = DEFAULT_HIRES_STRENGTH if values["hires_strength"] is None \
            else float(values["hires_strength"])
        values["hires_upscaler"] = values["hires_upscaler"] or "latent"
        values["hires_scale"] = float(values["hires_scale"])
    if values["vae"] is not None and local_kind(values["vae"]) is not None:
        values["vae"] = str(Path(values["vae"]).expanduser().resolve())   # --from works from anywhere
    check_final_pixels(values, origin, init)
    return GenerateSettings(**values), InputImages(init, mask)


def check_input_values(values: dict[str, Any], origin: dict[str, str]) -> None:
    """Type, range and combination of this module's settings."""
    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise UsageError(f"bad value for {key}", where=origin[key], expected=expected, found=repr(values[key]))

    for key in (*IMAGE_KEYS, "vae"):
        need(values[key] is None or isinstance(values[key], str) and 0 < len(values[key]) <= 4096, key,
             "a path (or, for vae, a Hub id)")
    need(values["clip_skip"] is None or is_int(values["clip_skip"]) and 1 <= values["clip_skip"]
         <= limits.MAX_TEXT_LAYERS, "clip_skip", "an integer >= 1 (A1111's numbering: 1 = the last layer)")
    for key in ("strength", "hires_strength"):
        need(values[key] is None or _finite(values[key]) and 0 < values[key] <= 1, key, "a number in (0, 1]")
    need(values["hires_scale"] is None or _finite(values["hires_scale"]) and
         1 <= values["hires_scale"] <= limits.MAX_HIRES_SCALE, "hires_scale",
         f"a number in [1, {limits.MAX_HIRES_SCALE}] (limits.MAX_HIRES_SCALE)")
    need(values["hires_steps"] is None or is_int(values["hires_steps"]) and
         0 <= values["hires_steps"] <= limits.MAX_STEPS, "hires_steps",
         f"an integer in [0, {limits.MAX_STEPS}] (0: as --steps)")
    need(values["hires_upscaler"] is None or values["hires_upscaler"] in HIRES_UPSCALERS, "hires_upscaler",
         f"one of {list(HIRES_UPSCALERS)}")
    need(values["tile_size"] is None or is_int(values["tile_size"]) and 0 < values["tile_size"] <= limits.MAX_SIDE,
         "tile_size", f"a positive integer, at most {limits.MAX_SIDE}")
    need(values["vae_tiling"] is None or isinstance(values["vae_tiling"], bool), "vae_tiling", "true or false")
    for key in ("init_image_sha256", "mask_sha256"):
        need(values[key] is None or isinstance(values[key], str), key, "a sha256 hex digest")
    needs = [("strength", "init_image"), ("mask", "init_image"), *((key, "hires_scale") for key in HIRES_KEYS)]
    for key, required in needs:
        if values[key] is not None and values[required] is None:
            raise UsageError(f"{FLAGS[key]} needs {FLAGS[required]}", where=origin[key],
                             expected=f"{FLAGS[required]} as well", found=repr(values[key]))
    for key in ("hires_scale", "tile_size"):
        if values[key] is not None and values["init_image"] is not None:
            raise UsageError(f"{FLAGS[key]} is for text-to-image, not with {FLAGS['init_image']}", where=origin[key],
                             expected=f"no {FLAGS[key]} with an init image", found=repr(values[key]))
    vae = values["vae"]
    if vae is not None and local_kind(vae) is None and (Path(vae).suffix in SINGLE_FILE_SUFFIXES
                                                        or not hub.is_hub_id(vae)):
        raise UsageError("no such VAE folder or file", where=origin["vae"],
                         expected="an AutoencoderKL folder, a .safetensors/.ckpt file, or a Hub id", found=vae)


def _finite(value: Any) -> bool:
    try:
        return is_real(value) and math.isfinite(float(value))
    except OverflowError:
        return False


def read_image(path: Path, *, where: str, mode: str) -> tuple[Any, str]:
    """(the image converted to `mode`, the file's sha256); a UsageError for a missing or non-image file."""
    from PIL import Image

    if not path.is_file():
        raise UsageError("no such image file", where=where, expected="an image file (PNG, JPEG, WebP ...)",
                         found=str(path))
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            converted = image.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UsageError(f"cannot read this image ({type(e).__name__})", where=where,
                         expected=f"an image of at most {limits.MAX_IMAGE_PIXELS} pixels (PNG, JPEG, WebP ...)",
                         found=str(path)) from None
    return converted, hashlib.sha256(data).hexdigest()


def check_final_pixels(values: dict[str, Any], origin: dict[str, str], init: Any) -> None:
    """height x width x n of what the run makes (the init image's size by default, times the hires scale) within
    limits.DEFAULT_MAX_PIXELS; a size not known yet (the model's default) is checked by the pipeline."""
    height, width = values["height"], values["width"]
    if init is not None:
        height, width = height or init.size[1], width or init.size[0]
    if height is None or width is None:
        return
    scale = values["hires_scale"] or 1.0
    height, width = int(height * scale), int(width * scale)
    pixels = height * width * values["n"]
    if pixels > limits.DEFAULT_MAX_PIXELS:
        flags = ", ".join(origin[key] for key in ("height", "width", "n", "hires_scale", "init_image")
                          if values[key] is not None)
        raise UsageError("the images of this run are more pixels than one call may generate", where=flags,
                         expected=f"at most {limits.DEFAULT_MAX_PIXELS} (limits.DEFAULT_MAX_PIXELS)",
                         found=f"{height} x {width} x {values['n']} = {pixels}",
                         hint="lower -n, the size or --hires-scale")


# ---- once the model is loaded --------------------------------------------------------------------------------------
def size_from_image(settings: GenerateSettings, images: InputImages, pipe: Any) -> GenerateSettings:
    """height / width not given: the init image's, rounded down to the autoencoder factor (with a note)."""
    if images.init is None or (settings.height is not None and settings.width is not None):
        return settings
    f = pipe.vae_scale_factor
    width, height = images.init.size
    rounded = (max(f, height // f * f), max(f, width // f * f))
    size = (settings.height or rounded[0], settings.width or rounded[1])
    if (settings.height is None and rounded[0] != height) or (settings.width is None and rounded[1] != width):
        print(f"latentdiff: note: the init image is {width} x {height}; generating {size[1]} x {size[0]} "
              f"(multiples of the autoencoder factor {f})", file=sys.stderr)
    return dataclasses.replace(settings, height=size[0], width=size[1])


def prepare_run(pipe: Any, settings: GenerateSettings, images: InputImages, args: argparse.Namespace, *,
                refiner: Any = None) -> Any:
    """The pipeline's switches set, clip skip checked against its text encoder(s), and the callable `run` calls:
    text-to-image, img2img, inpainting or the hires fix with this run's settings (SDXL's, with its `refiner`:
    generate_sdxl)."""
    if settings.clip_skip is not None and settings.clip_skip > 1:
        layers = a1111_clip_layers(pipe)
        if layers is None or settings.clip_skip > layers:
            raise UsageError("clip skip beyond the text encoder's layers" if layers else
                             "this model's text encoder has no layers to skip", where=origin_of(args, "clip_skip"),
                             expected=f"1 .. {layers} (A1111's numbering)" if layers else "--clip-skip 1 (or none)",
                             found=f"{settings.clip_skip} ({type(pipe.text_encoder).__name__})")
    if settings.tile_size is not None:
        try:
            pipe.tiling(settings.tile_size)
        except InputError as e:
            raise UsageError(e.message, where=origin_of(args, "tile_size"), expected=e.expected,
                             found=settings.tile_size) from None
    if args.offload is not None:
        if pipe.device.type != "cuda":
            warn(f"--offload {args.offload} is for CUDA; ignored on the CPU (the weights are in memory already)")
        else:
            getattr(pipe, f"enable_{'model' if args.offload == 'model' else 'sequential'}_cpu_offload")()
    if args.attention_slicing:
        pipe.enable_attention_slicing()
    if settings.vae_tiling:
        pipe.enable_vae_tiling()
    apply_tome(pipe, settings.tome, warn)
    if getattr(args, "optimize_cpu", False):
        apply_cpu_optimization(pipe, refiner, warn)
    return InputsRun(pipe, settings, images, refiner=refiner)


def apply_cpu_optimization(pipe: Any, refiner: Any, warn: Any) -> None:
    """--optimize-cpu: `optimize_for_cpu` on the pipeline (and the SDXL refiner); a warning off the CPU."""
    from ..pipelines.cpu_paths import optimize_for_cpu  # here: the command starts without torch

    if pipe.device.type != "cpu":
        warn(f"--optimize-cpu is for the CPU; ignored on {pipe.device.type}")
        return
    for target in (pipe, refiner):
        if target is not None:
            optimize_for_cpu(target, keep_weights=False)   # the command owns the weights: held once


def origin_of(args: argparse.Namespace, key: str) -> str:
    return FLAGS[key] if getattr(args, key, None) is not None else f"{args.from_png}: {key}"


class InputsRun:
    """`pipe(prompts, **common)` as `run` calls it, routed to the task of the settings; other attributes are the
    pipeline's."""

    def __init__(self, pipe: Any, settings: GenerateSettings, images: InputImages, *, refiner: Any = None):
        self.pipe, self.settings, self.images, self.refiner = pipe, settings, images, refiner
        self.clip_skip = a1111_clip_skip(pipe, settings.clip_skip)   # A1111's numbering -> the pipeline's
        self.control = control_options(settings)   # hints made (Canny ...) and images read once per run, not per call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, prompt: Any, *, height: int, width: int, **common: Any) -> Any:
        s, images = self.settings, self.images
        common["clip_skip"] = self.clip_skip
        common |= prompt_options(s, self.pipe) | self.control | fast_call_options(s)
        if is_sdxl(self.pipe):
            return call_sdxl(self.pipe, self.refiner, s, images, prompt, height=height, width=width, names=FLAGS,
                             **common)
        if s.hires_scale is not None:
            from ..pipelines.hires import hires_fix

            return hires_fix(self.pipe, prompt, scale=s.hires_scale, steps=s.hires_steps,
                             strength=s.hires_strength or DEFAULT_HIRES_STRENGTH, upscaler=s.hires_upscaler or "latent",
                             height=height, width=width, tile_size=s.tile_size, **common)
        if images.mask is not None:
            from ..pipelines.inpaint import InpaintPipeline

            inpaint = InpaintPipeline.from_pipe(self.pipe)
            return inpaint(prompt, images.init, images.mask, height=height, width=width, strength=s.strength,
                           **common)
        if images.init is not None:
            from ..pipelines.image_to_image import ImageToImagePipeline

            img2img = ImageToImagePipeline.from_pipe(self.pipe)
            image = img2img.preprocess_image(images.init, size=(height, width))
            return img2img(prompt, image, strength=s.strength, **common)
        return self.pipe(prompt, height=height, width=width, tile_size=s.tile_size, **common)
