"""The page at `/`: a small form over the A1111 routes (no build step: plain HTML, CSS and JS in `web/`, served
from the package, nothing fetched from elsewhere, so it works offline).

    GET /                  web/index.html
    GET /web/{file}        app.js, style.css (only the files listed in FILES: a name is never a path)
    GET /web/defaults      {"width", "height", "model"}: the current model's own image size, the form's start values

What the page does (web/app.js): /sdapi/v1/samplers and /sdapi/v1/loras fill its pickers, Generate posts
/sdapi/v1/txt2img and polls /sdapi/v1/progress (bar and live preview) until the answer comes, each result shows its
infotext and a "reuse parameters" button that fills the form from that image's settings (the answer's `info`).
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException

WEB = Path(__file__).parent / "web"
FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
NO_CACHE = {"Cache-Control": "no-cache"}   # the page follows the installed version

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(WEB / "index.html", media_type="text/html; charset=utf-8", headers=NO_CACHE)


@router.get("/web/defaults")
async def defaults(request: Request) -> JSONResponse:
    """The current model's own size (its UNet's sample_size times the first stage's factor)."""
    catalog = request.app.state.catalog
    name = str(catalog.current)
    height, width = await asyncio.to_thread(lambda: catalog.pipeline(name).image_size(None, None))
    return JSONResponse({"model": name, "width": width, "height": height}, headers=NO_CACHE)


@router.get("/web/{name}")
async def static_file(name: str) -> FileResponse:
    if name not in FILES:
        raise HTTPException(404, f"no such file: the page's files are {', '.join(FILES)}")
    return FileResponse(WEB / name, media_type=FILES[name], headers=NO_CACHE)
