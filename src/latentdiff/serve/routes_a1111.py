"""The AUTOMATIC1111 `/sdapi/v1` routes: HTTP in, `a1111.py` to parse, the engine to generate, `a1111_results.py`
to answer. Parsing and image decoding run in a worker thread (they decode base64 images, and may load the model
to learn its default size), never on the event loop.

The server-wide A1111 options (`/sdapi/v1/options`) live on `app.state.a1111_options`: sd_model_checkpoint
switches the catalog's current model (loaded in a thread before the POST answers), CLIP_stop_at_last_layers and
sd_vae are the defaults of later requests, any other key is stored and echoed (A1111 clients set many), up to
MAX_OPTIONS keys and MAX_OPTIONS_BYTES of JSON.
"""
from __future__ import annotations

import json
import os
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..config import parse_json
from ..generation.sdxl import a1111_clip_layers, is_sdxl
from ..version import __version__
from . import a1111_results
from .a1111 import Body, ModelFacts, Options, img2img_request, option_clip_skip, txt2img_request
from .a1111_images import png_info
from .requests import RequestError

router = APIRouter(prefix="/sdapi/v1")
MAX_OPTIONS = 4096            # keys kept by POST /options
MAX_OPTIONS_BYTES = 1024**2   # their JSON, all together
AUTOMATIC = ("Automatic", "None", None)


async def read_json(request: Request) -> Any:
    """The body as JSON: not JSON, not UTF-8 or nested too deep is a 422 naming the body (the app's handler words
    a latentdiff error), never a 500."""
    raw = await request.body()
    try:
        return parse_json(raw or b"{}", where="body")
    except json.JSONDecodeError as exc:
        raise RequestError(f"the body is not JSON: {exc.msg} at {exc.pos}", field="body") from None
    except UnicodeDecodeError:
        raise RequestError("the body is not UTF-8 text", field="body", expected="JSON in UTF-8") from None
    except ValueError as exc:     # an integer of more than 4,300 digits (Python's int parsing bound)
        raise RequestError(f"the body is not JSON this server reads: {str(exc)[:120]}", field="body") from None


