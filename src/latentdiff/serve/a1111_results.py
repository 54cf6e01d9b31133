"""A finished job as AUTOMATIC1111's `/sdapi/v1/txt2img` / `img2img` response, and the lists its GET routes return
(samplers, schedulers, upscalers, latent upscale modes) built from latentdiff's own tables.

    {"images": [base64 PNG, ...], "parameters": the request as A1111 echoes it, "info": "<a JSON string>"}

`info` is a JSON *string* (A1111 writes it so; clients json.loads it) with A1111's keys (seed, all_seeds,
all_prompts, infotexts, sd_model_name, ...) plus `ignored`: the request keys accepted and not acted on, and
`interrupted` / `skipped` when /interrupt or /skip cut the job short. With ControlNet units the images are
followed by each unit's hint, as sd-webui-controlnet appends its detected maps.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..diffusion.samplers.names import A1111_ALIASES, A1111_AUTOMATIC, A1111_VARIANTS, accepted_names, has_schedule
from ..pipelines.hires import A1111_UPSCALERS, LATENT_MODES
from ..utils.infotext import A1111_SAMPLER_LABELS, A1111_SCHEDULE_LABELS, a1111_sampler_label, format_infotext
from ..version import __version__
from .a1111_images import encode_png, public_params, save_outputs
from .requests import JobResult

# A1111's API defaults of the keys it echoes in "parameters" (its request models' fields).
TXT2IMG_DEFAULTS: dict[str, Any] = {
    "prompt": "", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "scheduler": None, "batch_size": 1,
    "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": None, "tiling": None,
    "do_not_save_samples": False, "do_not_save_grid": False, "eta": None, "denoising_strength": None,
    "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None, "s_noise": None, "override_settings": None,
    "override_settings_restore_afterwards": True, "refiner_checkpoint": None, "refiner_switch_at": None,
    "disable_extra_networks": False, "firstpass_image": None, "comments": None, "enable_hr": False,
    "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0,
    "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
    "hr_prompt": "", "hr_negative_prompt": "", "force_task_id": None, "sampler_index": "Euler", "script_name": None,
    "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {}, "infotext": None,
}
HIRES_ONLY = ("enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
              "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
              "hr_negative_prompt", "firstpass_image")
IMG2IMG_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in TXT2IMG_DEFAULTS.items() if k not in HIRES_ONLY}, "init_images": None, "resize_mode": 0,
    "denoising_strength": 0.75, "image_cfg_scale": None, "mask": None, "mask_blur_x": 4, "mask_blur_y": 4,
    "mask_blur": None, "mask_round": True, "inpainting_fill": 0, "inpaint_full_res": True,
    "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "initial_noise_multiplier": None, "latent_mask": None,
    "include_init_images": False,
}
TIMESTAMP = "%Y%m%d%H%M%S"     # A1111's job_timestamp


def echo_parameters(body: Mapping[str, Any], *, kind: str) -> dict[str, Any]:
    """The request as A1111 echoes it: its defaults, then the keys sent (img2img's images only with
    include_init_images, as A1111)."""
    echoed = {**(TXT2IMG_DEFAULTS if kind == "txt2img" else IMG2IMG_DEFAULTS), **body}
    if kind == "img2img" and not body.get("include_init_images"):
        echoed["init_images"], echoed["mask"] = None, None
    return echoed


def response_json(result: JobResult, body: Mapping[str, Any], *, kind: str, checkpoint: Mapping[str, Any],
                  outputs_dir: Path | None = None) -> dict[str, Any]:
    """{images, parameters, info} for a finished job; `checkpoint` is the model's /sd-models item (its
    model_name and hash for info). save_images: the PNGs are written to `outputs_dir` first."""
    request = result.request
    if request.save_images and outputs_dir is not None:
        save_outputs([(g.image, g.params, g.seed) for g in result.images], outputs_dir)
    images = [encode_png(g.image, g.params) for g in result.images] if request.send_images else []
    if request.send_images and request.control:   # sd-webui-controlnet appends each unit's hint ("detected map")
        from .controlnet_units import hint_png

        images += [hint_png(unit.hint) for unit in request.control if unit.send_hint]
    return {"images": images, "parameters": echo_parameters(body, kind=kind),
            "info": json.dumps(info(result, body, checkpoint=checkpoint), ensure_ascii=False)}


def info(result: JobResult, body: Mapping[str, Any], *, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A1111's `info` object (before it is made a string)."""
    request = result.request
    first = result.images[0].params if result.images else {}
    sampler = first.get("sampler") or request.sampler
    schedule = first.get("schedule") or request.schedule
    n = request.images
    extra: dict[str, Any] = {}
    if schedule is not None:
        extra["Schedule type"] = A1111_SCHEDULE_LABELS.get(str(schedule), str(schedule))
    if request.hires is not None:
        extra.update({"Hires upscale": request.hires.scale, "Hires upscaler": request.hires.upscaler,
                      "Hires steps": request.hires.steps or request.steps})
    strength = request.hires.strength if request.hires else request.init.strength if request.init else None
    styles = body.get("styles")
    return {
        "prompt": request.prompt, "all_prompts": [request.prompt] * n,
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * n,
        "seed": request.seed, "all_seeds": request.seeds(), "subseed": request.subseed,
        "all_subseeds": request.subseeds(), "subseed_strength": request.subseed_strength,
        "width": request.width, "height": request.height,
        "sampler_name": a1111_sampler_label(str(sampler), first.get("sampler_options")) if sampler else sampler,
        "scheduler": extra.get("Schedule type"),
        "cfg_scale": request.guidance, "steps": request.steps, "batch_size": request.batch_size,
        "n_iter": request.n_iter, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": checkpoint.get("model_name", request.model), "sd_model_hash": checkpoint.get("hash"),
        "sd_vae_name": request.vae, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": strength, "extra_generation_params": extra, "index_of_first_image": 0,
        "infotexts": [format_infotext(public_params(g.params)) for g in result.images],
        "styles": styles if isinstance(styles, list) else [], "job_timestamp": time.strftime(TIMESTAMP),
        "clip_skip": request.clip_skip or 1, "is_using_inpainting_conditioning": False,
        "version": f"latentdiff {__version__}", "ignored": list(request.ignored),
        "cfg_truncation": request.cfg_truncation,   # latentdiff's (the page's "reuse parameters" reads it)
        "interrupted": result.interrupted, "skipped": result.skipped,
    }


