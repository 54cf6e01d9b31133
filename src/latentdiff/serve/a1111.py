"""AUTOMATIC1111's `/sdapi/v1/txt2img` and `/img2img` JSON -> a checked `ImageRequest` (pure: no HTTP, no model).

Every value is checked for its type and range and a bad one is a `RequestError` (HTTP 422) naming the JSON key
(`override_settings.sd_vae`, `init_images[1]`), what was expected and what was found, never a 500. `null` is "not
given", as A1111's API models read it. `alwayson_scripts.controlnet` holds sd-webui-controlnet's units
(serve.controlnet_units). Keys A1111 has and latentdiff does not act on (other alwayson_scripts, restore_faces,
styles, script_name, tiling, s_churn ...), and unknown keys, are accepted and listed in the request's
`ignored`, which the response's `info` reports: nothing is dropped silently.

Defaults, where the request leaves a value out (A1111's API defaults where they make sense for latentdiff):

* width, height: txt2img: the model's own size (A1111's 512 is 8x the built-in model's side); img2img: the first
  init image's, rounded down to a multiple of 8;
* steps 50 (A1111's API default; its UI's is 20), cfg_scale 7.0 (A1111);
* sampler_name: the model's own sampler, its folder's scheduler config (its author chose it; A1111: "Euler");
* seed, subseed -1: drawn in [0, 2**32), as A1111 draws them;
* denoising_strength: 0.7 for the hires pass (pipelines.hires.DEFAULT_STRENGTH), 0.75 for img2img (A1111's UI);
* hr_upscaler "Latent", mask_blur 4 (A1111). inpainting_fill and inpaint_full_res are checked and listed as
  ignored: serve.render inpaints the whole picture, starting from the original image.

`sampler_name` wins over `sampler_index` (A1111: `sampler_name or sampler_index`); both take A1111 labels
("DPM++ 2M Karras", "Euler a", "k_lms" ...), diffusers class names and latentdiff names, with `scheduler`
("Automatic", "Karras", "Exponential", "Uniform") choosing the sigma schedule (diffusion.samplers.names). `eta`
is used by samplers that have one (DDIM); with the others it is listed as ignored (A1111's Euler a has eta 1,
latentdiff's too). `<lora:NAME:W>` tags must name a LoRA the catalog lists (`/sdapi/v1/loras`): a name with a
path in it (`../../etc/passwd`) names none. subseed / subseed_strength are A1111's variation seeds (serve.render).
refiner_checkpoint with refiner_switch_at in (0, 1) hands an SDXL base's latents to an SDXL refiner (as `latentdiff
generate --refiner`; not with the hires fix or a mask, nor on a server with --quantize int8-static: a 422).
SDXL models run the hires fix and inpainting as
`latentdiff generate` does.
`cfg_truncation` (latentdiff's, not A1111's: A1111 ignores it): classifier-free guidance for that fraction of the
steps of each pass only (`pipelines.cfg_truncation`; the hires pass and the refiner count their own steps), a
number in [0, 1], null or absent: every step guided.
CLIP_stop_at_last_layers beyond the model's text encoder (the built-in LDMBert has no layers to skip) is refused in
a request's override_settings and, as the server-wide option an A1111 client set once, listed as ignored.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from typing import Any

from ..adapters.tags import TAG
from ..diffusion.samplers.names import check_schedule, resolve_sampler
from ..errors import InputError
from ..limits import MAX_HIRES_SCALE, MAX_TEXT_LAYERS
from ..pipelines.hires import A1111_UPSCALERS, DEFAULT_STRENGTH, UPSCALERS
from .a1111_images import decode_image
from .body import Body
from .body import show as _show
from .controlnet_units import parse_units, script_args
from .requests import Hires, ImageRequest, InitImages, RequestError
from .settings import ServeSettings
from .switches import static_int8_here

MAX_SEED = 2**63 - 1                 # torch's manual_seed takes any int64; A1111 draws in [0, 2**32)
RANDOM_SEEDS = 2**32
MAX_PROMPT_CHARS = 65_536            # A1111: none; the prompt syntax bounds its chunks further (limits)
MAX_CFG_SCALE = 100.0                # A1111's slider: 1-30
DEFAULT_STEPS = 50                   # A1111's API default
DEFAULT_CFG_SCALE = 7.0
DEFAULT_IMG2IMG_STRENGTH = 0.75
DEFAULT_MASK_BLUR = 4
MAX_MASK_BLUR = 64
SIZE_MULTIPLE = 8                    # A1111's size sliders step by 8 (latent factor of SD)
# "None" in A1111's upscaler list is a plain Lanczos resize of the decoded image: latentdiff's "image" upscaler.
HR_UPSCALERS: dict[str, str] = {**A1111_UPSCALERS, "None": "image", **{name: name for name in UPSCALERS}}
OVERRIDES = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae")   # the settings a request may override
# Keys latentdiff acts on (all others are listed as ignored).
TXT2IMG_KEYS = frozenset({
    "prompt", "negative_prompt", "width", "height", "steps", "cfg_scale", "seed", "subseed", "subseed_strength",
    "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter", "eta", "override_settings",
    "override_settings_restore_afterwards", "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
    "hr_resize_x", "hr_resize_y", "denoising_strength", "send_images", "save_images", "refiner_checkpoint",
    "refiner_switch_at", "cfg_truncation"})
IMG2IMG_KEYS = (TXT2IMG_KEYS - {"enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
                                "hr_resize_y"}) | {"init_images", "mask", "mask_blur", "inpainting_mask_invert",
                                                   "resize_mode", "include_init_images"}
# img2img keys checked and passed on, but listed as ignored: render's inpainting always starts from the original
# image (A1111's inpainting_fill 1) over the whole picture (inpaint_full_res false).



@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What parsing needs to know of a model (asked only when a default or a check needs it: it loads the model)."""

    height: int                       # its own image size
    width: int
    sampler: str                      # its own sampler's registered name
    clip_layers: int | None = None    # the largest A1111 clip skip its text encoders take (None: none)
    sdxl: bool = False                # an SDXL pipeline (the refiner fields take only SDXL models)


