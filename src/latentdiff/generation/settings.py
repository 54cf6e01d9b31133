"""The settings of one image-generation run, as `latentdiff generate` records them in every PNG and `--from` reads
them back: a typed, frozen `GenerateSettings`. The command line settles them from its flags (`cli.generate_settings`,
which re-exports these names); the server builds them for the pipelines it loads (`serve.models`). Both load the
pipeline with `load_pipeline`: the model's family read from its files first (`model_family`, without loading), then
its dtype, device, VAE, sampler and sigma schedule.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from ..errors import UsageError
from ..model_source import ModelSource, local_kind

# pipelines.sdxl.SDXL_CLASSES (not imported: no torch before the checks)
SDXL_CLASS_NAMES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
SDXL_FILE_PREFIX = "conditioner.embedders."    # the original SDXL single files' text encoders
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "auto": "auto"}
# The settings a PNG records and `--from` reads back; a flag given overrides the stored value.
RECORDED = ("prompt", "negative", "seed", "steps", "guidance", "sampler", "eta", "height", "width", "n", "model",
            "dtype", "tokenizer", "schedule",
            # image inputs, hires fix, tiles, VAE, clip skip (generate_inputs)
            "clip_skip", "init_image", "init_image_sha256", "strength", "mask", "mask_sha256", "hires_scale",
            "hires_steps", "hires_strength", "hires_upscaler", "tile_size", "vae", "vae_tiling",
            # textual inversion (generate_embeddings)
            "embedding",
            # LoRA files (generate_adapters)
            "lora",

            "prompt_syntax",   # generate_prompts
            # SDXL (generate_sdxl)
            "refiner", "refiner_switch", "original_size", "target_size", "crop_top_left", "tokenizer_2",
            # ControlNet / T2I-Adapter / IP-Adapter (generate_control)
            "control", "control_resize", "guess_mode", "ip_adapter",
            "deepcache", "deepcache_branch", "freeu",   # step switches (generate_fast)
            "tome", "cfg_truncation",   # cheaper steps (generate_tome)
            "quantize",   # int8 UNet on the CPU (generate_quantize)
            "sampler_options")   # the settings an A1111 sampler label fixes (generate_a1111)
OPTIONAL = RECORDED[RECORDED.index("clip_skip"):]   # recorded only when set
# the command line's names of the settings, for its messages (`names` of load_pipeline, call_sdxl)
FLAGS = {key: f"--{key.replace('_', '-')}" for key in RECORDED} | {"prompt": "PROMPT", "n": "-n"}


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    """The settings of a run, in the order of RECORDED (what every PNG records). None: the pipeline's default,
    filled in by `generate.finish` once the model is loaded."""

    prompt: str | None          # None: --prompts FILE gives them
    negative: str | None
    seed: int                   # of the first image; image i of prompt k has seed + k * n + i
    steps: int | None
    guidance: float | None
    sampler: str | None         # a registered name; None: the model folder's own
    eta: float | None
    height: int | None
    width: int | None
    n: int                      # images per prompt (each its own file; a grid with --grid)
    model: str                  # as given
    dtype: str                  # a torch dtype name: float32, float16, bfloat16 ("auto" until settle_dtype)
    tokenizer: str | None       # single-file models only
    schedule: str | None = None  # the sampler's sigma_schedule (default, karras, exponential); None: its own
    # generate_inputs: None = not used
    clip_skip: int | None = None       # A1111's numbering: 1 = the last layer, 2 = the penultimate
                                       # (diffusers' clip_skip 1)
    init_image: str | None = None      # img2img / inpainting: absolute path
    init_image_sha256: str | None = None
    strength: float | None = None      # img2img / inpainting denoising strength
    mask: str | None = None            # inpainting: absolute path, white = repaint
    mask_sha256: str | None = None
    hires_scale: float | None = None   # hires fix: the second pass at height, width x scale
    hires_steps: int | None = None     # None / 0: as steps
    hires_strength: float | None = None
    hires_upscaler: str | None = None  # latent | latent-nearest | image
    tile_size: int | None = None       # tiled sampling (pixels)
    vae: str | None = None             # the autoencoder that replaces the model's: absolute path or Hub id
    vae_tiling: bool | None = None
    # generate_embeddings: [{"path": absolute path, "token": ..., "sha256": ...}, ...]; None = none
    embedding: list[dict[str, Any]] | None = None
    # generate_adapters: [{"path": absolute path, "weight": W, "sha256": ...}] of --lora FILE[:W]
    lora: list[dict[str, Any]] | None = None
    prompt_syntax: str | None = None   # generate_prompts: a1111 | plain; None: a1111
    # generate_sdxl: None = not used
    refiner: str | None = None         # the SDXL refiner: absolute path or Hub id
    refiner_switch: float | None = None   # the fraction of the schedule the base denoises (denoising_end)
    original_size: str | None = None   # micro-conditioning, as written: "WxH" (original, target), "TOP,LEFT"
    target_size: str | None = None
    crop_top_left: str | None = None
    tokenizer_2: str | None = None     # an SDXL single file's second (bigG) tokenizer, as `tokenizer`
    # generate_control: [{"model", "kind", "image", "image_sha256", "scale", "start", "end"}] of --controlnet /
    # --control pairs; the resize mode name; guess mode; {"path", "sha256", "image", "image_sha256", "scale",
    # "image_encoder"} of --ip-adapter
    control: list[dict[str, Any]] | None = None
    control_resize: str | None = None
    guess_mode: bool | None = None
    ip_adapter: dict[str, Any] | None = None
    # generate_fast: DeepCache's interval and branch, FreeU's [s1, s2, b1, b2]; None = off
    deepcache: int | None = None
    deepcache_branch: int | None = None
    freeu: list[float] | None = None
    tome: float | None = None            # generate_tome: token merging ratio; None = off
    cfg_truncation: float | None = None  # generate_tome: fraction of the steps with guidance; None = all
    quantize: str | None = None          # generate_quantize: int8 | int8-static (cpu_paths.quantize); None = off
    # generate_a1111: the sampler settings its A1111 label fixes (names.SamplerName.options: Brownian noise, A1111's
    # dropped next-to-last sigma, DPM++ 2M SDE Heun's solver_type); None = the registered sampler's own
    sampler_options: dict[str, Any] | None = None

    def params(self) -> dict[str, Any]:
        """The settings as the JSON a PNG records (the image input, hires, tile and VAE settings only when used)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k not in OPTIONAL}