# ---- the lists ----------------------------------------------------------------------------------------------------
def samplers() -> list[dict[str, Any]]:
    """/sdapi/v1/samplers: every A1111 label latentdiff implements ({name, aliases, options}), the older
    "<sampler> Karras" / "Exponential" labels included (options: the schedule they imply)."""
    by_label = {label: name for name, label in A1111_SAMPLER_LABELS.items()} | \
        {label: name for label, (name, _) in A1111_VARIANTS.items()}
    aliases: dict[str, list[str]] = {}
    for alias, label in A1111_ALIASES.items():
        aliases.setdefault(label, []).append(alias)
    out = []
    for label in accepted_names()["A1111"]:
        base = label.removesuffix(" Karras").removesuffix(" Exponential")
        name = by_label[base]
        options: dict[str, str] = {}
        if label != base:
            options["scheduler"] = label[len(base) + 1:].lower()
        elif has_schedule(name) and name in A1111_AUTOMATIC:
            options["scheduler"] = A1111_AUTOMATIC[name]
        out.append({"name": label, "aliases": [name, *aliases.get(label, [])], "options": options})
    return out


def schedulers() -> list[dict[str, Any]]:
    """/sdapi/v1/schedulers: A1111's "Schedule type" entries latentdiff implements."""
    rows: list[dict[str, Any]] = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                                   "need_inner_model": False}]
    for name, label in A1111_SCHEDULE_LABELS.items():
        rows.append({"name": label.lower(), "label": label, "aliases": [name] if name != label.lower() else None,
                     "default_rho": 7.0 if name == "karras" else 1.0 if name == "exponential" else -1,
                     "need_inner_model": False})
    return rows


def upscalers() -> list[dict[str, Any]]:
    """/sdapi/v1/upscalers: "None" (a Lanczos resize, as A1111's) and "Lanczos"; the latent modes are listed by
    latent_upscale_modes, as A1111 lists them."""
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0 if name != "None"
             else 1.0} for name in ("None", "Lanczos")]


def latent_upscale_modes() -> list[dict[str, str]]:
    """/sdapi/v1/latent-upscale-modes: the A1111 names of pipelines.hires' latent upscalers."""
    return [{"name": label} for label, name in A1111_UPSCALERS.items() if name in LATENT_MODES]

