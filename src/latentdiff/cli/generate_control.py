"""`latentdiff generate --controlnet MODEL --control KIND:IMAGE[:SCALE[:START:END]]`, `--ip-adapter FILE
--ip-image IMAGE` (issue 19): control for a run.

    latentdiff generate "a church at dusk" --model sd15/ --controlnet control_v11p_sd15_canny.pth \\
        --control canny:photo.png                          # Canny edges of the photo steer the layout
    latentdiff generate "a red circle" --controlnet latentdiff/shapes-64-silhouette --control image:mask.png:1.0:0:0.8
    latentdiff generate "a cat" --model sd15/ --ip-adapter ip-adapter_sd15.safetensors --ip-image style.png

`--controlnet` and `--control` pair up in order (repeat both for several ControlNets). KIND says how the image
becomes the hint: `canny` (edges, `latentdiff.control.canny` at thresholds 100 / 200), `threshold` (a binary
scribble / silhouette, white where the image is light), `image` (the image is the hint already: a depth map, a
pose, a mask). SCALE is `controlnet_conditioning_scale` (default 1), START:END the fraction of the steps it acts on
(default 0:1). `--control-resize` brings the hint to the generation size by A1111's modes (`latentdiff.control`);
`none` refuses a hint of another size. `--controlnet` takes a folder, a Hub id, a built-in name or an original
single file (.pth / .safetensors / .ckpt), a ControlNet or a T2I-Adapter.

Every file is checked before the model loads and recorded in the PNG with its sha256 (`control`, `ip_adapter`),
so `--from` runs the same control again.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

from .. import builtin, hub
from ..errors import UsageError
from .generate_adapters import file_sha256
from .generate_model import local_kind
from .generate_settings import GenerateSettings

KINDS = ("canny", "threshold", "image")
RESIZE = {"just-resize": 0, "crop-and-resize": 1, "resize-and-fill": 2, "none": None}
MAX_CONTROLS = 8
DEFAULT_IP_SCALE = 1.0


def add_control_flags(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--controlnet", action="append", default=None, metavar="MODEL",
                     help="a ControlNet or T2I-Adapter: folder, Hub id, built-in name or original file; repeat for "
                          "several, each paired with a --control in order")
    gen.add_argument("--control", action="append", default=None, metavar="KIND:IMAGE[:SCALE[:START:END]]",
                     help=f"the hint of the --controlnet of the same rank: KIND one of {', '.join(KINDS)}; SCALE "
                          "its conditioning scale (default 1); START:END the fraction of steps it acts on (0:1)")
    gen.add_argument("--control-resize", default=None, choices=sorted(RESIZE),
                     help="how a hint of another size is brought to the image size (A1111's resize modes; default "
                          "just-resize; none: refuse it)")
    gen.add_argument("--guess-mode", action="store_true", default=None,
                     help="ControlNet guess mode: the hint steers without the prompt's help")
    gen.add_argument("--ip-adapter", default=None, metavar="FILE",
                     help="an IP-Adapter (ip-adapter_sd15.safetensors, ...-plus_...): image prompts; with --ip-image")
    gen.add_argument("--ip-image", default=None, metavar="IMAGE", help="the image prompt of --ip-adapter")
    gen.add_argument("--ip-scale", type=float, default=None, help=f"IP-Adapter scale (default {DEFAULT_IP_SCALE})")
    gen.add_argument("--ip-image-encoder", default=None, metavar="FOLDER",
                     help="the CLIP vision encoder of --ip-adapter (folder or Hub id; default: an image_encoder/ "
                          "folder beside the file)")


@dataclasses.dataclass(frozen=True)
class ControlSpec:
    """One --control: how the hint is made, from which image, at which scale and step range."""

    kind: str
    image: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def parse_control(text: str, *, where: str) -> ControlSpec:
    """KIND:IMAGE[:SCALE[:START:END]] -> ControlSpec; the image may itself hold colons (C:\\x.png, a:b.png): the
    numbers are read from the right while they are numbers."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise UsageError("bad --control", where=where, expected=f"KIND:IMAGE[:SCALE[:START:END]], KIND one of "
                         f"{', '.join(KINDS)}", found=text[:200])
    parts = rest.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 3:
        try:
            value = float(parts[-1])
        except ValueError:
            break
        numbers.insert(0, value)
        parts.pop()
    image = ":".join(parts)
    if len(numbers) == 2:     # IMAGE:SCALE:START without END is no form: the last number belongs to the name
        raise UsageError("bad --control: give SCALE, or SCALE:START:END", where=where,
                         expected="KIND:IMAGE[:SCALE[:START:END]]", found=text[:200])
    scale, start, end = (numbers + [1.0, 0.0, 1.0][len(numbers):]) if numbers else (1.0, 0.0, 1.0)
    spec = ControlSpec(kind, image, float(scale), float(start), float(end))
    check_spec(spec, where=where)
    return spec


