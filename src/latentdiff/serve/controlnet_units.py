"""A1111 requests' `alwayson_scripts.controlnet.args` (sd-webui-controlnet's units) -> checked `ControlRequest`s
with their hints made, before the request is queued; and `POST /controlnet/detect`.

Each unit, as the extension reads it (`internal_controlnet/args.py`):

* `enabled` (default false, as the extension's; disabled units are skipped), `image`: base64 (raw or a data URL),
  `{"image": b64, "mask": b64}`, `[image, mask]` or a list of one such dict; `mask` (also `mask_image`) is read
  and listed as ignored (only the extension's inpainting modules use it); img2img without an image: the first
  init image, as the extension takes it;
* `module` (controlnet.MODULES; an unknown one is a 422 naming it) with `threshold_a` / `threshold_b`;
* `model`: a name of GET /controlnet/model_list, with or without its " [hash]";
* `weight` in [0, 2], `guidance_start` < `guidance_end` in [0, 1] (the pipelines' step rule: diffusers');
* `resize_mode`: "Just Resize" / "Crop and Resize" / "Resize and Fill", the extension's older aliases, or 0 / 1 /
  2 (3, A1111's latent resize, is "Just Resize" as the extension reads it); default "Crop and Resize";
* `control_mode`: "Balanced" (0) or "ControlNet is more important" (2). The extension's 2 is its soft injection
  (residual i of 13 scaled by 0.825^(12 - i)) with the control zeroed on the unconditional half of CFG: diffusers'
  guess mode, whose scales are 10^((i - 12) / 12) = 0.8254^(12 - i) (at most 0.6 % apart), so 2 is guess_mode.
  "My prompt is more important" (1) is soft injection on both halves, which latentdiff's pipelines do not do: a
  422. Guess mode is one setting of a pipeline call: units with different control modes are a 422;
* `pixel_perfect`: accepted; the hint is always made at the generation size (the image is brought to width x
  height by `resize_mode` with latentdiff.control.fit, then the module runs on it), which is what pixel perfect
  asks for; `processor_res` is therefore listed as ignored, as are `low_vram` and the UI-only fields;
  `advanced_weighting`, `effective_region_mask` and `ipadapter_input` are refused when set (not reproduced).

The hint images (the extension's "detected maps") are returned after the generated images, one per unit, unless
the unit's `save_detected_map` is false, as the extension appends them.
"""
from __future__ import annotations

import base64
import dataclasses
from typing import Any

from ..utils.images import png_bytes
from .a1111_images import decode_image
from .body import Body
from .controlnet import MODULES, RESOLUTION, ControlNetCatalog, module_named, run_module
from .requests import RequestError

SCRIPT = "controlnet"               # alwayson_scripts key (A1111 matches script titles case-insensitively)
MAX_UNITS = 8
MAX_WEIGHT = 2.0                    # the extension's Field(ge=0, le=2)
RESIZE_NAMES = {"just resize": 0, "crop and resize": 1, "resize and fill": 2, "inner fit (scale to fit)": 1,
                "outer fit (shrink to fit)": 2, "scale to fit (inner fit)": 1, "envelope (outer fit)": 2}
CONTROL_MODES = {"balanced": 0, "my prompt is more important": 1, "controlnet is more important": 2}
USED = {"enabled", "image", "mask", "mask_image", "module", "model", "weight", "guidance_start", "guidance_end",
        "resize_mode", "control_mode", "threshold_a", "threshold_b", "pixel_perfect", "save_detected_map"}
REFUSED = ("advanced_weighting", "effective_region_mask", "ipadapter_input")


@dataclasses.dataclass(frozen=True, eq=False)
class ControlRequest:
    """One enabled unit, checked: its model's catalog name, the hint at the generation size, scale and range."""

    model: str
    module: str
    hint: Any                       # PIL RGB image at (width, height)
    weight: float
    start: float
    end: float
    guess_mode: bool
    resize_mode: int
    send_hint: bool = True          # save_detected_map: the hint is returned after the images

    def record(self) -> dict[str, Any]:
        """What the PNG records of the unit."""
        return {"model": self.model, "module": self.module, "weight": self.weight, "guidance_start": self.start,
                "guidance_end": self.end, "guess_mode": self.guess_mode, "resize_mode": self.resize_mode}


def script_args(alwayson: Any) -> tuple[str, list[Any]] | None:
    """(the JSON path of the unit list, the units) of a request's alwayson_scripts, None without a ControlNet
    entry (webuiapi sends "ControlNet", others "controlnet")."""
    if not isinstance(alwayson, dict):
        return None
    key = next((k for k in alwayson if isinstance(k, str) and k.lower() == SCRIPT), None)
    if key is None:
        return None
    where = f"alwayson_scripts.{key}"
    entry = alwayson[key]
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list) or len(args) > MAX_UNITS:
        raise RequestError("bad ControlNet script arguments", field=f"{where}.args",
                           expected=f'{{"args": [unit, ...]}} with at most {MAX_UNITS} units', found=repr(entry)[:120])
    return f"{where}.args", args


