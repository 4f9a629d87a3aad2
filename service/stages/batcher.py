"""The dynamic batcher: the candidates of concurrent requests share one scoring run.

in:  per request, query_embedding float32 [384] and item_features float16 [n, F]
out: per request, Scores(score, text_contribution, image_contribution), each float32 [n]

Requests queue on the event loop. A batch opens with the oldest request and takes the next
ones in arrival order until its rows reach ``max_batch`` (release reason "full") or
``max_wait_us`` has passed since the oldest request arrived ("timeout"). One inference thread
packs the batch into per-bucket buffers allocated once (``query_embedding`` [Q, 384],
``item_features`` [N, F], ``query_index`` [N], N padded with zero rows to the smallest bucket
that holds the rows), runs it and splits the outputs back. While a batch runs, the next one
gathers, so under load batches form without waiting on the timer.

A request that has gone before its batch runs (cancelled at its deadline, or its client
disconnected) leaves a cancelled future behind; the batch drops its job unscored, so it takes
no rows in the run, and a batch left with no job runs nothing. Drops are counted.

Query rows are padded with zeros to a multiple of QUERY_ROW_MULTIPLE: onnxruntime's CPU GEMM
rounds a lone remainder row differently (measured: Q=1, or the last row of an odd Q, differs by
one float32 ulp), and with the padding a request scores exactly the same alone or batched.

Event loop timers are millisecond-grained (uvloop rounds to whole ms), so a wait under 1 ms
means "what has arrived by the next loop turn".
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.errors import ServiceNotReady
from service.stages.scoring import Scores

FULL = "full"
TIMEOUT = "timeout"
RELEASE_REASONS = (FULL, TIMEOUT)
QUERY_ROW_MULTIPLE = 4

ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray], Sequence[np.ndarray]]
"""(query_embedding [Q, D], item_features [N, F], query_index [N]) -> 3 arrays [N]."""

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    def batch_released(
        self, *, rows: int, requests: int, reason: str, queue_waits: Sequence[float]
    ) -> None: ...

    def batch_jobs_dropped(self, jobs: int) -> None: ...


@dataclass(eq=False, slots=True)
class _Job:
    query: np.ndarray
    features: np.ndarray
    future: asyncio.Future[Scores]
    enqueued: float

    @property
    def rows(self) -> int:
        return len(self.features)


class Batcher:
    def __init__(
        self,
        run: ScoreFn,
        *,
        buckets: Sequence[int],
        query_dims: int,
        feature_dims: int,
        query_dtype: np.dtype | type = np.float32,
        max_wait_us: int,
        observer: BatchObserver | None = None,
    ) -> None:
        self._run = run
        self._buckets = sorted(buckets)
        self.max_batch = self._buckets[-1]
        self._max_wait = max_wait_us / 1e6
        self._observer = observer
        self._jobs: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._running: list[_Job] = []
        self._dropped = 0  # jobs dropped since the observer was last told
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fusionrank-infer")
        # Touched only by the inference thread (one batch at a time), so reused without copies.
        query_rows = _round_up(self.max_batch, QUERY_ROW_MULTIPLE)
        self._queries = np.zeros((query_rows, query_dims), dtype=query_dtype)
        self._features = {b: np.zeros((b, feature_dims), np.float16) for b in self._buckets}
        self._query_index = {b: np.zeros(b, np.int64) for b in self._buckets}
        self.warmed: tuple[int, ...] = ()

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(self._buckets)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def warm_up(self) -> None:
        """Run every bucket once on the inference thread (zero inputs)."""
        loop = asyncio.get_running_loop()
        for size in self._buckets:
            await loop.run_in_executor(
                self._executor,
                self._run,
                self._queries[:QUERY_ROW_MULTIPLE],
                self._features[size],
                self._query_index[size],
            )
        self.warmed = tuple(self._buckets)

    async def score(self, query: np.ndarray, features: np.ndarray) -> Scores:
        """Scores of ``features`` [n, F] rows for ``query`` [D], from a shared run."""
        rows = len(features)
        if rows == 0:
            empty = np.zeros(0, np.float32)
            return Scores(empty, empty, empty)
        if rows > self.max_batch:
            raise ValueError(f"{rows} candidates exceed the largest batch ({self.max_batch})")
        if self._closed:
            raise ServiceNotReady("shutting down")
        self.start()
        future: asyncio.Future[Scores] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(query, features, future, time.perf_counter()))
        self._arrived.set()
        return await future

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        _fail([*self._running, *self._jobs], ServiceNotReady("shutting down"))
        self._jobs.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- the loop (event loop side) ----------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._jobs:
                self._arrived.clear()
                await self._arrived.wait()
            # Jobs taken off the queue stay reachable from close() until they are answered.
            self._running = batch = []
            reason = await self._collect(batch)
            # A request can also go while its batch gathers; drop it before it takes rows.
            live = [job for job in batch if not job.future.done()]
            self._dropped += len(batch) - len(live)
            batch[:] = live
            if self._dropped:
                self._observe_dropped()
            if reason is None or not batch:
                self._running = []
                continue
            try:
                results, started = await loop.run_in_executor(
                    self._executor, self._run_batch, batch
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _fail(batch, exc)
                continue
            finally:
                self._running = []
            for job, result in zip(batch, results, strict=True):
                if not job.future.done():  # a request can still go while its batch runs
                    job.future.set_result(result)
            if self._observer is not None:
                self._observe(batch, reason, started)

    async def _collect(self, batch: list[_Job]) -> str | None:
        """Fill ``batch`` in arrival order with the jobs of requests still waiting, up to
        max_batch rows or max_wait after the first; return the release reason, or None when
        every queued request had gone."""
        jobs = self._jobs
        self._drop_gone()
        if not jobs:
            return None
        first = jobs.popleft()
        batch.append(first)
        rows = first.rows
        deadline = first.enqueued + self._max_wait
        while True:
            self._drop_gone()
            if jobs:
                if rows + jobs[0].rows > self.max_batch:
                    return FULL
                job = jobs.popleft()
                batch.append(job)
                rows += job.rows
                if rows == self.max_batch:
                    return FULL
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return TIMEOUT
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                return TIMEOUT

    def _drop_gone(self) -> None:
        """Drop the queue's leading jobs whose requests have gone, so they take no rows."""
        jobs = self._jobs
        while jobs and jobs[0].future.done():
            jobs.popleft()
            self._dropped += 1

    def _observe_dropped(self) -> None:
        dropped, self._dropped = self._dropped, 0
        if self._observer is None:
            return
        try:
            self._observer.batch_jobs_dropped(dropped)
        except Exception:  # metrics must never stop the batcher
            log.exception("batch observer failed")

    def _observe(self, batch: list[_Job], reason: str, started: float) -> None:
        try:
            self._observer.batch_released(  # type: ignore[union-attr]
                rows=sum(job.rows for job in batch),
                requests=len(batch),
                reason=reason,
                queue_waits=[started - job.enqueued for job in batch],
            )
        except Exception:  # metrics must never stop the batcher
            log.exception("batch observer failed")

    # -- the inference thread ----------------------------------------------------------------

    def _run_batch(self, batch: list[_Job]) -> tuple[list[Scores], float]:
        started = time.perf_counter()
        rows = sum(job.rows for job in batch)
        size = self._buckets[bisect.bisect_left(self._buckets, rows)]
        queries = self._queries[: _round_up(len(batch), QUERY_ROW_MULTIPLE)]
        features, query_index = self._features[size], self._query_index[size]
        offset = 0
        for row, job in enumerate(batch):
            end = offset + job.rows
            queries[row] = job.query
            features[offset:end] = job.features
            query_index[offset:end] = row
            offset = end
        queries[len(batch) :] = 0
        features[offset:] = 0
        query_index[offset:] = 0
        outputs = self._run(queries, features, query_index)
        results, offset = [], 0
        for job in batch:
            end = offset + job.rows
            results.append(Scores(*(out[offset:end] for out in outputs)))
            offset = end
        return results, started


def _fail(jobs: Sequence[_Job], exc: BaseException) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
