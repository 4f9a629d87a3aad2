"""The request path, composed from the stages of one loaded model version.

    query -> encode (LRU cache) -> candidates (given and filtered, or FAISS's top retrieve_k
             among the items the filters allow) -> features (in-process cache, the rest in one
             feature store round trip) -> batched scoring -> boosts -> top_k (diversity caps)

A photo (``image``) is encoded to its photo vector and retrieves from the photo index instead;
without a query its candidates are ranked by the cosine of photo vectors, which live in the
process (no feature store round trip); with a query the model ranks them as above. ``like_id``
retrieves and ranks by the item's own stored vector.

Blocking work runs off the event loop on bounded pools (service.executors): the query encoder
and FAISS on the compute pool, feature store round trips on the store pool, scoring on the
batcher's inference thread; cache probes run on the loop. A request whose item vectors are all
cached never waits for the store pool, so a hung store cannot delay it. With given candidates
and both caches missing, encoding and fetching overlap.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from dataclasses import dataclass

import numpy as np

from service.errors import ArtifactError, FeatureStoreError, RequestRejected
from service.executors import Pools
from service.features import FeatureBatch, FeatureStore
from service.manifest import Manifest, load_manifest, resolve_version_dir
from service.metrics import ServiceMetrics
from service.schemas import RankRequest, render_ranking
from service.settings import Settings
from service.stages.attributes import ItemAttributes
from service.stages.batcher import Batcher
from service.stages.feature_cache import CacheProbe
from service.stages.feature_fetch import FeatureFetcher
from service.stages.photo_encoder import PhotoEncoder
from service.stages.photo_search import PhotoIndex
from service.stages.query_encoder import EncodedQuery, QueryEncoder
from service.stages.retrieval import Retriever
from service.stages.scoring import QUERY_DIMS, Scorer, Scores

log = logging.getLogger(__name__)

WARM_UP_QUERY = "warm up"


@dataclass(frozen=True)
class _Stages:
    """What loading a model version produces (all blocking loads, done on a thread)."""

    manifest: Manifest
    encoder: QueryEncoder
    retriever: Retriever
    scorer: Scorer
    attributes: ItemAttributes
    photo: PhotoEncoder
    photos: PhotoIndex


class Pipeline:
    def __init__(
        self,
        manifest: Manifest,
        encoder: QueryEncoder,
        retriever: Retriever,
        fetcher: FeatureFetcher,
        scorer: Scorer,
        attributes: ItemAttributes,
        photo: PhotoEncoder,
        photos: PhotoIndex,
        batcher: Batcher,
        metrics: ServiceMetrics,
        pools: Pools,
        max_image_bytes: int,
    ) -> None:
        self.manifest = manifest
        self.encoder = encoder
        self.retriever = retriever
        self.fetcher = fetcher
        self.scorer = scorer
        self.attributes = attributes
        self.photo = photo
        self.photos = photos
        self.batcher = batcher
        self._metrics = metrics
        self._pools = pools
        self._max_image_bytes = max_image_bytes

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
            manifest,
            stages.encoder,
            stages.retriever,
            fetcher,
            scorer,
            stages.attributes,
            stages.photo,
            stages.photos,
            batcher,
            metrics,
            pools,
            settings.max_image_bytes,
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
        photo = await self._pools.compute.run(self.photo.encode, _warm_up_photo())
        if photo.shape != (self.photos.dims,):
            raise ArtifactError(
                f"photo_head gives a photo_vector of {photo.shape[0]} dims, the photo index "
                f"has {self.photos.dims}"
            )
        await self._pools.compute.run(self.photos.search, photo, 1)
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
        filtered_out = 0
        if request.candidate_ids is not None and request.filters is not None:
            ids = request.candidate_ids
            keep = self.attributes.matches(request.filters, self.attributes.rows(ids))
            filtered_out = len(ids) - int(keep.sum())
            if filtered_out:
                kept = [item for item, ok in zip(ids, keep.tolist(), strict=True) if ok]
                request = request.model_copy(update={"candidate_ids": kept})
        if request.candidate_ids == []:
            return render_ranking([], [], self.version, [], filtered_out=filtered_out)
        metrics = self._metrics
        compute, store = self._pools.compute, self._pools.store
        query, like_id = request.query, request.like_id
        like = None if like_id is None else await self._item_vector(like_id)
        photo = None
        if request.image is not None:
            data = self._photo_bytes(request.image)
            with metrics.stage("encode"):
                photo = await compute.run(self.photo.encode, data)
        encoded = None
        if query is not None:
            started = time.perf_counter()
            encoded = self.encoder.lookup(query)
            if encoded is None:
                metrics.cache_misses.inc()
            else:
                metrics.cache_hits.inc()
                metrics.observe_stage("encode", time.perf_counter() - started)

        # The filter's mask is made here, on the loop (its cache is not shared with threads).
        allowed = None if request.filters is None else self.attributes.mask(request.filters)
        if request.candidate_ids is not None:
            ids = request.candidate_ids
        elif photo is not None:
            ids = await compute.run(self._retrieve_photo, photo, request.retrieve_k, allowed)
        elif like is not None:
            similar = await compute.run(self._retrieve, like, request.retrieve_k + 1, allowed)
            ids = [item for item in similar if item != like_id][: request.retrieve_k]
        else:
            assert query is not None  # the request model requires a query, image or like_id
            encoded, ids = await compute.run(
                self._encode_and_retrieve, query, encoded, request.retrieve_k, allowed
            )

        if query is None and photo is not None:
            found_ids, missing, scores = self._photo_scores(photo, ids)
        else:
            fetch_started = time.perf_counter()
            probe = self.fetcher.probe(ids)  # once per request, on the loop
            needs_encoding = query is not None and encoded is None
            if probe is not None and probe.complete:  # no I/O left: stay on the loop
                batch = self._fetch(ids, probe, fetch_started)
                if needs_encoding:
                    encoded = await compute.run(self._encode, query)
            elif needs_encoding:
                encoded, batch = await asyncio.gather(
                    compute.run(self._encode, query),
                    store.run(self._fetch, ids, probe, fetch_started),
                )
            else:
                batch = await store.run(self._fetch, ids, probe, fetch_started)
            found_ids, missing = [ids[p] for p in batch.found.tolist()], batch.missing
            if encoded is not None:
                with metrics.stage("score"):
                    scores = await self.batcher.score(encoded.embedding, batch.matrix)
            else:
                assert like is not None
                scores = _similarity(like, batch.matrix, self.fetcher.layout.text_dims)
        if missing:
            metrics.missing_ids.inc(len(missing))

        score = scores.score
        boost = None
        if request.boosts or request.diversity:
            rows = self.attributes.rows(found_ids)
        if request.boosts:
            boost = np.zeros(len(score), dtype=np.float32)
            for rule in request.boosts:
                boost[self.attributes.matches(rule.if_, rows)] += rule.add
            score = score + boost
        if request.diversity:
            caps = {
                name: (self.attributes.values(name, rows), limit)
                for name, limit in request.diversity.max_per.items()
            }
            order = _diverse_top_k(score, request.top_k, caps)
        else:
            order = _top_k(score, request.top_k)
        contributions = None
        if request.explain:
            contributions = (
                scores.text_contribution[order].tolist(),
                scores.image_contribution[order].tolist(),
                (np.zeros(len(order)) if boost is None else boost[order]).tolist(),
            )
        return render_ranking(
            [found_ids[p] for p in order.tolist()],
            score[order].tolist(),
            self.version,
            missing,
            contributions,
            filtered_out,
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

    async def _item_vector(self, item_id: str) -> np.ndarray:
        """The stored feature vector of an indexed item (float32), for like_id."""
        if self.attributes.rows([item_id])[0] < 0:
            raise RequestRejected(
                ["body", "like_id"], f"like_id {item_id!r}: no indexed item has this id"
            )
        probe = self.fetcher.probe([item_id])
        if probe is not None and probe.complete:
            batch = self.fetcher.fetch([item_id], probe)
        else:
            batch = await self._pools.store.run(self.fetcher.fetch, [item_id], probe)
        if not len(batch.found):
            raise RequestRejected(
                ["body", "like_id"], f"like_id {item_id!r}: the item has no stored vectors"
            )
        return batch.matrix[0].astype(np.float32)

    def _photo_bytes(self, image: str) -> bytes:
        """The photo of a request's base64 ``image``; a 413 past max_image_bytes, checked
        before anything is decoded."""
        limit = self._max_image_bytes
        if len(image) * 3 // 4 > limit + 2:
            raise RequestRejected(
                ["body", "image"], f"image: over {limit:,} bytes (max_image_bytes)", status=413
            )
        try:
            data = base64.b64decode(image, validate=True)
        except ValueError:  # binascii.Error, or characters outside ASCII
            raise RequestRejected(["body", "image"], "image: not base64") from None
        if len(data) > limit:
            raise RequestRejected(
                ["body", "image"], f"image: over {limit:,} bytes (max_image_bytes)", status=413
            )
        return data

    def _photo_scores(
        self, photo: np.ndarray, ids: list[str]
    ) -> tuple[list[str], list[str], Scores]:
        """A photo without text: the cosine of each candidate's photo vector to the photo's
        (all in process). Ids not in the index are missing."""
        with self._metrics.stage("score"):
            rows = self.attributes.rows(ids)
            known = rows >= 0
            found = [item for item, ok in zip(ids, known.tolist(), strict=True) if ok]
            missing = [item for item, ok in zip(ids, known.tolist(), strict=True) if not ok]
            similarity = self.photos.similarity(photo, rows[known])
        return found, missing, Scores(similarity, np.zeros_like(similarity), similarity)

    def _retrieve_photo(self, photo: np.ndarray, k: int, allowed: np.ndarray | None) -> list[str]:
        with self._metrics.stage("retrieve"):
            return self.photos.search(photo, k, allowed)

    def _retrieve(self, vector: np.ndarray, k: int, allowed: np.ndarray | None) -> list[str]:
        with self._metrics.stage("retrieve"):
            return self.retriever.search(vector, k, allowed)

    def _encode_and_retrieve(
        self, query: str, encoded: EncodedQuery | None, k: int, allowed: np.ndarray | None
    ) -> tuple[EncodedQuery, list[str]]:
        if encoded is None:
            encoded = self._encode(query)
        with self._metrics.stage("retrieve"):
            return encoded, self.retriever.search(encoded.retrieval_vector, k, allowed)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores, best first (ties keep candidate order)."""
    if k < len(scores):
        best = np.argpartition(-scores, k - 1)[:k]
        best.sort()  # candidate order, so the stable sort below breaks ties by position
        return best[np.argsort(-scores[best], kind="stable")]
    return np.argsort(-scores, kind="stable")


