"""The HTTP app: ``create_app(settings, *, feature_store=None)``.

The lifespan opens the feature store (unless one is injected, as tests do) and loads the model
in the background: /healthz answers at once, /readyz turns 200 once the model, the index and
every batch shape are warm and the feature store answers with the model's feature version. A
model that cannot load leaves the process serving /healthz, /metrics and a /readyz 503 naming
the reason.
"""

# No `from __future__ import annotations`: the routes' Annotated dependencies are closures,
# which FastAPI could not resolve from string annotations.
import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Annotated

import orjson
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import pages
from service.errors import FeatureStoreError, FusionRankError, ServiceNotReady
from service.features import FeatureStore, open_feature_store
from service.metrics import CONTENT_TYPE, OTHER_ROUTE, ServiceMetrics
from service.pipeline import Pipeline
from service.schemas import (
    ErrorResponse,
    RankRequest,
    RankResponse,
    ReadinessResponse,
    ValidationErrorResponse,
    rank_request_model,
    validation_errors,
)
from service.settings import Settings

log = logging.getLogger("service")

JSON = "application/json"


class Runtime:
    """The loaded state of one app: the pipeline once it is ready, or why it is not."""

    def __init__(
        self, settings: Settings, metrics: ServiceMetrics, store: FeatureStore | None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pipeline: Pipeline | None = None
        self.problem = "starting"
        self.loaded = asyncio.Event()  # set when loading ended, ready or not
        self._store = store
        self._owns_store = store is None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._load(), name="load-model")

    async def _load(self) -> None:
        settings = self.settings
        try:
            if self._store is None:
                self._store = open_feature_store(
                    settings.redis_url,
                    settings.embedded_features_dir,
                    prefix=settings.redis_prefix,
                    timeout_s=settings.feature_timeout_s,
                )
            self.problem = "loading the model"
            pipeline = await Pipeline.load(settings, self._store, self.metrics)
            manifest = pipeline.manifest
            self.metrics.model_loaded(manifest.version, manifest.strategy, pipeline.provider)
            self.pipeline, self.problem = pipeline, ""
        except FusionRankError as exc:
            self.problem = f"model not loaded: {exc}"
            log.error("%s", self.problem)
        except Exception as exc:  # anything else must still leave the process answering
            self.problem = f"model not loaded: {type(exc).__name__}: {exc}"
            log.exception("model not loaded")
        finally:
            # Start-up garbage is collected once and then never scanned again: collections
            # walking it were the p99 (shared NOTES).
            gc.collect()
            gc.freeze()
            self.loaded.set()

    def require_pipeline(self) -> Pipeline:
        if self.pipeline is None:
            raise ServiceNotReady(f"not ready: {self.problem}")
        return self.pipeline

    async def readiness(self) -> ReadinessResponse:
        pipeline = self.pipeline
        if pipeline is None:
            return ReadinessResponse(ready=False, detail=self.problem)
        status = ReadinessResponse(
            ready=True,
            detail="ready",
            model_version=pipeline.version,
            execution_provider=pipeline.provider,
            features_version=pipeline.fetcher.version,
        )
        try:
            await asyncio.to_thread(pipeline.fetcher.check)
        except FeatureStoreError as exc:
            return status.model_copy(update={"ready": False, "detail": f"feature store: {exc}"})
        return status

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.pipeline is not None:
            await self.pipeline.close()
        if self._owns_store and self._store is not None:
            self._store.close()


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

    async def rank_request(request: Request) -> RankRequest:
        body = await _read_body(request, settings.max_body_bytes)
        try:
            return request_model.model_validate_json(body)
        except ValidationError as exc:
            raise RequestValidationError(validation_errors(exc)) from None

    async def runtime(request: Request) -> Runtime:
        current: Runtime | None = request.app.state.runtime
        if current is None:
            raise ServiceNotReady("not ready: starting")
        return current

    async def pipeline(current: Annotated[Runtime, Depends(runtime)]) -> Pipeline:
        return current.require_pipeline()

    @app.post(
        "/rank",
        summary="Rank candidates (given, or retrieved) for a query.",
        responses={
            200: {"model": RankResponse, "description": "Items by score, best first."},
            413: {"model": ErrorResponse, "description": "Request body too large."},
            422: {"model": ValidationErrorResponse, "description": "Invalid body."},
            503: {"model": ErrorResponse, "description": "Not ready, or a dependency is down."},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": request_model.model_json_schema()}},
            }
        },
    )
    async def rank(
        # Declared first: FastAPI resolves dependencies in order, so bad input is a 422
        # even while the model loads.
        body: Annotated[RankRequest, Depends(rank_request)],
        ranker: Annotated[Pipeline, Depends(pipeline)],
    ) -> Response:
        return Response(await ranker.rank(body), media_type=JSON)

    @app.get("/healthz", summary="200 while the process serves.")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get(
        "/readyz",
        summary="200 once the model is warm and the feature store answers, else 503.",
        responses={200: {"model": ReadinessResponse}, 503: {"model": ReadinessResponse}},
    )
    async def readyz(request: Request) -> Response:
        current: Runtime | None = request.app.state.runtime
        if current is None:
            status = ReadinessResponse(ready=False, detail="starting")
        else:
            status = await current.readiness()
        return Response(
            status.model_dump_json(), status_code=200 if status.ready else 503, media_type=JSON
        )

    @app.get("/metrics", summary="Prometheus text format.")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        detail = [
            {"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]}
            for error in exc.errors()
        ]
        return Response(orjson.dumps({"detail": detail}), status_code=422, media_type=JSON)

    @app.exception_handler(FeatureStoreError)
    @app.exception_handler(ServiceNotReady)
    async def unavailable(request: Request, exc: FusionRankError) -> Response:
        return Response(orjson.dumps({"detail": str(exc)}), status_code=503, media_type=JSON)

    app.add_middleware(
        HTTPMetricsMiddleware, metrics=metrics, routes=[route.path for route in app.routes]
    )
    # The search page and /items (service/pages.py); after the metrics' route list, which
    # holds only routes with a path (they count under "other").
    app.include_router(pages.router)
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise HTTPException(413, f"request body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
