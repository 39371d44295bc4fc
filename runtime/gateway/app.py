"""The FastAPI application for every role.

All roles serve ``/healthz``, ``/readyz`` and ``/metrics``; the gateway role
adds the WebSocket endpoint, the REST API, local media URLs and the demo page.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import imhub
from imhub.runtime import auth, errors, observability, protocol, wiring
from imhub.runtime.gateway import connections, media, rest, ws

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_STATUS_CODES = {
    400: errors.ErrorCode.INVALID_PAYLOAD,
    401: errors.ErrorCode.UNAUTHORIZED,
    403: errors.ErrorCode.FORBIDDEN,
    404: errors.ErrorCode.NOT_FOUND,
    405: errors.ErrorCode.INVALID_PAYLOAD,
    409: errors.ErrorCode.CONFLICT,
    413: errors.ErrorCode.TOO_LARGE,
    422: errors.ErrorCode.INVALID_PAYLOAD,
    429: errors.ErrorCode.RATE_LIMITED,
}


def _error_response(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    observability.ERRORS.labels(code).inc()
    return JSONResponse({"error": body}, status_code=status)


class AccessLog:
    """One JSON line per HTTP request: method, path (no query: it may hold a
    signature), status, duration, request id and tenant. The request id comes
    from ``X-Request-ID`` when the caller sends one and is echoed back."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if 0 < len(given) <= 64 and given.isprintable() else uuid.uuid4().hex
        scope.setdefault("state", {})
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        with observability.log_context(request_id=request_id):
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                if scope["path"] not in ("/healthz", "/readyz", "/metrics"):
                    logger.info(
                        "request",
                        extra={
                            "method": scope["method"],
                            "path": scope["path"],
                            "status": status,
                            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                            "tenant_id": scope["state"].get("tenant_id"),
                        },
                    )


def create_app(runtime: wiring.Runtime) -> FastAPI:
    hub: connections.Hub | None = None
    if "gateway" in runtime.roles:
        hub = connections.Hub(
            instance_id=runtime.config.instance_id,
            registry=runtime.registry,
            bus=runtime.bus,
            cache=runtime.cache,
            ack_timeout=runtime.config.ack_timeout_seconds,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        if hub is not None:
            runtime.spawn(hub.run_events(runtime.stop_event), "gateway-events")
            runtime.spawn(hub.run_housekeeping(runtime.stop_event), "gateway-housekeeping")
            await hub.ready.wait()
        # What start-up allocated lives as long as the process: keep it out of
        # the collector's way, so full collections stay short.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if hub is not None:
                await hub.close_all(protocol.CloseCode.GOING_AWAY, "server shutting down")
            await runtime.stop()

    app = FastAPI(
        title="imhub",
        version=imhub.__version__,
        lifespan=lifespan,
        description="Multi-tenant instant messaging: REST API. The WebSocket protocol "
        "(`GET /v1/im/ws`) is described in the README.",
    )
    app.state.runtime = runtime
    app.state.hub = hub
    app.add_middleware(AccessLog)
    if runtime.config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=runtime.config.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
            max_age=600,
        )

    @app.exception_handler(errors.ImhubError)
    async def _imhub_error(_request: Request, exc: errors.ImhubError) -> JSONResponse:
        return _error_response(exc.http_status, exc.code.value, exc.message, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
            for e in exc.errors()[:5]
        ]
        return _error_response(422, "invalid_payload", "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, errors.ErrorCode.INTERNAL)
        return _error_response(exc.status_code, code.value, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error: %r", exc, exc_info=exc)
        return _error_response(500, "internal", "internal error")

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, Any]:
        return {"status": "ok" if runtime.healthy() else "degraded"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        checks = await runtime.readiness()
        ok = all(checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    if hub is None:
        return app

    app.include_router(rest.router)
    app.include_router(media.router)

    @app.websocket("/v1/im/ws")
    async def websocket(socket: WebSocket) -> None:
        await ws.serve_websocket(
            socket,
            hub=hub,
            verifier=runtime.verifier,
            registry=runtime.registry,
            config=runtime.config,
        )

    @app.get("/", include_in_schema=False, response_model=None)
    async def index() -> Response:
        if runtime.demo:
            return HTMLResponse(status_code=307, headers={"Location": "/demo"})
        return JSONResponse({"name": "imhub", "version": imhub.__version__, "docs": "/docs"})

    if runtime.demo:
        page = resources.files("imhub.runtime.gateway").joinpath("static/demo.html").read_text()

        @app.get("/demo", include_in_schema=False)
        async def demo_page() -> HTMLResponse:
            return HTMLResponse(page)

        @app.get("/demo/token", include_in_schema=False)
        async def demo_token(user: str) -> dict[str, Any]:
            if user not in DEMO_USERS:
                raise errors.NotFound("not a demo user")
            tenant = runtime.tenant(DEMO_TENANT)
            token, exp = auth.mint_token(tenant, user, ttl=12 * 3600)
            return {"token": token, "expires_at": exp, "tenant_id": DEMO_TENANT, "user_id": user}

    return app


DEMO_TENANT = "demo"
DEMO_USERS = ("alice", "bob", "carol")
