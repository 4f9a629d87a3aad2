"""The HTTP app: ``create_app(settings, *, feature_store=None)``.

The lifespan opens the feature store (unless one is injected, as tests do) and loads the model
in the background: /healthz answers at once, /readyz turns 200 once the model, the index and
every batch shape are warm and the feature store answers with the model's feature version. A
model that cannot load leaves the process serving /healthz, /metrics and a /readyz 503 naming
the reason.

Faults and overload: at most ``max_in_flight`` requests are served at once (service.limits);
a /rank that runs past ``request_timeout_s`` is answered 503; every 503 carries Retry-After
and a JSON reason. ``POST /admin/reload`` (service.admin) swaps the model without downtime:
each request leases the pipeline it starts with, and a replaced pipeline closes once its last
request has finished.
"""

import asyncio
import gc
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Collection, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
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
from service.errors import (
    DeadlineExceeded,
    FeatureStoreError,
    FusionRankError,
    ModelRejected,
    ServiceNotReady,
)
from service.features import FeatureStore, open_feature_store
from service.limits import InFlightLimit
from service.manifest import Manifest, load_manifest, resolve_version_dir
from service.metrics import CONTENT_TYPE, OTHER_ROUTE, ServiceMetrics
from service.pipeline import Pipeline
from service.rank_endpoint import RankEndpoint, documentation_route
from service.schemas import (
    ReadinessResponse,
    rank_request_model,
)
from service.settings import Settings

log = logging.getLogger("service")

JSON = "application/json"


@dataclass(frozen=True)
class Swap:
    """What one model reload did."""

    model_version: str
    previous_version: str | None
    features_version: str
    load_seconds: float
    drained: bool  # the previous model's in-flight requests all finished on it


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
        self._users: Counter[Pipeline] = Counter()  # requests in flight on each pipeline
        self._idle: dict[Pipeline, asyncio.Event] = {}  # replaced pipelines, set when unused
        self._reloading = asyncio.Lock()

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

    @contextmanager
    def lease(self) -> Iterator[Pipeline]:
        """The current pipeline, kept open until the block ends even if a reload replaces it."""
        pipeline = self.require_pipeline()
        self._users[pipeline] += 1
        try:
            yield pipeline
        finally:
            self._users[pipeline] -= 1
            if self._users[pipeline] == 0:
                del self._users[pipeline]
                if pipeline in self._idle:
                    self._idle[pipeline].set()

    async def reload(self, version: str | None) -> Swap:
        """Load ``version`` (default: the one models/CURRENT names) beside the current model,
        warm it, switch to it atomically, then close the old one once its last request is done.

        Refused (ModelRejected; the old model keeps serving) when the version's features are
        not the ones the feature store serves: a model reads item features of the export it
        came from, so a retrained model needs its features published first. Raises
        ArtifactError for a missing or broken version, FeatureStoreError when the store is down.
        """
        if self._task is not None and not self._task.done():
            raise ServiceNotReady("not ready: the start-up model is still loading")
        async with self._reloading:
            started = time.perf_counter()
            settings = self.settings
            version_dir = await asyncio.to_thread(resolve_version_dir, settings.models_dir, version)
            manifest = await asyncio.to_thread(load_manifest, version_dir)
            old = self.pipeline
            if old is not None and old.version == manifest.version:
                return Swap(old.version, old.version, old.fetcher.version, 0.0, True)
            await asyncio.to_thread(self._check_features, manifest)
            new = await Pipeline.load(
                settings.model_copy(update={"model_version": manifest.version}),
                self._store,
                self.metrics,
            )
            seconds = time.perf_counter() - started
            # The switch: one assignment on the event loop. Requests that leased the old
            # pipeline finish on it; every later request gets the new one.
            self.pipeline, self.problem = new, ""
            if old is not None:
                self.metrics.model_info.labels(
                    old.version, old.manifest.strategy, old.provider
                ).set(0)
            self.metrics.model_loaded(new.version, new.manifest.strategy, new.provider)
            log.info(
                "model %s replaced %s (loaded in %.2f s)", new.version, old and old.version, seconds
            )
            drained = True
            if old is not None:
                drained = await self._retire(old, timeout_s=settings.shutdown_timeout_s)
            gc.collect()
            gc.freeze()
            return Swap(new.version, old and old.version, new.fetcher.version, seconds, drained)

    def _check_features(self, manifest: Manifest) -> None:
        """Refuse a model whose features are not the published ones (blocking: a thread)."""
        store, version = self._store, manifest.version
        assert store is not None
        published = store.current_version()
        if published != manifest.features_version:
            raise ModelRejected(
                f"model {version} was exported with features {manifest.features_version}, the "
                f"feature store serves {published}: publish that model's features first "
                f"(python -m export); still serving the previous model"
            )
        layout = store.layout()
        if layout != manifest.layout:
            raise ModelRejected(
                f"model {version} reads features laid out as {manifest.layout}, the published "
                f"features {published} are {layout}; still serving the previous model"
            )

    async def _retire(self, old: Pipeline, timeout_s: float) -> bool:
        """Close ``old`` once no request uses it (or after ``timeout_s``); True if drained."""
        idle = self._idle.setdefault(old, asyncio.Event())
        if self._users[old] == 0:
            self._users.pop(old, None)
            idle.set()
        try:
            await asyncio.wait_for(idle.wait(), timeout_s)
            drained = True
        except TimeoutError:
            log.warning(
                "model %s still had requests after %.0f s: closing it", old.version, timeout_s
            )
            drained = False
        finally:
            self._idle.pop(old, None)
        await old.close()
        return drained

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
        timeout_s = 2 * self.settings.feature_timeout_s  # check() makes two round trips
        try:
            await asyncio.wait_for(asyncio.to_thread(pipeline.fetcher.check), timeout_s)
        except FeatureStoreError as exc:
            return status.model_copy(update={"ready": False, "detail": f"feature store: {exc}"})
        except TimeoutError:
            detail = f"feature store: no answer within {timeout_s:g} s"
            return status.model_copy(update={"ready": False, "detail": detail})
        return status

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.pipeline is not None:
            await self.pipeline.close()
        for retired in list(self._idle):  # replaced models still draining
            await retired.close()
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
            app.openapi_schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=[rank_documentation, *app.routes],
            )
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
        current: Runtime | None = request.app.state.runtime
        if current is None:
            status = ReadinessResponse(ready=False, detail="starting")
        else:
            status = await current.readiness()
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

    retry_after = {"retry-after": str(settings.retry_after_s)}

    @app.exception_handler(FeatureStoreError)
    @app.exception_handler(ServiceNotReady)
    @app.exception_handler(DeadlineExceeded)
    async def unavailable(request: Request, exc: FusionRankError) -> Response:
        return Response(
            orjson.dumps({"detail": str(exc)}),
            status_code=503,
            media_type=JSON,
            headers=retry_after,
        )

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
