"""create_app(settings): the FastAPI app of `latentdiff serve`.

Everything every route shares lives here: HTTP basic auth on every route when `api_auth` is set (A1111's
`--api-auth user:pass[,user2:pass2]`), a bound on request bodies (413 before the body is read past it), and errors
as JSON: a latentdiff error or a malformed body is a 422 `{"error", "detail", "field", ...}` naming what is wrong,
never a 500 with a traceback. Routes find the engine and the catalog on `request.app.state`.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import LatentDiffError
from ..version import __version__
from .requests import RequestError, redact
from .settings import ServeSettings


def error_body(exc: LatentDiffError, settings: ServeSettings | None = None) -> dict[str, Any]:
    """A latentdiff error as the JSON a client reads (A1111 clients show `detail`), the server's folders named by
    their flag instead of their path (`redact`)."""
    body: dict[str, Any] = {"error": type(exc).__name__, "detail": str(exc), "message": exc.message}
    for key in ("where", "expected", "found"):
        value = getattr(exc, key, None)
        if value is not None:
            body[key] = str(value)
    field = getattr(exc, "field", None)
    if field is not None:
        body["field"] = field
    return {key: redact(value, settings) if isinstance(value, str) else value for key, value in body.items()}


class BodyLimit:
    """Refuse a body larger than `limit` bytes with 413, by its Content-Length or while it streams in."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_large(self.limit, int(declared))(scope, receive, send)
            return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(seen)
            return message

        try:
            await self.app(scope, bounded, send)
        except BodyTooLarge as exc:
            await too_large(self.limit, exc.size)(scope, receive, send)


class BodyTooLarge(Exception):  # noqa: N818  # a signal caught by BodyLimit
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


def too_large(limit: int, size: int) -> JSONResponse:
    return JSONResponse({"error": "RequestError", "detail": f"the request body is larger than the server accepts; "
                                                            f"expected: at most {limit} bytes; found: {size}+ bytes",
                         "field": "body"}, status_code=413)


class BasicAuth:
    """HTTP basic auth on every route (A1111's --api-auth): 401 with WWW-Authenticate otherwise."""

    def __init__(self, app: ASGIApp, credentials: tuple[tuple[str, str], ...]):
        self.app, self.credentials = app, credentials

    def allowed(self, header: bytes | None) -> bool:
        if not header or not header.lower().startswith(b"basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        ok = False
        for known_user, known_password in self.credentials:   # compare every pair in constant time
            ok |= hmac.compare_digest(user.encode(), known_user.encode()) & hmac.compare_digest(
                password.encode(), known_password.encode())
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allowed(dict(scope.get("headers") or []).get(b"authorization")):
            response = JSONResponse({"error": "Unauthorized", "detail": "Incorrect username or password"},
                                    status_code=401, headers={"WWW-Authenticate": "Basic"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(settings: ServeSettings | None = None, *, engine: Any = None, catalog: Any = None) -> FastAPI:
    """The app; `engine` / `catalog` default to ones built from `settings` (the engine is started with the app's
    lifespan, so a TestClient used as a context manager, or uvicorn, runs it)."""
    from contextlib import asynccontextmanager

    from . import openai_api, routes_a1111, routes_controlnet, web
    from .engine import Engine
    from .models import ModelCatalog

    settings = settings or ServeSettings()
    catalog = catalog if catalog is not None else ModelCatalog(settings)
    engine = engine if engine is not None else Engine(catalog, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="latentdiff", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings, app.state.engine, app.state.catalog = settings, engine, catalog

    @app.exception_handler(LatentDiffError)
    async def latentdiff_error(request: Request, exc: LatentDiffError) -> JSONResponse:
        status = exc.status if isinstance(exc, RequestError) else 422
        return JSONResponse(error_body(exc, settings), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else "body"
        return JSONResponse({"error": "RequestError", "detail": f"invalid request body at {where}: "
                                                                f"{errors[0]['msg'] if errors else 'not JSON'}",
                             "field": where, "errors": errors}, status_code=422)

    @app.exception_handler(json.JSONDecodeError)
    async def bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return JSONResponse({"error": "RequestError", "detail": f"the body is not JSON: {exc.msg} at {exc.pos}",
                             "field": "body"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:   # a bug: its name, never a traceback
        detail = redact(f"{type(exc).__name__}: {exc}"[:2000], settings)
        return JSONResponse({"error": "InternalError", "detail": detail}, status_code=500)

    app.include_router(routes_a1111.router)
    app.include_router(routes_controlnet.router)
    app.include_router(openai_api.router)
    app.include_router(web.router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.api_auth:
        app.add_middleware(BasicAuth, credentials=settings.api_auth)   # outermost: nothing runs unauthenticated
    return app