def _options(request: Request) -> dict[str, Any]:
    state = request.app.state
    store = getattr(state, "a1111_options", None)
    if store is None:
        store = state.a1111_options = {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"}
    return store


def current_options(request: Request) -> Options:
    """The options a request starts from: the catalog's current model, the stored sd_vae and clip skip."""
    store, catalog = _options(request), request.app.state.catalog
    vae = store.get("sd_vae")
    return Options(model=catalog.current,
                   vae=None if vae in AUTOMATIC else catalog.resolve_vae(vae, field="options.sd_vae"),
                   clip_skip=store.get("CLIP_stop_at_last_layers"))


def model_defaults(catalog: Any) -> Any:
    """(model, vae) -> ModelFacts read from the loaded pipeline (the catalog loads it once; the engine would load
    it for the request anyway)."""
    def defaults(model: str, vae: str | None) -> ModelFacts:
        pipe = catalog.pipeline(model, vae)
        height, width = pipe.image_size(None, None)
        return ModelFacts(height, width, str(getattr(type(pipe.sampler), "registry_name", "ddim")),
                          a1111_clip_layers(pipe), sdxl=is_sdxl(pipe))

    return defaults


def checkpoint_item(catalog: Any, name: str) -> dict[str, Any]:
    """The /sd-models item of the catalog name `name` ({} when the catalog lists none such)."""
    for item in catalog.checkpoints():
        if name in (item.get("title"), item.get("model_name"), item.get("filename"), item.get("name")):
            return dict(item)
    return {}


async def _generate(request: Request, kind: str) -> dict[str, Any]:
    body = await read_json(request)
    state = request.app.state
    parse = txt2img_request if kind == "txt2img" else img2img_request
    job = await run_in_threadpool(partial(parse, body, options=current_options(request), catalog=state.catalog,
                                          settings=state.settings, defaults=model_defaults(state.catalog)))
    result = await state.engine.generate(job, is_disconnected=request.is_disconnected)
    return await run_in_threadpool(partial(a1111_results.response_json, result, body, kind=kind,
                                           checkpoint=checkpoint_item(state.catalog, job.model),
                                           outputs_dir=state.settings.outputs_dir))


@router.post("/txt2img")
async def txt2img(request: Request) -> dict[str, Any]:
    return await _generate(request, "txt2img")


@router.post("/img2img")
async def img2img(request: Request) -> dict[str, Any]:
    return await _generate(request, "img2img")


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    catalog = request.app.state.catalog
    item = checkpoint_item(catalog, catalog.current)
    return {**_options(request), "sd_model_checkpoint": item.get("title", catalog.current),
            "sd_checkpoint_hash": item.get("sha256")}


@router.post("/options")
async def set_options(request: Request) -> None:
    """Check every known key first, then apply: a bad value changes nothing."""
    body = Body(await read_json(request))
    store, catalog = _options(request), request.app.state.catalog
    model = None
    if body.data.get("sd_model_checkpoint") is not None:
        model = catalog.resolve(body.text("sd_model_checkpoint", None), field="sd_model_checkpoint")
    clip_skip = option_clip_skip(body, store.get("CLIP_stop_at_last_layers"))
    vae = body.text("sd_vae", store.get("sd_vae"))
    if vae not in AUTOMATIC:
        catalog.resolve_vae(vae, field="sd_vae")
    others = {k: v for k, v in body.data.items() if k not in ("sd_model_checkpoint", "CLIP_stop_at_last_layers",
                                                             "sd_vae", "sd_checkpoint_hash")}
    merged = {**store, **others}
    if len(merged) > MAX_OPTIONS or len(json.dumps(merged)) > MAX_OPTIONS_BYTES:
        raise RequestError("more options than this server keeps", field="body",
                           expected=f"at most {MAX_OPTIONS} keys and {MAX_OPTIONS_BYTES} bytes of JSON in all",
                           found=f"{len(merged)} keys, {len(json.dumps(merged))} bytes")
    if model is not None:
        await run_in_threadpool(catalog.set_current, model)
    store.update(others)
    store.update({"CLIP_stop_at_last_layers": clip_skip, "sd_vae": vae if vae is not None else "Automatic"})


@router.get("/progress")
async def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    engine = request.app.state.engine
    return await run_in_threadpool(partial(engine.progress, skip_current_image=skip_current_image))


@router.post("/interrupt")
async def interrupt(request: Request) -> dict[str, Any]:
    request.app.state.engine.interrupt()
    return {}


@router.post("/skip")
async def skip(request: Request) -> dict[str, Any]:
    request.app.state.engine.skip()
    return {}


@router.post("/png-info")
async def read_png_info(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    settings = request.app.state.settings
    return await run_in_threadpool(partial(png_info, body, max_bytes=settings.max_image_bytes,
                                           max_pixels=4 * settings.max_side**2))


# ---- lists --------------------------------------------------------------------------------------------------------
@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    return list(request.app.state.catalog.checkpoints())


@router.get("/sd-vae")
async def sd_vae(request: Request) -> list[dict[str, Any]]:
    return list(request.app.state.catalog.vaes())


@router.get("/loras")
async def loras(request: Request) -> list[dict[str, Any]]:
    return list(request.app.state.catalog.loras())


@router.get("/embeddings")
async def embeddings(request: Request) -> dict[str, Any]:
    return dict(request.app.state.catalog.embeddings())


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return a1111_results.samplers()


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    return a1111_results.schedulers()


@router.get("/upscalers")
async def upscalers() -> list[dict[str, Any]]:
    return a1111_results.upscalers()


@router.get("/latent-upscale-modes")
async def latent_upscale_modes() -> list[dict[str, str]]:
    return a1111_results.latent_upscale_modes()


@router.post("/refresh-checkpoints")
@router.post("/refresh-loras")
@router.post("/refresh-vae")
@router.post("/refresh-embeddings")
async def refresh(request: Request) -> None:
    await run_in_threadpool(request.app.state.catalog.refresh)


# ---- what clients ask on connect: cheap, honest answers ---------------------------------------------------------
@router.get("/cmd-flags")
async def cmd_flags(request: Request) -> dict[str, Any]:
    """A1111's command-line flags that describe this server (no paths, no credentials)."""
    settings = request.app.state.settings
    return {"api": True, "nowebui": False, "listen": settings.host not in ("127.0.0.1", "localhost", "::1"),
            "port": settings.port, "api_auth": "***" if settings.api_auth else None,
            "no_half": settings.dtype == "float32",
            "lowvram": False, "medvram": False, "xformers": False, "version": f"latentdiff {__version__}"}


@router.get("/memory")
async def memory() -> dict[str, Any]:
    """{"ram": {free, used, total} (bytes), "cuda": torch's counters or {"error"}}, as A1111 reports them."""
    ram: dict[str, Any]
    try:
        import psutil

        vm = psutil.virtual_memory()
        ram = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}
    except ImportError:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        ram = {"total": pages * size}
    import torch

    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "no CUDA device"}}
    free, total = torch.cuda.mem_get_info()
    return {"ram": ram, "cuda": {"system": {"free": free, "used": total - free, "total": total},
                                 "active": {"current": torch.cuda.memory_allocated()},
                                 "reserved": {"current": torch.cuda.memory_reserved()}}}


@router.get("/prompt-styles")
@router.get("/face-restorers")
@router.get("/hypernetworks")
@router.get("/realesrgan-models")
@router.get("/script-info")
@router.get("/extensions")
async def empty_list() -> list[Any]:
    """What latentdiff has none of: an empty list, as A1111 with none installed answers."""
    return []


@router.get("/scripts")
async def scripts(request: Request) -> dict[str, list[str]]:
    """The always-on scripts: "controlnet" with --controlnet-dir (clients look for it to offer ControlNet)."""
    controlnets = getattr(request.app.state.catalog, "controlnets", None)
    names = ["controlnet"] if controlnets is not None and controlnets.folders else []
    return {"txt2img": list(names), "img2img": list(names)}
