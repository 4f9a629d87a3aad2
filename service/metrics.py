"""Prometheus metrics of the service, one registry per app (tests build many apps).

With several uvicorn workers, ``python -m service`` sets PROMETHEUS_MULTIPROC_DIR before the
workers start; prometheus_client then keeps every value in per-process files and /metrics
merges the files of all workers, whichever worker answers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from service.stages.batcher import RELEASE_REASONS

STAGES = ("encode", "retrieve", "fetch", "score")
# Sub-millisecond steps: the stages of a request with a cached query take tenths of a ms.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0065, 0.008,
    0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
BATCH_ROW_BUCKETS = tuple(float(1 << i) for i in range(17))  # 1 .. 65536 candidates
BATCH_REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST
OTHER_ROUTE = "other"  # label of paths the app does not serve, so labels stay bounded


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fusionrank_http_requests",
            "HTTP requests answered, by route, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "fusionrank_http_request_duration_seconds",
            "Time from request start to the end of the response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "fusionrank_stage_duration_seconds",
            "Time of one /rank stage: encode (query, cache included), retrieve (FAISS), "
            "fetch (feature store), score (batcher queue + onnxruntime run).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "fusionrank_batch_size",
            "Candidate rows scored per onnxruntime run, before padding to the bucket.",
            buckets=BATCH_ROW_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "fusionrank_batch_requests",
            "Requests whose candidates shared one onnxruntime run.",
            buckets=BATCH_REQUEST_BUCKETS,
            registry=r,
        )
        self.batch_queue_wait = Histogram(
            "fusionrank_batch_queue_wait_seconds",
            "Time a request's candidates waited in the batcher before their run started.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_releases = Counter(
            "fusionrank_batch_releases",
            "Batches released to onnxruntime, by reason: full (max size) or timeout (max wait).",
            ["reason"],
            registry=r,
        )
        self.batch_jobs_dropped_total = Counter(
            "fusionrank_batch_jobs_dropped",
            "Batcher jobs dropped unscored: jobs whose requests had gone (deadline, disconnect) "
            "before scoring.",
            registry=r,
        )
        self.cache_hits = Counter(
            "fusionrank_query_cache_hits", "Queries found in the embedding cache.", registry=r
        )
        self.cache_misses = Counter(
            "fusionrank_query_cache_misses", "Queries encoded by the model.", registry=r
        )
        self.feature_cache_hits = Counter(
            "fusionrank_feature_cache_hits",
            "Candidate feature rows served from the in-process cache.",
            registry=r,
        )
        self.feature_cache_misses = Counter(
            "fusionrank_feature_cache_misses",
            "Candidate feature rows asked of the feature store.",
            registry=r,
        )
        self.missing_ids = Counter(
            "fusionrank_missing_ids",
            "Candidate ids the feature store did not know (skipped).",
            registry=r,
        )
        self.unreadable_features_total = Counter(
            "fusionrank_unreadable_features",
            "Stored feature values that could not be decoded (wrong length or header): those "
            "ids were reported missing and the rest ranked; each is logged with its id.",
            registry=r,
        )
        self.model_info = Gauge(
            "fusionrank_model_info",
            "The loaded model: 1 for its version, strategy and execution provider.",
            ["version", "strategy", "execution_provider"],
            multiprocess_mode="max",
            registry=r,
        )
        self.model_ready = Gauge(
            "fusionrank_model_ready",
            "1 once the model and index are loaded and every batch shape is warmed.",
            multiprocess_mode="min",
            registry=r,
        )
        # Label children exist from the start, so every series shows before the first request.
        self._stages = {stage: self.stage_seconds.labels(stage) for stage in STAGES}
        self._releases = {reason: self.batch_releases.labels(reason) for reason in RELEASE_REASONS}
        self.model_ready.set(0)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._stages[name].observe(time.perf_counter() - started)

    def observe_stage(self, name: str, seconds: float) -> None:
        self._stages[name].observe(seconds)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def batch_released(
        self, *, rows: int, requests: int, reason: str, queue_waits: Sequence[float]
    ) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self._releases[reason].inc()
        for wait in queue_waits:
            self.batch_queue_wait.observe(wait)

    def batch_jobs_dropped(self, jobs: int) -> None:
        self.batch_jobs_dropped_total.inc(jobs)

    def feature_cache(self, *, hits: int, misses: int) -> None:
        if hits:
            self.feature_cache_hits.inc(hits)
        if misses:
            self.feature_cache_misses.inc(misses)

    def unreadable_features(self, count: int) -> None:
        self.unreadable_features_total.inc(count)

    def model_loaded(self, version: str, strategy: str, provider: str) -> None:
        self.model_info.labels(version, strategy, provider).set(1)
        self.model_ready.set(1)

    def render(self) -> bytes:
        """The Prometheus text exposition of this process, or of all workers."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)