ModelDefaults = Callable[[str, "str | None"], ModelFacts]   # (model, vae) -> its facts


@dataclasses.dataclass(frozen=True)
class Options:
    """The server-wide A1111 options a request starts from (`/sdapi/v1/options`; `override_settings` changes them
    for one request)."""

    model: str                        # catalog name (ModelCatalog.current)
    vae: str | None = None            # catalog name, None: the model's own ("Automatic")
    clip_skip: int | None = None      # CLIP_stop_at_last_layers (1 or None: the last layer)


def txt2img_request(data: Any, *, options: Options, catalog: Any, settings: ServeSettings,
                    defaults: ModelDefaults, rng: random.Random | None = None) -> ImageRequest:
    """`/sdapi/v1/txt2img`'s JSON -> ImageRequest (module docstring: defaults, names, what is ignored)."""
    body = Body(data)
    common = _common(body, options=options, catalog=catalog, settings=settings, defaults=defaults, rng=rng)
    hires = _hires(body, common, settings=settings)
    common.pop("facts")
    if hires is not None and common["refiner"] is not None:
        raise RequestError("the hires fix with a refiner is not in the server yet", field="refiner_checkpoint",
                           expected="no refiner with enable_hr", found=common["refiner"])
    control = _control(body, common, catalog=catalog, settings=settings, init_image=None)
    if control and hires is not None:
        raise RequestError("the hires fix with ControlNet units is not in the server yet", field="enable_hr",
                           expected="false with alwayson_scripts.controlnet units", found=True)
    ignored = _ignored(body, TXT2IMG_KEYS, control) + common.pop("ignored")
    if not hires and body.data.get("denoising_strength") is not None:
        ignored.append("denoising_strength")   # A1111 uses it only for the hires pass in txt2img
    return ImageRequest(**common, hires=hires, control=control, ignored=tuple(sorted(set(ignored))),
                        origin="a1111")


