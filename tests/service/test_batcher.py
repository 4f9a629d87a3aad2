"""The dynamic batcher with a fake scoring function: its subject is packing and splitting."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from service.errors import ServiceNotReady
from service.metrics import ServiceMetrics
from service.stages.batcher import FULL, TIMEOUT, Batcher
from service.stages.scoring import bucket_sizes

pytestmark = pytest.mark.anyio

QUERY_DIMS, FEATURE_DIMS = 4, 3


class FakeScorer:
    """score = features . query[:3]; text / image = first / last feature. Records every run."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.runs: list[tuple[int, int]] = []  # (queries, padded rows)
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail = fail

    def __call__(
        self, query: np.ndarray, features: np.ndarray, index: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        self.runs.append((len(query), len(features)))
        self.threads.add(threading.current_thread().name)
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        if self.fail:
            raise RuntimeError("scoring failed")
        feats = features.astype(np.float32)
        score = (feats * query[index, :FEATURE_DIMS]).sum(axis=1)
        return score, feats[:, 0].copy(), feats[:, -1].copy()


class Observer:
    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.dropped: list[int] = []

    def batch_released(
        self, *, rows: int, requests: int, reason: str, queue_waits: Sequence[float]
    ) -> None:
        self.batches.append(
            {"rows": rows, "requests": requests, "reason": reason, "waits": list(queue_waits)}
        )

    def batch_jobs_dropped(self, jobs: int) -> None:
        self.dropped.append(jobs)


class HeldScorer(FakeScorer):
    """A FakeScorer whose runs wait for ``release`` (so jobs queue behind the running batch)
    and that records the feature rows of every run."""

    def __init__(self) -> None:
        super().__init__()
        self.running, self.release = threading.Event(), threading.Event()
        self.rows: list[bytes] = []

    def __call__(
        self, query: np.ndarray, features: np.ndarray, index: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        self.rows.extend(row.tobytes() for row in features)
        self.running.set()
        self.release.wait(5)
        return super().__call__(query, features, index)


def row_keys(features: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in features}


def make_batcher(
    scorer: FakeScorer, *, max_batch: int = 64, max_wait_us: int = 20_000, observer=None
) -> Batcher:
    return Batcher(
        scorer,
        buckets=bucket_sizes(4, max_batch),
        query_dims=QUERY_DIMS,
        feature_dims=FEATURE_DIMS,
        max_wait_us=max_wait_us,
        observer=observer,
    )


def request(seed: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    query = rng.standard_normal(QUERY_DIMS).astype(np.float32)
    features = rng.standard_normal((rows, FEATURE_DIMS)).astype(np.float16)
    return query, features


def expected(query: np.ndarray, features: np.ndarray) -> np.ndarray:
    return (features.astype(np.float32) * query[:FEATURE_DIMS]).sum(axis=1)


def test_bucket_sizes() -> None:
    assert bucket_sizes(16, 2048) == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert bucket_sizes(10, 100) == (16, 32, 64, 100)
    assert bucket_sizes(1, 1) == (1,)


async def test_concurrent_requests_share_one_run_and_get_their_own_rows() -> None:
    scorer, observer = FakeScorer(), Observer()
    batcher = make_batcher(scorer, observer=observer)
    requests = [request(seed, rows) for seed, rows in enumerate([3, 7, 1, 10])]
    try:
        results = await asyncio.gather(*(batcher.score(q, f) for q, f in requests))
    finally:
        await batcher.close()
    assert scorer.runs == [(4, 32)]  # 21 rows of 4 queries, padded to the 32 bucket
    assert observer.batches[0]["rows"] == 21 and observer.batches[0]["requests"] == 4
    assert observer.batches[0]["reason"] == TIMEOUT
    assert len(observer.batches[0]["waits"]) == 4
    for (query, features), result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.score, expected(query, features))
        np.testing.assert_array_equal(result.text_contribution, features[:, 0])
        np.testing.assert_array_equal(result.image_contribution, features[:, -1])


async def test_query_rows_are_padded_to_a_multiple_of_four_with_zeros() -> None:
    seen: list[np.ndarray] = []

    def run(query: np.ndarray, features: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, ...]:
        seen.append(query.copy())
        return FakeScorer()(query, features, index)

    batcher = make_batcher(run)  # type: ignore[arg-type]
    requests = [request(seed, 2) for seed in range(5)]
    try:
        await batcher.score(*requests[0])
        await asyncio.gather(*(batcher.score(q, f) for q, f in requests))
    finally:
        await batcher.close()
    assert [len(q) for q in seen] == [4, 8]
    np.testing.assert_array_equal(seen[0][0], requests[0][0])
    assert not seen[0][1:].any() and not seen[1][5:].any()


async def test_padding_rows_do_not_change_scores() -> None:
    query, features = request(1, 5)
    batcher = make_batcher(FakeScorer())
    try:
        alone = await batcher.score(query, features)
        crowded = await asyncio.gather(
            batcher.score(query, features), *(batcher.score(*request(s, 9)) for s in range(4))
        )
    finally:
        await batcher.close()
    np.testing.assert_array_equal(alone.score, crowded[0].score)


async def test_batch_released_full_at_max_rows_and_rest_follow() -> None:
    scorer, observer = FakeScorer(), Observer()
    batcher = make_batcher(scorer, max_batch=16, observer=observer)
    try:
        results = await asyncio.gather(*(batcher.score(*request(s, 6)) for s in range(3)))
    finally:
        await batcher.close()
    # 6 + 6 fit in 16, the third would not: a full batch of 2, then the third alone.
    assert [b["requests"] for b in observer.batches] == [2, 1]
    assert [b["reason"] for b in observer.batches] == [FULL, TIMEOUT]
    assert scorer.runs == [(4, 16), (4, 8)]  # query rows padded to a multiple of 4
    assert [len(r.score) for r in results] == [6, 6, 6]


async def test_exactly_full_releases_without_waiting() -> None:
    observer = Observer()
    batcher = make_batcher(FakeScorer(), max_batch=16, max_wait_us=10_000_000, observer=observer)
    try:
        async with asyncio.timeout(5):
            await asyncio.gather(batcher.score(*request(0, 8)), batcher.score(*request(1, 8)))
    finally:
        await batcher.close()
    assert observer.batches[0]["reason"] == FULL


async def test_zero_wait_runs_a_lone_request_at_once() -> None:
    observer = Observer()
    batcher = make_batcher(FakeScorer(), max_wait_us=0, observer=observer)
    try:
        await batcher.score(*request(0, 3))
    finally:
        await batcher.close()
    assert observer.batches[0]["reason"] == TIMEOUT
    assert observer.batches[0]["waits"][0] < 0.5


async def test_requests_arriving_during_a_run_form_the_next_batch() -> None:
    scorer, observer = FakeScorer(delay_s=0.05), Observer()
    batcher = make_batcher(scorer, max_wait_us=0, observer=observer)
    try:
        first = asyncio.ensure_future(batcher.score(*request(0, 2)))
        await asyncio.sleep(0.01)  # the first batch is running on the inference thread
        rest = [batcher.score(*request(s, 2)) for s in range(1, 4)]
        await asyncio.gather(first, *rest)
    finally:
        await batcher.close()
    assert [b["requests"] for b in observer.batches] == [1, 3]
    assert scorer.threads and all(name.startswith("fusionrank-infer") for name in scorer.threads)


async def test_a_failed_run_fails_its_requests_only() -> None:
    scorer = FakeScorer(fail=True)
    batcher = make_batcher(scorer)
    try:
        results = await asyncio.gather(
            batcher.score(*request(0, 2)), batcher.score(*request(1, 2)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)
        scorer.fail = False
        assert len((await batcher.score(*request(2, 2))).score) == 2  # the loop survived
    finally:
        await batcher.close()


async def test_a_cancelled_request_does_not_disturb_the_others() -> None:
    batcher = make_batcher(FakeScorer(delay_s=0.02))
    try:
        doomed = asyncio.ensure_future(batcher.score(*request(0, 2)))
        kept = asyncio.ensure_future(batcher.score(*request(1, 3)))
        await asyncio.sleep(0)
        doomed.cancel()
        assert len((await kept).score) == 3
    finally:
        await batcher.close()


async def test_requests_gone_while_queued_are_dropped_before_scoring() -> None:
    scorer, observer = HeldScorer(), Observer()
    batcher = make_batcher(scorer, max_wait_us=0, observer=observer)
    try:
        first = asyncio.ensure_future(batcher.score(*request(0, 2)))
        await asyncio.to_thread(scorer.running.wait, 5)  # the first batch holds the thread
        queued = [request(seed, 3) for seed in range(1, 5)]
        tasks = [asyncio.ensure_future(batcher.score(q, f)) for q, f in queued]
        await asyncio.sleep(0)  # every task has queued its job and awaits its future
        tasks[0].cancel()  # the head of the queue and one in the middle go
        tasks[2].cancel()
        scorer.release.set()
        async with asyncio.timeout(5):
            results = await asyncio.gather(first, *tasks, return_exceptions=True)
    finally:
        await batcher.close()
    assert isinstance(results[1], asyncio.CancelledError)
    assert isinstance(results[3], asyncio.CancelledError)
    # 2 + 3 live rows; the gone jobs' 6 rows would have needed the 16 bucket.
    assert scorer.runs == [(4, 4), (4, 8)]
    seen = set(scorer.rows)
    for gone in (0, 2):
        assert not row_keys(queued[gone][1]) & seen
    for kept in (1, 3):
        query, features = queued[kept]
        assert row_keys(features) <= seen
        np.testing.assert_array_equal(results[kept + 1].score, expected(query, features))
        np.testing.assert_array_equal(results[kept + 1].text_contribution, features[:, 0])
    assert sum(observer.dropped) == 2
    assert [b["requests"] for b in observer.batches] == [1, 2]
    assert [b["rows"] for b in observer.batches] == [2, 6]


async def test_requests_gone_while_their_batch_gathers_are_dropped_and_counted() -> None:
    scorer, metrics = FakeScorer(), ServiceMetrics()
    runs: list[np.ndarray] = []

    def run(query: np.ndarray, features: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, ...]:
        runs.append(features.copy())
        return scorer(query, features, index)

    batcher = make_batcher(run, max_wait_us=300_000, observer=metrics)  # type: ignore[arg-type]
    (kept_query, kept_features), (gone_query, gone_features) = request(0, 3), request(1, 5)
    try:
        kept = asyncio.ensure_future(batcher.score(kept_query, kept_features))
        gone = asyncio.ensure_future(batcher.score(gone_query, gone_features))
        await asyncio.sleep(0.02)  # both are in the batch, which waits out max_wait
        gone.cancel()
        async with asyncio.timeout(5):
            result = await kept
    finally:
        await batcher.close()
    assert gone.cancelled()
    assert scorer.runs == [(4, 4)]  # 3 rows; with the 5 gone rows it would be the 8 bucket
    assert not row_keys(gone_features) & row_keys(runs[0])
    np.testing.assert_array_equal(result.score, expected(kept_query, kept_features))
    assert metrics.registry.get_sample_value("fusionrank_batch_jobs_dropped_total") == 1
    assert metrics.registry.get_sample_value("fusionrank_batch_requests_count") == 1


async def test_a_batch_whose_requests_all_went_runs_nothing() -> None:
    scorer, observer = FakeScorer(), Observer()
    batcher = make_batcher(scorer, max_wait_us=200_000, observer=observer)
    try:
        gone = [asyncio.ensure_future(batcher.score(*request(s, 2))) for s in range(2)]
        await asyncio.sleep(0.01)  # the batch gathers, waiting out max_wait
        for task in gone:
            task.cancel()
        async with asyncio.timeout(5):
            while sum(observer.dropped) < 2:  # told at release, once max_wait has passed
                await asyncio.sleep(0.01)
        assert scorer.runs == [] and observer.batches == []
        async with asyncio.timeout(5):
            assert len((await batcher.score(*request(2, 3))).score) == 3  # the loop goes on
    finally:
        await batcher.close()
    assert scorer.runs == [(4, 4)]
    assert sum(observer.dropped) == 2


async def test_warm_up_runs_every_bucket_and_empty_or_oversize_requests() -> None:
    scorer = FakeScorer()
    batcher = make_batcher(scorer, max_batch=64)
    try:
        await batcher.warm_up()
        assert [rows for _, rows in scorer.runs] == [4, 8, 16, 32, 64]
        assert batcher.warmed == batcher.buckets
        empty = await batcher.score(*request(0, 0))
        assert len(empty.score) == 0
        with pytest.raises(ValueError, match="exceed"):
            await batcher.score(*request(0, 65))
    finally:
        await batcher.close()


async def test_closed_batcher_refuses_and_fails_pending() -> None:
    batcher = make_batcher(FakeScorer(delay_s=0.05))
    pending = asyncio.ensure_future(batcher.score(*request(0, 2)))
    await asyncio.sleep(0.01)
    await batcher.close()
    with pytest.raises(ServiceNotReady):
        await pending
    with pytest.raises(ServiceNotReady):
        await batcher.score(*request(1, 2))