# ---- the model's family, read from its files before anything loads -------------------------------------------------
def inpainting_folder(source: ModelSource) -> bool:
    """Whether the model folder's class is SDXL's inpainting pipeline (its UNet may take 9 channels: it loads as
    that class; single files are recognised by their tensors when they load)."""
    if source.kind == "single_file":
        return False
    try:
        index = json.loads((source.path / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("_class_name") == SDXL_CLASS_NAMES[2]


def model_family(source: ModelSource) -> str | None:
    """"sdxl" or "sd" (every other family) from the files, without loading; None when it cannot tell cheaply
    (a .ckpt file, an unreadable index: the load says what is wrong)."""
    if source.kind == "single_file":
        if source.path.suffix != ".safetensors":
            return None
        from ..errors import LatentDiffError
        from ..safetensors_header import check_safetensors_header

        try:
            header = check_safetensors_header(source.path)
        except (LatentDiffError, OSError):
            return None
        return "sdxl" if any(key.startswith(SDXL_FILE_PREFIX) for key in header) else "sd"
    try:
        index = json.loads((source.path / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return "sdxl" if isinstance(index, dict) and index.get("_class_name") in SDXL_CLASS_NAMES else "sd"


# ---- the pipeline the settings load --------------------------------------------------------------------------------
def load_pipeline(source: ModelSource, settings: GenerateSettings, *, device: Any,
                  names: Mapping[str, str] | None = None) -> Any:
    """The text-to-image pipeline of the model's family (StableDiffusionXLPipeline for SDXL base and refiner
    folders, StableDiffusionXLInpaintPipeline for SDXL inpainting ones; else LatentDiffusionPipeline) in the
    chosen dtype on the chosen device, with the chosen sampler. names: what the caller calls the settings in its
    error messages (the command line its flags, `FLAGS`; the server its request keys); None, or a setting it
    leaves out: the setting's own name."""
    import torch

    from ..diffusion.samplers import switch_sampler
    from ..pipelines.denoising import DenoisingPipeline
    from ..pipelines.latent_diffusion import LatentDiffusionPipeline
    from ..pipelines.sdxl import StableDiffusionXLPipeline

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load = dict(torch_dtype=getattr(torch, settings.dtype), device=device)
    cls: Any = LatentDiffusionPipeline
    if model_family(source) == "sdxl":
        from ..pipelines.sdxl_inpaint import StableDiffusionXLInpaintPipeline

        cls = StableDiffusionXLInpaintPipeline if inpainting_folder(source) else StableDiffusionXLPipeline
    pipe: DenoisingPipeline
    if source.kind == "single_file":
        tokenizer = {key: value for key, value in (("tokenizer", settings.tokenizer),
                                                   ("tokenizer_2", settings.tokenizer_2)) if value is not None}
        # SomePipeline.from_single_file returns SomePipeline or a subclass (it checks the file fits the class)
        pipe = cast(DenoisingPipeline, cls.from_single_file(source.path, **load, **tokenizer))
        if settings.vae is not None:
            pipe = type(pipe).from_pipe(pipe, **load_vae(settings, **load))
    else:
        pipe = cls.from_pretrained(source.name if source.kind == "hub" else source.path, **load,
                                   **load_vae(settings, **load))
    where = names or {}
    pipe.sampler = with_schedule(switch_sampler(pipe.sampler, settings.sampler), settings.schedule, pipe=pipe,
                                 where=where.get("schedule", "schedule"), sampler_where=where.get("sampler", "sampler"))
    if settings.sampler_options:       # what the A1111 label fixes (Brownian noise, a dropped sigma, Heun)
        pipe.sampler = cast(Any, pipe.sampler).with_options(**settings.sampler_options)
    return pipe


def vae_source(settings: GenerateSettings) -> tuple[str, str | None, str]:
    """(path or Hub id, subfolder, kind) of --vae: a pipeline folder's vae/ or vqvae/, a folder, a file, a Hub id."""
    vae = settings.vae
    assert vae is not None
    kind = local_kind(vae)
    if kind == "file":
        return vae, None, "single_file"
    if kind == "dir":
        for sub in ("vae", "vqvae"):
            if (Path(vae) / "model_index.json").is_file() and (Path(vae) / sub / "config.json").is_file():
                return vae, sub, "folder"
        return vae, None, "folder"
    return vae, None, "hub"


def load_vae(settings: GenerateSettings, *, torch_dtype: Any, device: Any) -> dict[str, Any]:
    """{"vae": the --vae autoencoder} to pass to from_pretrained ({} without --vae)."""
    if settings.vae is None:
        return {}
    from ..models.autoencoder_kl import AutoencoderKL
    from ..models.autoencoder_tiny import is_tiny_autoencoder, load_tiny_autoencoder

    path, subfolder, kind = vae_source(settings)
    if kind != "single_file" and subfolder is None and is_tiny_autoencoder(path):   # --fast-decode, or --vae taesd/
        return {"vae": load_tiny_autoencoder(path, torch_dtype=torch_dtype, device=device)}
    if kind == "single_file":
        return {"vae": AutoencoderKL.from_single_file(path, torch_dtype=torch_dtype, device=device)}
    return {"vae": AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=torch_dtype, device=device)}


def with_schedule(sampler: Any, schedule: str | None, *, pipe: Any = None, where: str = "schedule",
                  sampler_where: str = "sampler") -> Any:
    """The pipeline's sampler with `schedule` set (None: as it is); a UsageError naming `where` (the caller's name
    of the schedule: `--schedule` on the command line, `scheduler` in a request) when it has none (the folder's
    own sampler, known only once loaded); `sampler_where`: the caller's name of the sampler. Align Your Steps takes
    `pipe`'s table (SDXL or SD 1.5: names.schedule_options)."""
    from ..diffusion.samplers.names import schedule_options  # torch: where a schedule is set

    if schedule is None or (getattr(sampler, "sigma_schedule", None) == schedule and schedule != "align_your_steps"):
        return sampler
    if not hasattr(sampler, "sigma_schedule"):
        if schedule == "default":
            return sampler
        raise UsageError(f"the model's sampler {type(sampler).__name__} has no schedule to set", where=where,
                         expected=f"no {where}, or {sampler_where} with a schedule (euler, heun, lms, dpm_2, "
                                  "dpmpp_2m, dpmpp_sde ...)", found=schedule)
    return sampler.with_options(**schedule_options(schedule, pipeline=pipe))