def parse_units(alwayson: Any, *, catalog: Any, width: int, height: int, init_image: Any, max_bytes: int,
                pipeline: Any, ignored: list[str]) -> tuple[ControlRequest, ...]:
    """The enabled units of `alwayson` (module docstring), hints made and models checked against the pipeline
    (`pipeline()` gives it: loaded only when there is a unit). `ignored` gets the unit keys not acted on."""
    found = script_args(alwayson)
    if found is None:
        return ()
    where, args = found
    units: list[ControlRequest] = []
    for i, raw in enumerate(args):
        body = Body(raw, prefix=f"{where}[{i}].")
        if not body.flag("enabled", False):
            continue
        units.append(_unit(body, catalog=catalog, size=(height, width), init_image=init_image, max_bytes=max_bytes,
                           ignored=ignored))
    if not units:
        return ()
    if len({u.guess_mode for u in units}) > 1:
        raise RequestError("latentdiff runs every ControlNet of a call in one control mode", field=f"{where}",
                           expected="the same control_mode in every enabled unit", found="Balanced and "
                           "ControlNet is more important")
    _check_models(units, catalog=catalog, pipe=pipeline(), where=where, args=args)
    return tuple(units)


def _controlnets(catalog: Any, field: str) -> ControlNetCatalog:
    controlnets = getattr(catalog, "controlnets", None)
    if controlnets is None or not controlnets.folders:
        raise RequestError("this server has no ControlNet models", field=field,
                           expected="a server started with --controlnet-dir DIR", found="a ControlNet unit")
    return controlnets


def _unit(body: Body, *, catalog: Any, size: tuple[int, int], init_image: Any, max_bytes: int,
          ignored: list[str]) -> ControlRequest:
    from ..control import fit

    for key in REFUSED:
        if body.data.get(key) not in (None, [], ""):
            raise body.bad(key, "null (latentdiff does not reproduce it)", body.data[key],
                           f"{key} is not supported by latentdiff's ControlNet units")
    model = _controlnets(catalog, body.field("model")).resolve(body.text("model", None), field=body.field("model"))
    module = module_named(body.text("module", "none"), field=body.field("module"))
    weight = body.number("weight", 1.0, 0.0, MAX_WEIGHT)
    start = body.number("guidance_start", 0.0, 0.0, 1.0)
    end = body.number("guidance_end", 1.0, 0.0, 1.0)
    if start >= end:
        raise body.bad("guidance_end", f"a number greater than guidance_start ({start:g}), at most 1", end,
                       "a ControlNet unit's guidance_start must be below its guidance_end")
    resize = _choice(body, "resize_mode", RESIZE_NAMES, 1, allowed=(0, 1, 2, 3))
    mode = _choice(body, "control_mode", CONTROL_MODES, 0, allowed=(0, 1, 2))
    if mode == 1:
        raise body.bad("control_mode", '"Balanced" (0) or "ControlNet is more important" (2)',
                       body.data["control_mode"],
                       'control_mode "My prompt is more important" (soft injection on both halves of CFG) is not '
                       "reproduced by latentdiff")
    image = _image(body, init_image=init_image, max_bytes=max_bytes)
    thresholds = [body.number(k, None, -1e9, 1e9) for k in ("threshold_a", "threshold_b")]
    body.flag("pixel_perfect", False)
    body.integer("processor_res", None, -1, int(RESOLUTION.maximum) * 4)
    mode_index = 0 if resize == 3 else resize
    hint = run_module(module, fit(image, size, mode=mode_index, name=body.field("image")),
                      threshold_a=thresholds[0], threshold_b=thresholds[1])
    used = USED - (set() if module.sliders else {"threshold_a", "threshold_b"})
    ignored.extend(body.field(k) for k in body.data if k not in used or (k in ("mask", "mask_image")
                                                                        and body.data[k] not in (None, "")))
    return ControlRequest(model, module.name, hint, weight, start, end, guess_mode=mode == 2,
                          resize_mode=mode_index, send_hint=body.flag("save_detected_map", True))


def _choice(body: Body, key: str, names: dict[str, int], default: int, *, allowed: tuple[int, ...]) -> int:
    value = body.raw(key)
    if value is None:
        return default
    if isinstance(value, str) and value.strip().lower() in names:
        return names[value.strip().lower()]
    if isinstance(value, int) and not isinstance(value, bool) and value in allowed:
        return value
    shown = sorted({n.title() for n in names})
    raise body.bad(key, f"one of {shown} or {list(allowed)}", value)


