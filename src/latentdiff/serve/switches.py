"""The step switches of `latentdiff serve --deepcache / --freeu / --tome` (docs/fast.md), and `--optimize-cpu` and
`--quantize`: set on every model the server loads, once, never per request.

They are settings of the model's UNet (`pipelines.step_cache`, `pipelines.token_merging`), which every request
on that model shares: a request field would change them under the other requests of a batched call. What a served
image was made with is read back from its pipeline (`switch_params`) into the PNG, in `latentdiff generate`'s
keys, so `latentdiff generate --from` makes the same image.
"""
from __future__ import annotations

import logging
from typing import Any

from ..errors import InputError, UsageError
from ..generation.quantize import check_static_calibration, on_cpu, quantize_unet
from ..pipelines.cpu_paths import optimize_for_cpu
from ..pipelines.step_cache import step_settings
from ..pipelines.token_merging import tome_settings
from .settings import ServeSettings

log = logging.getLogger("latentdiff.serve")


def apply_switches(pipe: Any, settings: ServeSettings, *, name: str | None = None) -> None:
    """The server's switches on a freshly loaded pipeline (`name`: the model's, for the errors). A pipeline
    without a switch, or a DeepCache branch its UNet does not have, is a UsageError naming the flag, and so is
    int8-static on a CPU model of a server with ControlNets (`generation.quantize.check_static_calibration`);
    token merging on a model with no attention at the full latent resolution (SDXL) merges nothing there and says
    so in the log, as `latentdiff generate --tome`."""
    if settings.controlnet_dirs and pipe.device.type == "cpu":
        check_static_calibration(settings.quantize, control="--controlnet-dir", where="--quantize",
                                 model=name or type(pipe).__name__)
    for flag, method, value in (("--deepcache", "enable_deepcache", settings.deepcache),
                                ("--freeu", "enable_freeu", settings.freeu), ("--tome", "enable_tome", settings.tome)):
        if value is not None and not hasattr(pipe, method):
            raise UsageError(f"{type(pipe).__name__} has no {flag[2:]} switch", where=flag,
                             expected=f"no {flag} with this model", found=value)
    if settings.deepcache is not None:
        try:
            pipe.enable_deepcache(*settings.deepcache)
        except InputError as error:      # a branch past this UNet's skips
            raise UsageError(error.message, where="--deepcache-branch", expected=error.expected,
                             found=settings.deepcache[1]) from None
    if settings.freeu is not None:
        pipe.enable_freeu(*settings.freeu)
    if settings.tome is not None:
        try:
            pipe.enable_tome(settings.tome)
        except UsageError as error:
            if error.where != "max_downsample":
                raise
            log.warning("--tome: %s has no attention at the latent's full resolution (SDXL): nothing is merged",
                        type(pipe).__name__)
    if settings.optimize_cpu:
        if pipe.device.type == "cpu":
            optimize_for_cpu(pipe, keep_weights=False)   # speed only: the same images to rounding, not recorded
        else:
            log.warning("--optimize-cpu is for the CPU; ignored for %s on %s", type(pipe).__name__, pipe.device)
    if settings.quantize is not None:
        apply_quantize(pipe, settings.quantize)


def apply_quantize(pipe: Any, method: str) -> None:
    """--quantize on a CPU model's UNet (after --optimize-cpu), logged with what was quantized and how long the
    calibration took; off the CPU, or on a model the default calibration cannot run (an SDXL refiner without
    its first text encoder), logged and left as it is. The PNGs record it (`switch_params`)."""
    name = type(pipe).__name__
    if pipe.device.type != "cpu":
        log.warning("--quantize %s is for the CPU; ignored for %s on %s", method, name, pipe.device)
        return
    try:
        done = quantize_unet(pipe, method)
    except InputError as error:
        if error.where != "calibration":
            raise UsageError(error.message, where="--quantize", expected=error.expected, found=error.found) from None
        log.warning("--quantize %s: %s is left unquantized: %s", method, name, error.message)
        return
    log.warning("--quantize %s: %s: %s", method, name, done)


def static_int8_here(settings: ServeSettings | None) -> bool:
    """Whether the server quantizes its models int8-static (--quantize int8-static on the CPU). An SDXL refiner then
    waits for `latentdiff generate --refiner`'s calibration behind its base at the request's switch, which one
    loaded model shared by every request cannot have: a refiner request is refused (serve.a1111), so a served PNG's
    --from (which quantizes the refiner so) never differs from it."""
    if settings is None or settings.quantize != "int8-static":
        return False
    import torch

    return on_cpu(torch.device(settings.device) if settings.device else None)


def switch_params(pipe: Any) -> dict[str, Any]:
    """The switches `pipe`'s UNet runs with, in the keys `latentdiff generate` records (none when off)."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return {}
    settings, merging = step_settings(unet), tome_settings(unet)
    params: dict[str, Any] = {}
    if getattr(pipe, "quantization", None) is not None:     # set by cpu_paths.quantize
        params["quantize"] = pipe.quantization
    if settings.deepcache is not None:
        params |= {"deepcache": settings.deepcache.cache_interval,
                   "deepcache_branch": settings.deepcache.cache_branch_id}
    if settings.freeu is not None:
        freeu = settings.freeu
        params["freeu"] = [freeu.s1, freeu.s2, freeu.b1, freeu.b2]
    if merging is not None:
        params["tome"] = merging.ratio
    return params