def _warm_up_photo() -> bytes:
    """A small white PNG: the first photo query must not pay for the graphs' first run."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (60, 80), (255, 255, 255)).save(out, format="PNG")
    return out.getvalue()


def _similarity(vector: np.ndarray, features: np.ndarray, text_dims: int) -> Scores:
    """Cosine similarity of each row of ``features`` to ``vector`` (both item vectors: text
    part, then image part), split exactly into what the text and the image parts add."""
    rows = features.astype(np.float32)
    norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(vector)
    norms[norms == 0] = 1.0
    text = rows[:, :text_dims] @ vector[:text_dims] / norms
    image = rows[:, text_dims:] @ vector[text_dims:] / norms
    return Scores(text + image, text, image)


def _diverse_top_k(
    scores: np.ndarray, k: int, caps: dict[str, tuple[np.ndarray, int]]
) -> np.ndarray:
    """Indices of the best scores, best first, taking at most ``limit`` items per value of each
    capped attribute (``values`` per candidate, -1: the item has none, never capped); an item
    over a quota is passed over for the next best. Greedy and stable (ties by position)."""
    taken: list[int] = []
    counts: dict[str, dict[int, int]] = {name: {} for name in caps}
    for position in np.argsort(-scores, kind="stable").tolist():
        over = False
        for name, (values, limit) in caps.items():
            value = int(values[position])
            if value >= 0 and counts[name].get(value, 0) >= limit:
                over = True
                break
        if over:
            continue
        for name, (values, _) in caps.items():
            value = int(values[position])
            counts[name][value] = counts[name].get(value, 0) + 1
        taken.append(position)
        if len(taken) == k:
            break
    return np.asarray(taken, dtype=np.int64)


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
    retriever = Retriever.load(version_dir, manifest.index, threads=settings.intra_op_threads)
    scorer = Scorer.load(
        version_dir,
        manifest,
        max_batch=settings.batch_max_size,
        min_bucket=settings.batch_min_bucket,
        **common,
    )
    attributes = ItemAttributes.load(version_dir, retriever.ids)
    photo = PhotoEncoder.load(version_dir, manifest, **common)
    photos = PhotoIndex.load(
        version_dir, manifest, retriever.ids, threads=settings.intra_op_threads
    )
    if retriever.dims != manifest.layout.dims:
        raise ArtifactError(
            f"{version_dir}: the index has {retriever.dims} dims, the feature layout "
            f"{manifest.layout.dims}"
        )
    return _Stages(manifest, encoder, retriever, scorer, attributes, photo, photos)
