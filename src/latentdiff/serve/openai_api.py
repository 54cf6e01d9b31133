"""OpenAI's images API over the same engine and queue as the A1111 routes: `POST /v1/images/generations`,
`GET /v1/models` (and `/v1/models/{id}`), and `GET /v1/images/files/{id}.png`, where `response_format: "url"`
answers point.

What OpenAI's request means here (docs/serving.md):

* `model`: a checkpoint of the catalog (its model_name, title or file name); absent, or one of OpenAI's own model
  names (dall-e-*, gpt-image-*: clients send them by default), the server's current model.
* `n` images, image i with the seed `seed + i`, each its own unit of the queue (as A1111's n_iter), so with
  `--max-batch 1` each is exactly the image the Python API gives for its seed alone.
* the defaults are the A1111 routes' (steps 50, guidance 7, the model's own sampler, a random seed), and
  `<lora:NAME:W>` tags in the prompts must name a LoRA the catalog lists, as there.
* `size` "WxH", or "auto" (the model's own size); `response_format` "b64_json" (the default, as for gpt-image-1:
  no file to fetch) or "url" (the PNG is kept in a small in-memory store, under a random id, for later GETs).
* OpenAI's settings a diffusion model has no use for (quality, style, user, background, output_format, ...) are
  accepted and listed under the response's `latentdiff.ignored`; latentdiff's own extras (negative_prompt, steps,
  seed, guidance_scale, sampler, scheduler, cfg_truncation) come through the client's `extra_body`;
  `cfg_truncation` is the A1111 routes' key: guidance for that fraction of the steps only, a number in [0, 1].
  Any other key is refused, as OpenAI refuses it ("unknown_parameter").

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, which the `openai` package reads into
its typed exceptions (BadRequestError for 400, NotFoundError for 404, ...), by status code and that body.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from ..errors import LatentDiffError
from ..utils.images import png_bytes
from .a1111 import DEFAULT_CFG_SCALE, DEFAULT_STEPS, MAX_CFG_SCALE, MAX_SEED, RANDOM_SEEDS, check_lora_tags
from .a1111_images import public_params
from .requests import ImageRequest, JobResult, RequestError, redact

IGNORED = ("quality", "style", "user", "background", "output_format", "output_compression", "moderation",
           "partial_images", "stream")           # OpenAI's settings accepted and not used (stream: only false)
EXTRAS = ("negative_prompt", "steps", "seed", "guidance_scale", "sampler", "scheduler", "cfg_truncation")
KNOWN = ("model", "prompt", "n", "size", "response_format", *IGNORED, *EXTRAS)
OPENAI_MODELS = re.compile(r"^(dall-e|gpt-image)", re.IGNORECASE)   # OpenAI's own names: the current model
MAX_N = 10                                        # OpenAI's bound on n (the server's --max-images applies too)
MAX_PROMPT_CHARS = 32000                          # gpt-image-1's bound
FILE_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")      # secrets.token_urlsafe(16): no dots, no slashes, no paths
MAX_FILES = 256                                   # PNGs the url store keeps (least recently used go first)
MAX_FILE_BYTES = 256 * 1024**2                    # ... and their bytes together
STARTED = int(time.time())                        # `created` of /v1/models: the catalog keeps no dates


# ---- errors in OpenAI's shape ------------------------------------------------------------------------------------
def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def error_response(exc: Exception, settings: Any = None) -> JSONResponse:
    """A latentdiff error, an HTTP error or a malformed body as OpenAI's error JSON, the server's folders named by
    their flag, never their path (`redact`). A request problem is a 400 (OpenAI's status for a bad parameter; A1111
    routes answer 422), a full queue 503 (the client retries)."""
    if isinstance(exc, RequestError):
        status = 400 if exc.status == 422 else exc.status
        code = getattr(exc, "openai_code", None) or ("invalid_value" if status == 400 else "server_busy")
        return openai_error(status, redact(str(exc), settings), param=exc.field, code=code)
    if isinstance(exc, LatentDiffError):   # a setting the pipeline refused (a size not a multiple of its factor)
        where = None if exc.where is None else redact(str(exc.where), settings)
        return openai_error(400, redact(str(exc), settings), param=where, code="invalid_value")
    if isinstance(exc, HTTPException):
        return openai_error(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return openai_error(400, f"the body is not JSON: {exc}", param="body", code="invalid_json")
    raise exc


class OpenAIRoute(APIRoute):
    """A route whose errors have OpenAI's shape rather than the app's A1111-style JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except (LatentDiffError, HTTPException, json.JSONDecodeError, UnicodeDecodeError) as exc:
                return error_response(exc, getattr(request.app.state, "settings", None))

        return handle


router = APIRouter(route_class=OpenAIRoute)