def img2img_request(data: Any, *, options: Options, catalog: Any, settings: ServeSettings,
                    defaults: ModelDefaults, rng: random.Random | None = None) -> ImageRequest:
    """`/sdapi/v1/img2img`'s JSON -> ImageRequest with `init` (InitImages): decoded, bounded images."""
    body = Body(data)
    init, size = _init_images(body, settings=settings)
    given = {key: body.data.get(key) is not None for key in ("width", "height")}
    if not all(given.values()):      # the first init image's size, rounded down to A1111's multiple of 8
        width, height = (max(SIZE_MULTIPLE, side // SIZE_MULTIPLE * SIZE_MULTIPLE) for side in size)
        body.data = {**body.data, "width": body.data.get("width") or width,
                     "height": body.data.get("height") or height}
    common = _common(body, options=options, catalog=catalog, settings=settings, defaults=defaults, rng=rng)
    common.pop("facts")
    if init.mask is not None and common["refiner"] is not None:
        raise RequestError("inpainting with a refiner is not in the server yet", field="refiner_checkpoint",
                           expected="no refiner with a mask", found=common["refiner"])
    control = _control(body, common, catalog=catalog, settings=settings, init_image=init.images[0])
    ignored = _ignored(body, IMG2IMG_KEYS, control) + common.pop("ignored")
    if body.flag("include_init_images", False):
        ignored.append("include_init_images")   # the response never carries the inputs back
    return ImageRequest(**common, init=init, control=control, ignored=tuple(sorted(set(ignored))), origin="a1111")


def _control(body: Body, common: dict[str, Any], *, catalog: Any, settings: ServeSettings,
             init_image: Any) -> tuple[Any, ...]:
    """The enabled ControlNet units of alwayson_scripts (serve.controlnet_units), checked against the request's
    model before it is queued; no refiner with them (not composed yet)."""
    units = parse_units(body.raw("alwayson_scripts"), catalog=catalog, width=common["width"],
                        height=common["height"], init_image=init_image, max_bytes=settings.max_image_bytes,
                        pipeline=lambda: catalog.pipeline(common["model"], common["vae"]), ignored=common["ignored"])
    if units and common["refiner"] is not None:
        raise RequestError("a refiner with ControlNet units is not in the server yet", field="refiner_checkpoint",
                           expected="no refiner with alwayson_scripts.controlnet units", found=common["refiner"])
    return units


def _ignored(body: Body, accepted: frozenset[str], control: tuple[Any, ...]) -> list[str]:
    """The body's keys not acted on; with ControlNet units, the other always-on scripts by name."""
    ignored = body.ignored(accepted)
    scripts = body.data.get("alwayson_scripts")
    if isinstance(scripts, dict) and (control or script_args(scripts) is not None):
        ignored.remove("alwayson_scripts")
        ignored += [f"alwayson_scripts.{k}" for k in scripts if str(k).lower() != "controlnet"]
    return ignored


def _common(body: Body, *, options: Options, catalog: Any, settings: ServeSettings, defaults: ModelDefaults,
            rng: random.Random | None) -> dict[str, Any]:
    """The ImageRequest fields txt2img and img2img share, plus "ignored" (keys read and not used)."""
    ignored: list[str] = []
    model, vae, clip_skip = _overrides(body, options, catalog, ignored)
    known: dict[str, ModelFacts] = {}

    def facts() -> ModelFacts:
        if not known:
            known["facts"] = defaults(model, vae)
        return known["facts"]

    clip_skip = _clip_skip(body, clip_skip, facts, ignored)

    prompt = body.text("prompt", "", MAX_PROMPT_CHARS)
    negative = body.text("negative_prompt", "", MAX_PROMPT_CHARS)
    for key, text in (("prompt", prompt), ("negative_prompt", negative)):
        check_lora_tags(text, catalog=catalog, field=key)
    side = settings.max_side
    width = body.integer("width", None, SIZE_MULTIPLE, side)
    height = body.integer("height", None, SIZE_MULTIPLE, side)
    for key, value in (("width", width), ("height", height)):
        if value is not None and value % SIZE_MULTIPLE:
            raise body.bad(key, f"a multiple of {SIZE_MULTIPLE} in [{SIZE_MULTIPLE}, {side}]", value)
    batch_size = body.integer("batch_size", 1, 1, settings.max_images)
    n_iter = body.integer("n_iter", 1, 1, settings.max_images)
    if batch_size * n_iter > settings.max_images:
        raise RequestError("too many images in one request", field="n_iter",
                           expected=f"batch_size x n_iter <= {settings.max_images} (--max-images)",
                           found=f"{batch_size} x {n_iter}")
    images = batch_size * n_iter
    sampler, schedule, sampler_options = _sampler(body, facts)
    eta = body.number("eta", None, 0.0, 1.0)
    if eta is not None and not _has_eta(sampler if sampler is not None else facts().sampler):
        eta = None
        ignored.append("eta")
    save_images = body.flag("save_images", False)
    if save_images and settings.outputs_dir is None:
        ignored.append("save_images")
    subseed_strength = body.number("subseed_strength", 0.0, 0.0, 1.0)
    refiner, switch = _refiner(body, catalog=catalog, facts=facts, defaults=defaults, vae=vae, ignored=ignored)
    return dict(
        model=model, vae=vae, clip_skip=clip_skip, prompt=prompt, negative_prompt=negative,
        width=width if width is not None else facts().width,
        height=height if height is not None else facts().height,
        steps=body.integer("steps", DEFAULT_STEPS, 1, settings.max_steps),
        guidance=body.number("cfg_scale", DEFAULT_CFG_SCALE, 0.0, MAX_CFG_SCALE),
        sampler=sampler, schedule=schedule, sampler_options=sampler_options, eta=eta,
        seed=_seed(body, "seed", images, rng), subseed=_seed(body, "subseed", images, rng),
        subseed_strength=subseed_strength, batch_size=batch_size, n_iter=n_iter,
        cfg_truncation=body.number("cfg_truncation", None, 0.0, 1.0),
        save_images=save_images and settings.outputs_dir is not None, send_images=body.flag("send_images", True),
        refiner=refiner, refiner_switch=switch, ignored=ignored, facts=facts)


def _refiner(body: Body, *, catalog: Any, facts: Callable[[], ModelFacts], defaults: ModelDefaults, vae: str | None,
             ignored: list[str]) -> tuple[str | None, float | None]:
    """(refiner, switch) of A1111's refiner_checkpoint / refiner_switch_at: both given, the switch in (0, 1) and
    both models SDXL; as A1111, no refiner without a switch below 1 (the fields listed as ignored then)."""
    name = body.text("refiner_checkpoint", None)
    switch = body.number("refiner_switch_at", None, 0.0, 1.0)
    if name is None or name.strip() in ("", "None", "none"):
        if switch is not None:
            ignored.append("refiner_switch_at")
        return None, None
    if switch is None or switch >= 1.0:
        ignored.extend(key for key in ("refiner_checkpoint", "refiner_switch_at") if body.data.get(key) is not None)
        return None, None
    if switch <= 0.0:
        raise body.bad("refiner_switch_at", "a number strictly between 0 and 1 (the base's share of the schedule)",
                       switch)
    refiner = catalog.resolve(name, field="refiner_checkpoint")
    if static_int8_here(getattr(catalog, "settings", None)):
        raise RequestError("a refiner on a server with --quantize int8-static is not in the server yet",
                           field="refiner_checkpoint", expected="no refiner here (`latentdiff generate --refiner "
                           "--quantize int8-static` calibrates the refiner behind its base), or --quantize int8",
                           found=name)
    if not facts().sdxl:
        raise RequestError("a refiner follows an SDXL model", field="refiner_checkpoint",
                           expected="no refiner with this (not SDXL) checkpoint", found=name)
    if not defaults(refiner, vae).sdxl:
        raise body.bad("refiner_checkpoint", "an SDXL refiner (or base) checkpoint", name, "not an SDXL checkpoint")
    return refiner, switch


def _seed(body: Body, key: str, images: int, rng: random.Random | None) -> int:
    """-1 (or null): a seed drawn in [0, 2**32) as A1111 draws it; else 0 <= seed, seed + images - 1 <= 2**63 - 1."""
    value = body.integer(key, -1, -1, MAX_SEED - images + 1)
    if value == -1:
        return (rng or random.SystemRandom()).randrange(RANDOM_SEEDS)
    return int(value)


def _sampler(body: Body, facts: Callable[[], ModelFacts]) -> tuple[str | None, str | None, tuple[tuple[str, Any], ...]]:
    """(registered sampler or None = the model's own, schedule or None, the settings its A1111 label fixes) from
    sampler_name / sampler_index / scheduler; an unknown name is a 422 listing the accepted ones."""
    name_key = "sampler_name" if body.data.get("sampler_name") not in (None, "") else "sampler_index"
    other = "sampler_index" if name_key == "sampler_name" else "sampler_name"
    body.raw(other)
    name = body.text(name_key, None)
    scheduler = body.text("scheduler", None)
    try:
        if name is None or not name.strip():
            if scheduler is None:
                return None, None, ()
            resolved = resolve_sampler(facts().sampler, schedule=scheduler, where=name_key,
                                       schedule_where="scheduler")
        else:
            resolved = resolve_sampler(name, schedule=scheduler, where=name_key, schedule_where="scheduler")
        check_schedule(resolved.name, resolved.schedule, where="scheduler")
    except InputError as exc:
        field = str(exc.where) if exc.where in (name_key, "scheduler") else name_key
        raise RequestError(exc.message, field=field, expected=exc.expected, found=exc.found) from None
    return (resolved.name if name else None), resolved.schedule, (resolved.options if name else ())


def _has_eta(sampler: str) -> bool:
    from ..registry import SAMPLERS

    return "eta" in {f.name for f in dataclasses.fields(SAMPLERS.get(sampler))}


def _overrides(body: Body, options: Options, catalog: Any, ignored: list[str]) -> tuple[str, str | None, int | None]:
    """(model, vae, clip_skip): the server's options with this request's `override_settings` (for this request
    only: A1111's override_settings_restore_afterwards, which is always what happens here)."""
    raw = body.raw("override_settings")
    if not body.flag("override_settings_restore_afterwards", True):
        ignored.append("override_settings_restore_afterwards")   # overrides never outlive the request here
    if raw is None:
        return options.model, options.vae, _last_layer(options.clip_skip)
    over = Body(raw, prefix="override_settings.")
    model, vae, clip_skip = options.model, options.vae, options.clip_skip
    if over.data.get("sd_model_checkpoint") is not None:
        model = catalog.resolve(over.text("sd_model_checkpoint", None), field=over.field("sd_model_checkpoint"))
    if over.data.get("sd_vae") is not None:
        vae = catalog.resolve_vae(over.text("sd_vae", None), field=over.field("sd_vae"))
    clip_skip = option_clip_skip(over, clip_skip)
    ignored.extend(over.ignored(frozenset(OVERRIDES)))
    return model, vae, _last_layer(clip_skip)


def _last_layer(clip_skip: int | None) -> int | None:
    """A1111's 1 (the last layer) is None, as every other API sends it: the same batch key."""
    return None if clip_skip == 1 else clip_skip


def _clip_skip(body: Body, clip_skip: int | None, facts: Callable[[], ModelFacts], ignored: list[str]) -> int | None:
    """Clip skip beyond the model's text encoder: a 422 when this request's override_settings asks for it, and
    listed as ignored when it is the server-wide option (set for another model, as A1111 clients do once)."""
    if clip_skip is None:
        return None
    layers = facts().clip_layers
    if layers is not None and clip_skip <= layers:
        return clip_skip
    overrides = body.data.get("override_settings")
    if isinstance(overrides, dict) and overrides.get("CLIP_stop_at_last_layers") is not None:
        raise RequestError("clip skip beyond this model's text encoder layers" if layers else
                           "this model's text encoder has no layers to skip",
                           field="override_settings.CLIP_stop_at_last_layers",
                           expected=f"1 .. {layers} (A1111's numbering)" if layers else "1", found=clip_skip)
    ignored.append("options.CLIP_stop_at_last_layers")
    return None


def option_clip_skip(body: Body, default: int | None) -> int | None:
    """CLIP_stop_at_last_layers (A1111's numbering: 1 = the last layer)."""
    return body.integer("CLIP_stop_at_last_layers", default, 1, MAX_TEXT_LAYERS)


def _hires(body: Body, common: dict[str, Any], *, settings: ServeSettings) -> Hires | None:
    """A1111's hires fix: enable_hr with hr_scale, or hr_resize_x / hr_resize_y (the target size; when both are
    given they must keep the first pass's aspect ratio: A1111 crops, latentdiff does not yet)."""
    keys = ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "denoising_strength")
    if not body.flag("enable_hr", False):
        for key in keys:
            body.raw(key)
        return None
    scale = body.number("hr_scale", 2.0, 1.0, float(MAX_HIRES_SCALE))
    upscaler_name = body.text("hr_upscaler", "Latent")
    if upscaler_name not in HR_UPSCALERS:
        raise body.bad("hr_upscaler", f"one of {sorted(HR_UPSCALERS)}", upscaler_name, "unknown hires upscaler")
    steps = body.integer("hr_second_pass_steps", 0, 0, settings.max_steps)
    strength = body.number("denoising_strength", DEFAULT_STRENGTH, 0.0, 1.0)
    resize_x = body.integer("hr_resize_x", 0, 0, settings.max_side)
    resize_y = body.integer("hr_resize_y", 0, 0, settings.max_side)
    if resize_x or resize_y:
        scale = _resize_scale(body, common["width"], common["height"], resize_x, resize_y)
    return Hires(scale=scale, upscaler=HR_UPSCALERS[upscaler_name], steps=steps or None, strength=strength)


def _resize_scale(body: Body, width: int, height: int, resize_x: int, resize_y: int) -> float:
    """The scale that makes int(side x scale) the hr_resize_x / hr_resize_y A1111 was asked for."""
    side, target, key = (width, resize_x, "hr_resize_x") if resize_x else (height, resize_y, "hr_resize_y")
    scale = target / side
    while int(side * scale) < target:       # target / side x side can fall a hair short in floating point
        scale = math.nextafter(scale, math.inf)
    if not 1.0 <= scale <= MAX_HIRES_SCALE:
        raise body.bad(key, f"between 1x and {MAX_HIRES_SCALE}x the first pass's size ({width}x{height})", target)
    if resize_x and resize_y and int(height * scale) != resize_y:
        raise body.bad("hr_resize_y", f"{int(height * scale)} (the aspect ratio of {width}x{height}; A1111 crops "
                                      f"to another one, latentdiff does not yet), or 0", resize_y)
    return scale


def check_lora_tags(text: str, *, catalog: Any, field: str) -> None:
    """Every `<lora:NAME...>` tag names a LoRA the catalog lists (by name, never a path)."""
    names = [m.group(1).strip() for m in TAG.finditer(text)]
    if not names:
        return
    listed = {str(item.get(key)) for item in catalog.loras() for key in ("name", "alias")}
    for name in names:
        if name not in listed or any(c in name for c in "/\\\x00") or name in (".", ".."):
            raise RequestError("a <lora:...> tag names no LoRA this server has", field=field,
                               expected=f"one of {sorted(listed - {'None'})} (GET /sdapi/v1/loras; "
                                        "POST /sdapi/v1/refresh-loras after adding files)",
                               found=_show(name))


def _init_images(body: Body, *, settings: ServeSettings) -> tuple[InitImages, tuple[int, int]]:
    """init_images (1 to max_images base64 images), mask (inverted and blurred as A1111 does), the strength and
    A1111's inpainting settings -> (InitImages, the first image's (width, height))."""
    raw = body.raw("init_images")
    if not isinstance(raw, list) or not 1 <= len(raw) <= settings.max_images:
        raise body.bad("init_images", f"a list of 1 to {settings.max_images} base64 images", _kind(raw))
    images = tuple(decode_image(item, field=f"init_images[{i}]", max_bytes=settings.max_image_bytes, mode="RGB")
                   for i, item in enumerate(raw))
    mask = None
    if body.data.get("mask") not in (None, ""):
        mask = decode_image(body.raw("mask"), field="mask", max_bytes=settings.max_image_bytes, mode="L")
        if body.flag("inpainting_mask_invert", False):
            from PIL import ImageOps

            mask = ImageOps.invert(mask)
        blur = body.integer("mask_blur", DEFAULT_MASK_BLUR, 0, MAX_MASK_BLUR)
        if blur:
            from PIL import ImageFilter

            mask = mask.filter(ImageFilter.GaussianBlur(blur))
    init = InitImages(images=images, mask=mask,
                      strength=body.number("denoising_strength", DEFAULT_IMG2IMG_STRENGTH, 0.0, 1.0),
                      resize_mode=body.integer("resize_mode", 0, 0, 2),
                      inpainting_fill=body.integer("inpainting_fill", 1 if mask is None else 0, 0, 3),
                      inpaint_full_res=body.flag("inpaint_full_res", False))
    if mask is None:
        for key in ("mask_blur", "inpainting_mask_invert", "inpainting_fill", "inpaint_full_res"):
            body.raw(key)
    return init, images[0].size


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return type(value).__name__ if not isinstance(value, str) else _show(value)

