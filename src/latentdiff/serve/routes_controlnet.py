"""The routes sd-webui-controlnet adds to A1111 that clients call (its `scripts/api.py`), with its shapes:

    GET  /controlnet/version                       {"version": 3}
    GET  /controlnet/model_list[?update=true]      {"model_list": ["<name> [<hash>]", ...]}   (--controlnet-dir)
    GET  /controlnet/module_list[?alias_names=...] {"module_list": [...], "module_detail": {name: {model_free,
                                                    sliders}}}
    GET  /controlnet/settings                      {"control_net_unit_count": MAX_UNITS}
    POST /controlnet/detect                        {"images": [base64 PNG], "info": "Success"}

The lists are read from the folders on every call (the extension's update=true, its default).
"""
from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from .controlnet import API_VERSION, module_list
from .controlnet_units import MAX_UNITS, detect
from .routes_a1111 import read_json

router = APIRouter(prefix="/controlnet")


@router.get("/version")
async def version() -> dict[str, int]:
    return {"version": API_VERSION}


@router.get("/model_list")
async def model_list(request: Request, update: bool = True) -> dict[str, list[str]]:
    controlnets = getattr(request.app.state.catalog, "controlnets", None)
    return {"model_list": [] if controlnets is None else await run_in_threadpool(controlnets.model_list)}


@router.get("/module_list")
async def modules(alias_names: bool = False) -> dict[str, Any]:
    return module_list(alias_names=alias_names)


@router.get("/settings")
async def settings() -> dict[str, int]:
    return {"control_net_unit_count": MAX_UNITS}


@router.post("/detect")
async def run_detect(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    s = request.app.state.settings
    return await run_in_threadpool(partial(detect, body, max_bytes=s.max_image_bytes, max_pixels=4 * s.max_side**2))
