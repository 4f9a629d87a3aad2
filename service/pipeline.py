"""The request path, composed from the stages of one loaded model version.

    query -> encode (LRU cache) -> candidates (given, or FAISS top retrieve_k)
          -> features (in-process cache, the rest in one feature store round trip)
          -> batched scoring -> top_k

Blocking work runs off the event loop on bounded pools (service.executors): the query encoder
and FAISS on the compute pool, feature store round trips on the store pool, scoring on the
batcher's inference thread; cache probes run on the loop. A request whose item vectors are all
cached never waits for the store pool, so a hung store cannot delay it. With given candidates
and both caches missing, encoding and fetching overlap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from service.errors import ArtifactError, FeatureStoreError
from service.executors import Pools
from service.features import FeatureBatch, FeatureStore
from service.manifest import Manifest, load_manifest, resolve_version_dir
from service.metrics import ServiceMetrics
from service.schemas import RankRequest, render_ranking
from service.settings import Settings
from service.stages.batcher import Batcher
from service.stages.feature_cache import CacheProbe
from service.stages.feature_fetch import FeatureFetcher
from service.stages.query_encoder import EncodedQuery, QueryEncoder
from service.stages.retrieval import Retriever
from service.stages.scoring import QUERY_DIMS, Scorer

log = logging.getLogger(__name__)

WARM_UP_QUERY = "warm up"


@dataclass(frozen=True)
class _Stages:
    """What loading a model version produces (all blocking loads, done on a thread)."""

    manifest: Manifest
    encoder: QueryEncoder
    retriever: Retriever
    scorer: Scorer


class Pipeline:
    def __init__(
        self,
        manifest: Manifest,
        encoder: QueryEncoder,
        retriever: Retriever,
        fetcher: FeatureFetcher,
        scorer: Scorer,
        batcher: Batcher,
        metrics: ServiceMetrics,
        pools: Pools,
    ) -> None:
        self.manifest = manifest
        self.encoder = encoder
        self.retriever = retriever
        self.fetcher = fetcher
        self.scorer = scorer
        self.batcher = batcher
        self._metrics = metrics
        self._pools = pools

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def provider(self) -> str:
        return self.scorer.provider

    @classmethod
    async def load(
        cls, settings: Settings, store: FeatureStore, metrics: ServiceMetrics, pools: Pools
    ) -> Pipeline:
        """Load the model version named by settings, then warm every batch shape."""
        stages = await asyncio.to_thread(_load_stages, settings)
        scorer = stages.scorer
        batcher = Batcher(
            scorer.run,
            buckets=scorer.buckets,
            query_dims=QUERY_DIMS,
            feature_dims=scorer.feature_dims,
            query_dtype=scorer.query_dtype,
            max_wait_us=settings.batch_max_wait_us,
            observer=metrics,
        )
        manifest = stages.manifest
        fetcher = FeatureFetcher(
            store,
            manifest.layout,
            manifest.features_version,
            cache_items=settings.feature_cache_items,
            observer=metrics,
        )
        pipeline = cls(
            manifest, stages.encoder, stages.retriever, fetcher, scorer, batcher, metrics, pools
        )
        try:
            await pipeline._warm_up()
        except BaseException:
            await batcher.close()
            raise
        return pipeline

    async def _warm_up(self) -> None:
        started = time.perf_counter()
        self.batcher.start()
        await self.batcher.warm_up()
        encoded = await self._pools.compute.run(self.encoder.encode, WARM_UP_QUERY)
        if encoded.retrieval_vector.shape != (self.retriever.dims,):
            raise ArtifactError(
                f"query_encoder gives a retrieval_vector of {encoded.retrieval_vector.shape[0]} "
                f"dims, the index has {self.retriever.dims}"
            )
        await self._pools.compute.run(self.retriever.search, encoded.retrieval_vector, 1)
        await self._warm_feature_cache()
        log.info(
            "model %s (%s, %s) warmed on %s in %.2f s (buckets %s)",
            self.version,
            self.encoder.graph,
            self.scorer.graph,
            self.provider,
            time.perf_counter() - started,
            self.batcher.warmed,
        )

    async def _warm_feature_cache(self) -> None:
        """Fill the feature cache with the indexed items (as many as it holds), so the first
        requests do not all go to the store. Best effort: a store that is down or serves
        other features leaves the cache to fill from traffic, and /readyz reports the store."""
        started = time.perf_counter()
        try:
            rows = await self._pools.store.run(self.fetcher.warm, self.retriever.ids)
        except FeatureStoreError as exc:
            log.warning("feature cache not warmed (it fills from traffic): %s", exc)
            return
        if rows:
            log.info("feature cache warmed: %d rows in %.2f s", rows, time.perf_counter() - started)

    async def close(self) -> None:
        await self.batcher.close()

    # -- the request path ------------------------------------------------------------------

    async def rank(self, request: RankRequest) -> bytes:
        """The JSON body answering ``request``."""
        if request.candidate_ids == []:
            return render_ranking([], [], self.version, [])
        metrics = self._metrics
        started = time.perf_counter()
        encoded = self.encoder.lookup(request.query)
        if encoded is None:
            metrics.cache_misses.inc()
        else:
            metrics.cache_hits.inc()
            metrics.observe_stage("encode", time.perf_counter() - started)

        compute, store = self._pools.compute, self._pools.store
        if request.candidate_ids is not None:
            ids = request.candidate_ids
        else:
            encoded, ids = await compute.run(
                self._encode_and_retrieve, request.query, encoded, request.retrieve_k
            )
        fetch_started = time.perf_counter()
        probe = self.fetcher.probe(ids)  # once per request, on the loop
        if probe is not None and probe.complete:  # no I/O left: stay on the loop
            batch = self._fetch(ids, probe, fetch_started)
            if encoded is None:
                encoded = await compute.run(self._encode, request.query)
        elif encoded is None:
            encoded, batch = await asyncio.gather(
                compute.run(self._encode, request.query),
                store.run(self._fetch, ids, probe, fetch_started),
            )
        else:
            batch = await store.run(self._fetch, ids, probe, fetch_started)

        if batch.missing:
            metrics.missing_ids.inc(len(batch.missing))
        with metrics.stage("score"):
            scores = await self.batcher.score(encoded.embedding, batch.matrix)

        order = _top_k(scores.score, request.top_k)
        positions = batch.found[order].tolist()
        contributions = None
        if request.explain:
            contributions = (
                scores.text_contribution[order].tolist(),
                scores.image_contribution[order].tolist(),
            )
        return render_ranking(
            [ids[p] for p in positions],
            scores.score[order].tolist(),
            self.version,
            batch.missing,
            contributions,
        )

    # Stage calls, each timed. They block (pool threads), except a fetch whose cache probe
    # was complete, which does no I/O and runs on the loop.

    def _encode(self, query: str) -> EncodedQuery:
        with self._metrics.stage("encode"):
            return self.encoder.encode(query)

    def _fetch(
        self, ids: list[str], probe: CacheProbe | None = None, started: float | None = None
    ) -> FeatureBatch:
        """Timed from ``started`` (when the request's cache probe began), else from now."""
        started = time.perf_counter() if started is None else started
        batch = self.fetcher.fetch(ids, probe)
        self._metrics.observe_stage("fetch", time.perf_counter() - started)
        return batch

    def _encode_and_retrieve(
        self, query: str, encoded: EncodedQuery | None, k: int
    ) -> tuple[EncodedQuery, list[str]]:
        if encoded is None:
            encoded = self._encode(query)
        with self._metrics.stage("retrieve"):
            return encoded, self.retriever.search(encoded.retrieval_vector, k)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores, best first (ties keep candidate order)."""
    if k < len(scores):
        best = np.argpartition(-scores, k - 1)[:k]
        best.sort()  # candidate order, so the stable sort below breaks ties by position
        return best[np.argsort(-scores[best], kind="stable")]
    return np.argsort(-scores, kind="stable")


def _load_stages(settings: Settings) -> _Stages:
    version_dir = resolve_version_dir(settings.models_dir, settings.model_version)
    manifest = load_manifest(version_dir)
    common = {"device": settings.device, "threads": settings.intra_op_threads}
    encoder = QueryEncoder.load(
        version_dir,
        manifest,
        cache_size=settings.query_cache_size,
        int8=settings.query_encoder_int8,
        **common,
    )
    retriever = Retriever.load(version_dir, manifest, threads=settings.intra_op_threads)
    scorer = Scorer.load(
        version_dir,
        manifest,
        max_batch=settings.batch_max_size,
        min_bucket=settings.batch_min_bucket,
        **common,
    )
    if retriever.dims != manifest.layout.dims:
        raise ArtifactError(
            f"{version_dir}: the index has {retriever.dims} dims, the feature layout "
            f"{manifest.layout.dims}"
        )
    return _Stages(manifest, encoder, retriever, scorer)