def _image(body: Body, *, init_image: Any, max_bytes: int) -> Any:
    """The unit's RGB image from `image` (module docstring's forms); img2img's first init image without one."""
    raw = body.raw("image")
    field = body.field("image")
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], dict):
        raw, field = raw[0], f"{field}[0]"
    elif isinstance(raw, list) and len(raw) == 2 and all(isinstance(r, (str, type(None))) for r in raw):
        raw = {"image": raw[0], "mask": raw[1]}
    if isinstance(raw, dict):
        if raw.get("mask") not in (None, ""):
            decode_image(raw["mask"], field=f"{field}.mask", max_bytes=max_bytes, mode="L")
        raw, field = raw.get("image"), f"{field}.image"
    if raw in (None, ""):
        if init_image is not None:
            return init_image
        raise RequestError("a ControlNet unit needs an image", field=field,
                           expected="a base64 image (or {\"image\": base64, \"mask\": ...})", found=repr(raw))
    for key in ("mask", "mask_image"):
        if body.data.get(key) not in (None, ""):
            decode_image(body.raw(key), field=body.field(key), max_bytes=max_bytes, mode="L")
    return decode_image(raw, field=field, max_bytes=max_bytes, mode="RGB")


def _check_models(units: list[ControlRequest], *, catalog: Any, pipe: Any, where: str, args: list[Any]) -> None:
    """Each unit's ControlNet loaded (in the pipeline's dtype and device) and made for this base model."""
    from ..errors import ConfigError
    from ..pipelines.control import check_controlnet_fits

    if not hasattr(pipe, "controlnets"):
        raise RequestError("this model's pipeline takes no ControlNet", field=where,
                           expected="a Stable Diffusion (1.x, 2.x, XL) checkpoint", found=type(pipe).__name__)
    controlnets = _controlnets(catalog, where)
    enabled = [i for i, raw in enumerate(args) if isinstance(raw, dict) and raw.get("enabled")]
    for unit, index in zip(units, enabled, strict=True):
        field = f"{where}[{index}].model"
        net = controlnets.load(unit.model, dtype=pipe.unet.dtype, device=pipe.device, field=field)
        try:
            check_controlnet_fits(net, pipe.unet, latent_channels=pipe.vae.latent_channels,
                                  factor=pipe.vae_scale_factor, where=field)
        except ConfigError as e:
            raise RequestError(f"the ControlNet {unit.model!r} is not made for this checkpoint: {e.message}",
                               field=field, expected=e.expected, found=e.found) from None


def controlnets_for(catalog: Any, units: tuple[ControlRequest, ...], pipe: Any) -> list[Any]:
    """The loaded ControlNets of `units`, in order (render's models)."""
    controlnets = _controlnets(catalog, "alwayson_scripts.controlnet")
    return [controlnets.load(u.model, dtype=pipe.unet.dtype, device=pipe.device, field="alwayson_scripts.controlnet")
            for u in units]


def hint_png(image: Any) -> str:
    """A hint as the extension returns its detected maps: a base64 PNG without generation parameters."""
    return base64.b64encode(png_bytes(image)).decode("ascii")


# ---- POST /controlnet/detect --------------------------------------------------------------------------------
def detect(data: Any, *, max_bytes: int, max_pixels: int) -> dict[str, Any]:
    """The extension's /controlnet/detect: {controlnet_module, controlnet_input_images (webuiapi sends
    controlnet_images), controlnet_threshold_a / _b, controlnet_processor_res, controlnet_masks, low_vram} ->
    {"images": [base64 PNG], "info": "Success"}. The module runs on each image at its own size."""
    body = Body(data)
    module = module_named(body.text("controlnet_module", "none"), field="controlnet_module")
    key = "controlnet_input_images" if body.data.get("controlnet_input_images") is not None else "controlnet_images"
    images = body.raw(key)
    if not isinstance(images, list) or not images or len(images) > MAX_UNITS * 8:
        raise body.bad(key, "a list of 1 to 64 base64 images", images, "no image to run the module on")
    a, b = (body.number(k, None, -1e9, 1e9) for k in ("controlnet_threshold_a", "controlnet_threshold_b"))
    body.integer("controlnet_processor_res", None, -1, int(RESOLUTION.maximum) * 4)
    body.raw("controlnet_masks")
    body.flag("low_vram", False)
    out = []
    for i, item in enumerate(images):
        picture = decode_image(item, field=f"{key}[{i}]", max_bytes=max_bytes, max_pixels=max_pixels)
        out.append(hint_png(run_module(module, picture, threshold_a=a, threshold_b=b)))
    return {"images": out, "info": "Success"}


__all__ = ["MODULES", "ControlRequest", "controlnets_for", "detect", "hint_png", "parse_units", "script_args"]
