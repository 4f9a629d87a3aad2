"""The HTTP app: ``create_app(settings, *, feature_store=None)``.

The lifespan creates the worker's Runtime (service.runtime), which opens the feature store
(unless one is injected, as tests do) and loads the model in the background: /healthz answers
at once, /readyz turns 200 once the model, the index and every batch shape are warm and the
feature store holds the model's features whole. A model that cannot load leaves the process
serving /healthz, /metrics and a /readyz 503 naming the reason.

Faults and overload: at most ``max_in_flight`` requests are served at once (service.limits);
a /rank that runs past ``request_timeout_s`` is answered 503; every error is JSON, its status
decided by service.http_errors (503 + Retry-After only for transient conditions).
``POST /admin/reload`` (service.admin) swaps the model without downtime.
"""

import time
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import pages
from service.admin import admin_router
from service.errors import FusionRankError, ServiceNotReady
from service.features import FeatureStore
from service.http_errors import error_answer
from service.limits import InFlightLimit
from service.metrics import CONTENT_TYPE, OTHER_ROUTE, ServiceMetrics
from service.rank_endpoint import RankEndpoint, documentation_route, request_schema
from service.runtime import Runtime, runtime_of
from service.schemas import (
    ReadinessResponse,
    rank_request_model,
)
from service.settings import Settings

JSON = "application/json"


class HTTPMetricsMiddleware:
    """Counts requests by route, method and status, and times them (plain ASGI: cheap)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: Collection[str]) -> None:
        self._app = app
        self._metrics = metrics
        self._routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_status)
        finally:
            path = scope["path"]
            route = path if path in self._routes else OTHER_ROUTE
            self._metrics.observe_request(
                route, scope["method"], status, time.perf_counter() - started
            )


def create_app(
    settings: Settings | None = None, *, feature_store: FeatureStore | None = None
) -> FastAPI:
    """The service app. ``feature_store`` replaces the one the settings name (for tests)."""
    settings = settings or Settings()
    metrics = ServiceMetrics()
    request_model = rank_request_model(settings.request_limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, metrics, feature_store)
        app.state.runtime = runtime
        runtime.start()
        try:
            yield
        finally:
            app.state.runtime = None
            await runtime.close()

    app = FastAPI(
        title="FusionRank",
        summary="Online multimodal (text + image) ranking.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None

    # POST /rank: a plain ASGI endpoint (service/rank_endpoint.py), documented below.
    rank_endpoint = RankEndpoint(
        request_model,
        max_body_bytes=settings.max_body_bytes,
        request_timeout_s=settings.request_timeout_s,
        retry_after_s=settings.retry_after_s,
    )
    app.router.routes.append(Route("/rank", rank_endpoint, methods=["POST"]))
    rank_documentation = documentation_route(request_model)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=[rank_documentation, *app.routes],
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(request_schema(request_model)[1])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/healthz", summary="200 while the process serves.")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get(
        "/readyz",
        summary="200 once the model is warm and the feature store answers, else 503.",
        responses={200: {"model": ReadinessResponse}, 503: {"model": ReadinessResponse}},
    )
    async def readyz(request: Request) -> Response:
        try:
            status = await runtime_of(request.app).readiness()
        except ServiceNotReady:  # the lifespan has not started the runtime
            status = ReadinessResponse(ready=False, detail="starting")
        return Response(
            status.model_dump_json(), status_code=200 if status.ready else 503, media_type=JSON
        )

    @app.get("/metrics", summary="Prometheus text format.", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        detail = [
            {"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]}
            for error in exc.errors()
        ]
        return Response(orjson.dumps({"detail": detail}), status_code=422, media_type=JSON)

    # FusionRankError is answered by the routing's exception middleware; anything else
    # reaches Starlette's outermost one, which answers with this handler and re-raises so
    # the server logs the traceback.
    @app.exception_handler(FusionRankError)
    @app.exception_handler(Exception)
    async def mapped_error(request: Request, exc: Exception) -> Response:
        status, body, headers = error_answer(exc, settings.retry_after_s)
        return Response(body, status_code=status, media_type=JSON, headers=dict(headers))

    # Inside the metrics middleware, so refused requests are counted.
    app.add_middleware(
        InFlightLimit, limit=settings.max_in_flight, retry_after_s=settings.retry_after_s
    )

    app.add_middleware(
        HTTPMetricsMiddleware, metrics=metrics, routes=[route.path for route in app.routes]
    )
    # The search page and /items (service/pages.py); after the metrics' route list, which
    # holds only routes with a path (they count under "other").
    app.include_router(pages.router)
    if settings.admin_token is not None:  # POST /admin/reload (service/admin.py), same place
        app.include_router(admin_router(settings.admin_token))
    return app