def check_spec(spec: ControlSpec, *, where: str) -> None:
    if not all(math.isfinite(v) for v in (spec.scale, spec.start, spec.end)):
        raise UsageError("control numbers must be finite", where=where, expected="SCALE, 0 <= START < END <= 1",
                         found=(spec.scale, spec.start, spec.end))
    if not 0.0 <= spec.start < spec.end <= 1.0:
        raise UsageError("a control's step range must satisfy 0 <= START < END <= 1", where=where,
                         expected="0 <= START < END <= 1", found=f"{spec.start}:{spec.end}")


def _model_name(model: str, *, where: str) -> str:
    """A local file or folder as its absolute path (so --from works from anywhere); a built-in name or Hub id as
    given."""
    kind = local_kind(model)
    if kind in ("file", "dir"):
        return str(Path(model).expanduser().resolve())
    if model in builtin.BUILTIN_MODELS or kind is None and hub.is_hub_id(model):
        return model
    raise UsageError("no such ControlNet / adapter", where=where, expected="a folder, an original file, a built-in "
                     "name or a Hub id", found=model)


def _image(path_text: str, *, where: str) -> tuple[str, str]:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise UsageError("no such image file", where=where, expected="an image file (PNG, JPEG, WebP ...)",
                         found=str(path))
    return str(path), file_sha256(path)


