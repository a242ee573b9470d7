"""The ASGI app: routes, error shapes, limits, metrics, and the batch pump."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from producer import ClientSettings
from slotfill.gateway import completions
from slotfill.gateway.errors import APIError, error_body, unavailable
from slotfill.gateway.limits import BodyLimit
from slotfill.gateway.metrics import Metrics, MetricsMiddleware
from slotfill.gateway.settings import GatewaySettings
from slotfill.gateway.state import Gateway

log = logging.getLogger("slotfill.gateway")


def create_app(settings: GatewaySettings | None = None,
               client_settings: ClientSettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    client_settings = client_settings or ClientSettings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = Gateway.connect(settings, client_settings)
        gw.on_abandon = metrics.abandoned.inc
        app.state.gateway = gw
        pump = asyncio.create_task(_pump_batches(gw))
        try:
            yield
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            await gw.redis.aclose()

    app = FastAPI(title="slotfill gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.metrics = metrics
    app.include_router(completions.router)
    _routers(app)
    _handlers(app)
    app.add_middleware(BodyLimit, max_body=settings.max_body_bytes,
                       max_file=settings.max_file_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/health", include_in_schema=False)
    async def health(request: Request) -> Any:
        await request.app.state.gateway.redis.ping()
        return {"status": "ok"}

    return app


def _routers(app: FastAPI) -> None:
    from slotfill.gateway import batches, files, responses

    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(responses.router)


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def redis_down(_request: Request, e: Exception) -> JSONResponse:
        log.warning("redis unreachable: %s", e)
        err = unavailable()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(error_body(str(e.detail), kind, code), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return JSONResponse(error_body(f"{where}: {first.get('msg', 'invalid')}",
                                       "invalid_request_error", "invalid_request",
                                       where or None), status_code=400)


async def _pump_batches(gw: Gateway) -> None:
    """Advance unfinished batches now and then, so they finish without anyone polling."""
    from slotfill.gateway.batch_run import pump_active

    while True:
        await asyncio.sleep(gw.settings.batch_pump_seconds)
        try:
            await pump_active(gw)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            log.warning("batch pump: redis unreachable (%s)", e)  # the next round retries
        except Exception:
            log.exception("batch pump")
