"""Build the FastAPI application: routers, JSON errors in one place, request metrics."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flux import __version__
from flux.api import devices, ingest, plugins, report, rules, sinks
from flux.api.auth import require_token
from flux.api.fast_ingest import FastIngest
from flux.api.gateway import GatewayView
from flux.errors import FluxError
from flux.metrics import HTTP_REQUEST_DURATION

log = logging.getLogger(__name__)

DASHBOARD = Path(__file__).with_name("static") / "dashboard.html"


class _RequestMetrics:
    """ASGI middleware observing ``flux_http_request_duration_seconds`` per route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            HTTP_REQUEST_DURATION.labels(scope["method"], path, str(status)).observe(
                time.perf_counter() - started
            )


def _error(status: int, kind: str, message: str, **fields: Any) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message, **fields}, status_code=status)


def create_api(gateway: GatewayView) -> FastAPI:
    """Return the ASGI app serving ``gateway``."""
    api = FastAPI(
        title="flux",
        version=__version__,
        description="IoT edge gateway: MQTT/HTTP ingest, Lua rules, WebAssembly plugins, SQL.",
    )
    api.state.gateway = gateway
    api.add_middleware(_RequestMetrics)
    api.add_middleware(FastIngest, gateway=gateway)  # outermost: before the metrics layer

    @api.exception_handler(FluxError)
    async def _flux_error(_request: Request, exc: FluxError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": list(error.get("loc", ())), "msg": error.get("msg", "")}
            for error in exc.errors()
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"])
        return _error(422, "ValidationError", f"{where}: {first['msg']}", details=details)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "HTTPError", str(exc.detail))

    @api.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in the HTTP API")
        return _error(500, "InternalError", "internal error; see the gateway log")

    protected = [Depends(require_token)]
    api.include_router(ingest.router, prefix="/api/v1", dependencies=protected)
    api.include_router(devices.router, prefix="/api/v1", dependencies=protected)
    api.include_router(rules.router, prefix="/api/v1", dependencies=protected)
    api.include_router(plugins.router, prefix="/api/v1", dependencies=protected)
    api.include_router(sinks.router, prefix="/api/v1", dependencies=protected)
    api.include_router(report.router, prefix="/api/v1", dependencies=protected)

    @api.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """A small live page: readiness, bus depth, rules, plugin pools, devices, alerts."""
        return HTMLResponse(DASHBOARD.read_text(encoding="utf-8"))

    @api.get("/health", tags=["operations"])
    async def health() -> dict[str, str]:
        """Liveness: the process is up and serving."""
        return {"status": "ok", "version": __version__}

    @api.get("/ready", tags=["operations"], responses={503: {"description": "not ready"}})
    async def ready() -> JSONResponse:
        """Readiness: intake open, database writable, MQTT connected; plus what is degraded.

        503 while a check fails; ``degraded`` lists every current reason (also those that
        only report, such as ``bus_backlog``) and ``reasons`` says more about each.
        """
        checks = gateway.readiness()
        reasons = gateway.degraded()
        ok = all(checks.values())
        body = {"ready": ok, "checks": checks, "degraded": sorted(reasons), "reasons": reasons}
        return JSONResponse(body, status_code=200 if ok else 503)

    @api.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics (also served on the metrics port)."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return api


__all__ = ["create_api"]