def unknown(key: str) -> RequestError:
    error = RequestError(f"unknown parameter {key!r}", field=key,
                         expected=f"OpenAI's images parameters or latentdiff's extras: {', '.join(KNOWN)}",
                         found=repr(key)[:80])
    error.openai_code = "unknown_parameter"   # type: ignore[attr-defined]  # read by error_response
    return error


# ---- the request -------------------------------------------------------------------------------------------------
def integer(body: dict[str, Any], key: str, *, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{key} must be an integer from {low} to {high}", field=key,
                           expected=f"an integer in [{low}, {high}]", found=repr(value)[:80])
    return value


def number(body: dict[str, Any], key: str, *, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"{key} must be a number from {low:g} to {high:g}", field=key,
                           expected=f"a number in [{low:g}, {high:g}]", found=repr(value)[:80])
    return float(value)


def text(body: dict[str, Any], key: str, *, limit: int = MAX_PROMPT_CHARS) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise RequestError(f"{key} must be a string of at most {limit} characters", field=key,
                           expected=f"a string of at most {limit} characters", found=repr(value)[:80])
    return value


def parse_size(value: str | None) -> tuple[int, int] | None:
    """"WxH" -> (width, height); None or "auto": the model's own size (None)."""
    if value is None or value == "auto":
        return None
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value)
    if not match or not int(match[1]) or not int(match[2]):
        raise RequestError("size must be WIDTHxHEIGHT or auto", field="size", expected='"512x512" or "auto"',
                           found=repr(value)[:80])
    return int(match[1]), int(match[2])


def resolve_model(catalog: Any, name: str | None) -> str:
    if name is None or OPENAI_MODELS.match(name):
        return str(catalog.current)
    return str(catalog.resolve(name, field="model"))


def sampler_settings(sampler: str | None, scheduler: str | None) -> tuple[str | None, str | None]:
    """An A1111 or latentdiff sampler name (and A1111's schedule type) -> latentdiff's (sampler, schedule)."""
    from ..diffusion.samplers.names import check_schedule, resolve_sampler

    if sampler is None:
        if scheduler is not None:
            raise RequestError("scheduler needs a sampler", field="scheduler", expected="sampler given too",
                               found=repr(scheduler)[:80])
        return None, None
    try:
        resolved = resolve_sampler(sampler, schedule=scheduler, where="sampler", schedule_where="scheduler")
        check_schedule(resolved.name, resolved.schedule, where="scheduler")
    except LatentDiffError as exc:
        raise RequestError(exc.message, field=str(exc.where), expected=exc.expected, found=exc.found) from None
    return resolved.name, resolved.schedule


def sampler_options(sampler: str | None) -> tuple[tuple[str, Any], ...]:
    """The settings an A1111 sampler label fixes besides its schedule (names.SamplerName.options); () for other
    names and None. The name has passed `sampler_settings`."""
    from ..diffusion.samplers.names import resolve_sampler

    return () if sampler is None else resolve_sampler(sampler).options


