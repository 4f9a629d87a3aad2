"""The loaded state of one worker: its feature store, its thread pools, and the pipeline of
the model version it serves, or why it serves none.

Loading runs in the background (``/healthz`` answers at once; ``/readyz`` turns 200 once the
model, the index and every batch shape are warm and the store holds the model's features
whole). ``reload`` swaps the model without downtime: each request leases the pipeline it
starts with, and a replaced pipeline closes once its last request has finished.

Rolling upgrades: with ``follow_published`` the runtime polls the store's pointer (every
``follow_interval_s``, jittered so replicas do not move at once) and, when the pointer names
features of a model other than the one it serves, reloads the version ``models/CURRENT``
names once that version's features are the published ones. Until its new model is warm a
replica keeps serving the old one from the old features, which the publisher keeps
(``Retention``), so a fleet switches one replica at a time without an unready moment.

Routes reach the runtime through ``runtime_of`` (plain ASGI) or ``RuntimeDep`` (FastAPI).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.applications import Starlette

from service.errors import (
    FeatureStoreError,
    FeatureVersionMissing,
    FusionRankError,
    ModelRejected,
    ServiceNotReady,
)
from service.executors import Pools
from service.features import FeatureStore, open_feature_store
from service.manifest import Manifest, load_manifest, resolve_version_dir
from service.metrics import ServiceMetrics
from service.pipeline import Pipeline
from service.schemas import ReadinessResponse
from service.settings import Settings

log = logging.getLogger("service")


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
        self.pools = Pools.create(settings.feature_store_threads, settings.compute_threads)
        self.pipeline: Pipeline | None = None
        self.problem = "starting"
        self.loaded = asyncio.Event()  # set when loading ended, ready or not
        self._store = store
        self._owns_store = store is None
        self._tasks: list[asyncio.Task[None]] = []
        self._users: Counter[Pipeline] = Counter()  # requests in flight on each pipeline
        self._idle: dict[Pipeline, asyncio.Event] = {}  # replaced pipelines, set when unused
        self._reloading = asyncio.Lock()
        self._follow_note = ""  # the last thing following the pointer logged

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._load(), name="load-model"))
        if self.settings.follow_published:
            self._tasks.append(loop.create_task(self._follow(), name="follow-published"))

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            raise ServiceNotReady("not ready: the feature store is not open yet")
        return self._store

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
            pipeline = await Pipeline.load(settings, self._store, self.metrics, self.pools)
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

        Refused (ModelRejected; the old model keeps serving) unless the feature store holds
        the version's features whole, laid out as the model reads them: a model scores the
        item vectors of the export it came from, so those must be published first. Raises
        ArtifactError for a missing or broken version, FeatureStoreError when the store is down.
        """
        if not self.loaded.is_set():
            raise ServiceNotReady("not ready: the start-up model is still loading")
        async with self._reloading:
            started = time.perf_counter()
            settings = self.settings
            version_dir = await asyncio.to_thread(resolve_version_dir, settings.models_dir, version)
            manifest = await asyncio.to_thread(load_manifest, version_dir)
            old = self.pipeline
            if old is not None and old.version == manifest.version:
                return Swap(old.version, old.version, old.fetcher.version, 0.0, True)
            await self.pools.store.run(self._check_features, manifest)
            new = await Pipeline.load(
                settings.model_copy(update={"model_version": manifest.version}),
                self.store,
                self.metrics,
                self.pools,
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
        """Refuse a model whose features are not stored whole (blocking: a pool thread)."""
        version = manifest.version
        try:
            layout = self.store.layout(manifest.features_version)
        except FeatureVersionMissing:
            raise ModelRejected(
                f"model {version} reads features {manifest.features_version}, which the feature "
                f"store does not hold (its newest published: {self.store.current_version()}): "
                "publish that model's features first (python -m export); still serving the "
                "previous model"
            ) from None
        if layout != manifest.layout:
            raise ModelRejected(
                f"model {version} reads features laid out as {manifest.layout}, the stored "
                f"features {manifest.features_version} are {layout}; still serving the "
                "previous model"
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

    # -- following the published pointer ------------------------------------------------

    async def _follow(self) -> None:
        await self.loaded.wait()
        interval = self.settings.follow_interval_s
        while True:
            await asyncio.sleep(interval * random.uniform(0.5, 1.5))  # replicas drift apart
            try:
                await self.follow_once()
            except FusionRankError as exc:
                self._note(logging.WARNING, f"following the published features: {exc}")
            except Exception:  # the loop must outlive any one failure
                log.exception("following the published features failed")

    async def follow_once(self) -> Swap | None:
        """One poll: reload when the published features belong to another model than the one
        served and models/CURRENT names that model; the swap, or None."""
        published = await self.pools.store.run(self.store.current_version)
        serving = self.pipeline
        if published is None or (serving is not None and serving.fetcher.version == published):
            return None
        version_dir = await asyncio.to_thread(resolve_version_dir, self.settings.models_dir)
        manifest = await asyncio.to_thread(load_manifest, version_dir)
        if manifest.features_version != published:
            self._note(
                logging.INFO,
                f"published features {published}; models/CURRENT names {manifest.version} "
                f"with features {manifest.features_version}: waiting for both to agree",
            )
            return None
        if serving is not None and serving.version == manifest.version:
            return None
        self._note(logging.INFO, f"following the published features {published}")
        return await self.reload(manifest.version)

    def _note(self, level: int, message: str) -> None:
        """Log ``message`` unless it is what following logged last (polls repeat it)."""
        if message != self._follow_note:
            self._follow_note = message
            log.log(level, "%s", message)

    # -- readiness and shutdown ----------------------------------------------------------

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
            async with asyncio.timeout(timeout_s):
                await self.pools.store.run(pipeline.fetcher.check)
        except FeatureStoreError as exc:
            return status.model_copy(update={"ready": False, "detail": f"feature store: {exc}"})
        except TimeoutError:
            detail = f"feature store: no answer within {timeout_s:g} s"
            return status.model_copy(update={"ready": False, "detail": detail})
        return status

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.pipeline is not None:
            await self.pipeline.close()
        for retired in list(self._idle):  # replaced models still draining
            await retired.close()
        self.pools.close()
        if self._owns_store and self._store is not None:
            self._store.close()


def runtime_of(app: Starlette) -> Runtime:
    """The app's runtime; ServiceNotReady before the lifespan started it or after it ended."""
    runtime: Runtime | None = app.state.runtime
    if runtime is None:
        raise ServiceNotReady("not ready: starting")
    return runtime


def current_runtime(request: Request) -> Runtime:
    return runtime_of(request.app)


RuntimeDep = Annotated[Runtime, Depends(current_runtime)]