def _stored_controls(value: Any, *, where: str) -> list[dict[str, Any]]:
    """A PNG's recorded `control` list, checked (a PNG is untrusted input)."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_CONTROLS:
        raise UsageError("bad value for control", where=where, expected=f"1 to {MAX_CONTROLS} control entries",
                         found=repr(value)[:200])
    keys = {"model", "kind", "image", "image_sha256", "scale", "start", "end"}
    for i, entry in enumerate(value):
        ok = isinstance(entry, dict) and set(entry) - {"type"} == keys and entry["kind"] in KINDS \
            and all(isinstance(entry[k], str) and 0 < len(entry[k]) <= 4096 for k in ("model", "image")) \
            and all(isinstance(entry[k], (int, float)) and not isinstance(entry[k], bool)
                    for k in ("scale", "start", "end"))
        if not ok:
            raise UsageError("bad control entry", where=f"{where}[{i}]",
                             expected=f"an object with {', '.join(sorted(keys))}", found=repr(entry)[:200])
    return value


def settle_control(args: argparse.Namespace, stored: dict[str, Any], settings: GenerateSettings) -> GenerateSettings:
    """--controlnet / --control / --ip-adapter (or the --from PNG's records when no such flag is given) checked:
    the pairs match, the numbers are in range, every file exists; recorded with absolute paths and sha256s."""
    models: list[str] = getattr(args, "controlnet", None) or []
    controls: list[str] = getattr(args, "control", None) or []
    control: list[dict[str, Any]] | None = None
    if models or controls:
        if len(models) != len(controls):
            raise UsageError("each --controlnet needs its --control (paired in order)",
                             where="--control" if models else "--controlnet",
                             expected=f"{len(models)} --control flag(s)",
                             found=f"{len(controls)} --control, {len(models)} --controlnet")
        if len(models) > MAX_CONTROLS:
            raise UsageError("too many ControlNets", where="--controlnet", expected=f"at most {MAX_CONTROLS}",
                             found=len(models))
        control = []
        for model, text in zip(models, controls, strict=True):
            spec = parse_control(text, where=f"--control {text}")
            image, digest = _image(spec.image, where=f"--control {text}")
            control.append({"model": _model_name(model, where=f"--controlnet {model}"), "kind": spec.kind,
                            "image": image, "image_sha256": digest, "scale": spec.scale, "start": spec.start,
                            "end": spec.end})
    elif stored.get("control") is not None:
        where = f"{args.from_png}: control"
        control = []
        for i, entry in enumerate(_stored_controls(stored["control"], where=where)):
            spec = ControlSpec(entry["kind"], entry["image"], float(entry["scale"]), float(entry["start"]),
                               float(entry["end"]))
            check_spec(spec, where=f"{where}[{i}]")
            image, digest = _image(spec.image, where=f"{where}[{i}].image")
            if digest != entry["image_sha256"]:
                from .generate_settings import warn

                warn(f"{image} changed since {args.from_png} was made (its sha256 differs): the image will differ")
            control.append(dict(entry, image=image, image_sha256=digest,
                                model=_model_name(entry["model"], where=f"{where}[{i}].model")))
    resize = getattr(args, "control_resize", None) or stored.get("control_resize")
    if resize is not None and resize not in RESIZE:
        raise UsageError("bad value for control_resize", where=f"{args.from_png}: control_resize",
                         expected=" | ".join(RESIZE), found=repr(resize)[:100])
    guess = getattr(args, "guess_mode", None) or stored.get("guess_mode")
    if (resize is not None or guess) and control is None:
        raise UsageError("--control-resize / --guess-mode need a --controlnet", where="--controlnet",
                         expected="--controlnet MODEL --control KIND:IMAGE", found=None)
    ip_adapter = settle_ip(args, stored)
    if (control or ip_adapter) and settings.hires_scale is not None:
        raise UsageError("the hires fix does not take control yet", where="--hires-scale",
                         expected="no --hires-scale with --controlnet / --ip-adapter", found=settings.hires_scale)
    return dataclasses.replace(settings, control=control, control_resize=resize if control else None,
                               guess_mode=True if guess else None, ip_adapter=ip_adapter)


def settle_ip(args: argparse.Namespace, stored: dict[str, Any]) -> dict[str, Any] | None:
    """--ip-adapter FILE --ip-image IMAGE [--ip-scale S] [--ip-image-encoder FOLDER] (or the PNG's record)."""
    given = {k: getattr(args, k, None) for k in ("ip_adapter", "ip_image", "ip_scale", "ip_image_encoder")}
    if any(v is not None for v in given.values()):
        if given["ip_adapter"] is None or given["ip_image"] is None:
            raise UsageError("--ip-adapter and --ip-image go together", where="--ip-adapter" if
                             given["ip_adapter"] is None else "--ip-image", expected="both flags",
                             found={k: v for k, v in given.items() if v is not None})
        entry: dict[str, Any] = {"path": given["ip_adapter"], "image": given["ip_image"],
                                 "scale": DEFAULT_IP_SCALE if given["ip_scale"] is None else given["ip_scale"],
                                 "image_encoder": given["ip_image_encoder"]}
        where = "--ip-adapter"
    elif stored.get("ip_adapter") is not None:
        entry, where = stored["ip_adapter"], f"{args.from_png}: ip_adapter"
        ok = isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("image"), str) \
            and isinstance(entry.get("scale"), (int, float)) and not isinstance(entry.get("scale"), bool) \
            and (entry.get("image_encoder") is None or isinstance(entry["image_encoder"], str))
        if not ok:
            raise UsageError("bad ip_adapter entry", where=where, expected='{"path", "image", "scale", ...}',
                             found=repr(entry)[:200])
    else:
        return None
    if not math.isfinite(float(entry["scale"])):
        raise UsageError("the IP-Adapter scale must be a finite number", where="--ip-scale", expected="a number",
                         found=entry["scale"])
    path = Path(entry["path"]).expanduser().resolve()
    if not path.is_file():
        raise UsageError("no such IP-Adapter file", where=where, expected="an existing .safetensors / .bin",
                         found=str(path))
    image, digest = _image(entry["image"], where="--ip-image" if where == "--ip-adapter" else f"{where}.image")
    encoder = entry.get("image_encoder")
    if encoder is not None:
        encoder = _model_name(encoder, where="--ip-image-encoder")
    return {"path": str(path), "sha256": file_sha256(path), "image": image, "image_sha256": digest,
            "scale": float(entry["scale"]), "image_encoder": encoder}


# ---- the run: models loaded onto the pipeline, hints made once, the call's arguments --------------------------
def hint_of(entry: dict[str, Any]) -> Any:
    """The hint image of a recorded control entry: its image made into the hint its kind says."""
    from PIL import Image

    from .. import control

    with Image.open(entry["image"]) as image:
        rgb = image.convert("RGB")
    if entry["kind"] == "canny":
        return control.canny(rgb)
    if entry["kind"] == "threshold":
        return control.threshold(rgb)
    return rgb


def load_control_model(name: str, *, where: str, **load: Any) -> Any:
    """`control_pipeline.load_control_network` with its error told as the flag's (a one-line UsageError)."""
    from ..errors import LatentDiffError
    from ..pipelines.control_pipeline import load_control_network

    try:
        return load_control_network(name, **load)
    except LatentDiffError as e:
        raise UsageError(e.message, where=f"{where}: {e.where}" if e.where else where, expected=e.expected,
                         found=e.found) from None


def apply_control(pipe: Any, settings: GenerateSettings) -> tuple[Any, GenerateSettings]:
    """(The pipeline with the run's ControlNets and T2I-Adapters (the same parts otherwise) and its IP-Adapter
    loaded; the settings with each control entry's model type, which the PNG records). A T2I-Adapter acts on every
    step (it has no step range): a range given to one is refused."""
    from ..models.t2i_adapter import T2IAdapter

    if settings.control:
        load = dict(torch_dtype=pipe.unet.dtype, device=pipe.device)
        models = [load_control_model(entry["model"], where=f"--controlnet {entry['model']}", **load)
                  for entry in settings.control]
        for model, entry in zip(models, settings.control, strict=True):
            if isinstance(model, T2IAdapter) and (entry["start"], entry["end"]) != (0.0, 1.0):
                raise UsageError("a T2I-Adapter acts on every step: it takes no START:END", where=f"--control "
                                 f"{entry['kind']}:{entry['image']}", expected="KIND:IMAGE[:SCALE]",
                                 found=f"{entry['start']}:{entry['end']}")
        nets = [m for m in models if not isinstance(m, T2IAdapter)]
        adapters = [m for m in models if isinstance(m, T2IAdapter)]
        parts: dict[str, Any] = {}
        if nets:
            parts["controlnet"] = nets[0] if len(nets) == 1 else nets
        if adapters:
            parts["adapter"] = adapters[0] if len(adapters) == 1 else adapters
        try:
            pipe = type(pipe).from_pipe(pipe, **parts)
        except TypeError:
            raise UsageError("this model's pipeline takes no " + ("T2I-Adapter" if adapters else "ControlNet"),
                             where="--controlnet", expected="a Stable Diffusion model (SDXL: ControlNets only)",
                             found=type(pipe).__name__) from None
        settings = dataclasses.replace(settings, control=[
            dict(entry, type="t2i_adapter" if isinstance(m, T2IAdapter) else "controlnet")
            for m, entry in zip(models, settings.control, strict=True)])
    if settings.ip_adapter:
        if not hasattr(pipe, "load_ip_adapter"):
            raise UsageError("this model's pipeline takes no IP-Adapter", where="--ip-adapter",
                             expected="a Stable Diffusion 1.x model", found=type(pipe).__name__)
        entry = settings.ip_adapter
        encoder = entry["image_encoder"]
        pipe.load_ip_adapter(entry["path"], **({} if encoder is None else {"image_encoder": encoder}))
        pipe.set_ip_adapter_scale(entry["scale"])
    return pipe, settings


def control_options(settings: GenerateSettings) -> dict[str, Any]:
    """The pipeline call's control arguments of the run (none without control): the ControlNets' hints first, then
    the T2I-Adapters' (the pipelines' order), each kind with its scales."""
    out: dict[str, Any] = {}
    if settings.control:
        nets = [e for e in settings.control if e.get("type", "controlnet") == "controlnet"]
        adapters = [e for e in settings.control if e.get("type") == "t2i_adapter"]

        def each(entries: list[dict[str, Any]], key: str) -> Any:
            return entries[0][key] if len(entries) == 1 else [e[key] for e in entries]

        hints = [hint_of(e) for e in nets + adapters]
        out["control_image"] = hints[0] if len(hints) == 1 else hints
        out["control_resize_mode"] = RESIZE[settings.control_resize or "just-resize"]
        if nets:
            out |= {"controlnet_conditioning_scale": each(nets, "scale"),
                    "control_guidance_start": each(nets, "start"), "control_guidance_end": each(nets, "end"),
                    "guess_mode": bool(settings.guess_mode)}
        if adapters:
            out["adapter_conditioning_scale"] = each(adapters, "scale")
    if settings.ip_adapter:
        from PIL import Image

        with Image.open(settings.ip_adapter["image"]) as image:
            out["ip_adapter_image"] = image.convert("RGB")
    return out