async def image_request(body: Any, catalog: Any) -> tuple[ImageRequest, str]:
    """The JSON body -> (ImageRequest, response_format), every field checked."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object", field="body", expected="an object",
                           found=type(body).__name__)
    for key in body:
        if key not in KNOWN:
            raise unknown(key)
    prompt, negative = text(body, "prompt"), text(body, "negative_prompt") or ""
    if not prompt:
        raise RequestError("prompt is required", field="prompt", expected="a non-empty string", found=repr(prompt))
    check_lora_tags(prompt, catalog=catalog, field="prompt")
    check_lora_tags(negative, catalog=catalog, field="negative_prompt")
    response_format = body.get("response_format") or "b64_json"
    if response_format not in ("b64_json", "url"):
        raise RequestError("unknown response_format", field="response_format", expected='"b64_json" or "url"',
                           found=repr(response_format)[:80])
    if body.get("stream") not in (None, False):
        raise RequestError("streaming is not implemented", field="stream", expected="false", found=body["stream"])
    model = resolve_model(catalog, text(body, "model", limit=512))
    size = parse_size(text(body, "size", limit=16))
    if size is None:   # the model's own size: its UNet's sample_size times the first stage's factor
        height, width = await asyncio.to_thread(lambda: catalog.pipeline(model).image_size(None, None))
        size = (width, height)
    sampler_name = text(body, "sampler", limit=200)
    sampler, schedule = sampler_settings(sampler_name, text(body, "scheduler", limit=200))
    n = integer(body, "n", low=1, high=MAX_N) or 1
    seed = integer(body, "seed", low=-1, high=MAX_SEED - n + 1)   # the last image's seed is seed + n - 1
    steps = integer(body, "steps", low=1, high=10**6)             # the engine checks --max-steps
    guidance = number(body, "guidance_scale", low=0, high=MAX_CFG_SCALE)
    cfg_truncation = number(body, "cfg_truncation", low=0, high=1)   # as the A1111 routes check it
    request = ImageRequest(
        model=model, prompt=prompt, negative_prompt=negative, width=size[0], height=size[1],
        steps=DEFAULT_STEPS if steps is None else steps, guidance=DEFAULT_CFG_SCALE if guidance is None else guidance,
        sampler=sampler, schedule=schedule, sampler_options=sampler_options(sampler_name),
        seed=secrets.randbelow(RANDOM_SEEDS) if seed in (None, -1) else seed,
        batch_size=1, n_iter=n, ignored=tuple(k for k in IGNORED if k in body), origin="openai",
        cfg_truncation=cfg_truncation)
    return request, response_format


# ---- the url store -----------------------------------------------------------------------------------------------
class ImageFiles:
    """PNGs kept in memory for `response_format: "url"`: random ids, least recently used dropped past MAX_FILES
    images or MAX_FILE_BYTES bytes (a client fetches its image soon after the answer; a replica restart loses
    them, as OpenAI's urls expire)."""

    def __init__(self, *, max_files: int = MAX_FILES, max_bytes: int = MAX_FILE_BYTES):
        self.max_files, self.max_bytes = max_files, max_bytes
        self._files: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        file_id = secrets.token_urlsafe(16)
        with self._lock:
            self._files[file_id] = data
            self._bytes += len(data)
            while len(self._files) > self.max_files or (self._bytes > self.max_bytes and len(self._files) > 1):
                _, dropped = self._files.popitem(last=False)
                self._bytes -= len(dropped)
        return file_id

    def get(self, file_id: str) -> bytes | None:
        with self._lock:
            data = self._files.get(file_id)
            if data is not None:
                self._files.move_to_end(file_id)
            return data


def image_files(request: Request) -> ImageFiles:
    state = request.app.state
    files = getattr(state, "openai_files", None)
    if files is None:
        files = state.openai_files = ImageFiles()
    return files


# ---- the routes --------------------------------------------------------------------------------------------------
@router.post("/v1/images/generations")
async def generations(http_request: Request) -> JSONResponse:
    """OpenAI's image generation: {created, data: [{b64_json | url, revised_prompt}]} (+ latentdiff's seeds)."""
    body = await http_request.json()
    request, response_format = await image_request(body, http_request.app.state.catalog)
    result: JobResult = await http_request.app.state.engine.generate(
        request, is_disconnected=http_request.is_disconnected)
    pngs = await asyncio.to_thread(lambda: [png_bytes(g.image, public_params(g.params)) for g in result.images])
    data: list[dict[str, Any]] = []
    for png in pngs:
        if response_format == "url":
            url = f"{str(http_request.base_url).rstrip('/')}/v1/images/files/{image_files(http_request).put(png)}.png"
            data.append({"url": url, "revised_prompt": request.prompt})
        else:
            data.append({"b64_json": base64.b64encode(png).decode("ascii"), "revised_prompt": request.prompt})
    return JSONResponse({
        "created": int(time.time()), "data": data, "size": f"{request.width}x{request.height}", "output_format": "png",
        "latentdiff": {"model": request.model, "seeds": [g.seed for g in result.images],
                       "ignored": list(request.ignored), "interrupted": result.interrupted},
    })


@router.get("/v1/images/files/{name}")
async def image_file(name: str, http_request: Request) -> Response:
    file_id = name.removesuffix(".png")
    data = image_files(http_request).get(file_id) if name.endswith(".png") and FILE_ID.match(file_id) else None
    if data is None:
        raise HTTPException(404, "no such image here (images are kept in memory for a while, on the replica "
                                 "that made them)")
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def model_entry(item: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint as OpenAI's model: its id is the catalog's canonical name (what `model` resolves to)."""
    return {"id": item["filename"], "object": "model", "created": STARTED, "owned_by": "latentdiff"}


@router.get("/v1/models")
async def models(http_request: Request) -> JSONResponse:
    """The catalog's checkpoints as OpenAI's model list."""
    items = await asyncio.to_thread(http_request.app.state.catalog.checkpoints)
    return JSONResponse({"object": "list", "data": [model_entry(item) for item in items]})


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, http_request: Request) -> JSONResponse:
    catalog = http_request.app.state.catalog
    try:
        name = catalog.resolve(model_id, field="model")
    except RequestError as exc:
        raise HTTPException(404, f"the model {model_id!r} does not exist here") from exc
    items = await asyncio.to_thread(catalog.checkpoints)
    item = next((i for i in items if i.get("filename") == name), {"filename": name})
    return JSONResponse(model_entry(item))
