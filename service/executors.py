"""Bounded thread pools for blocking work, one per kind of dependency.

The event loop never blocks: the feature store's round trips run on the ``store`` pool, CPU
work off the loop (query encoding, FAISS) on the ``compute`` pool, each with a fixed number of
threads. A hung feature store can therefore park at most the store pool's threads, each for at
most one socket timeout (``feature_timeout_s``); query encoding and retrieval keep their own
threads, so requests whose item vectors are cached are still answered.

A job whose caller has gone (its request hit ``request_timeout_s`` and was cancelled) frees its
place: a queued job is cancelled before it starts (asyncio cancels the executor's future, and
the executor skips cancelled work); a running one cannot be interrupted and ends with its
socket timeout. The queue itself is bounded by the admission limit (``max_in_flight``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class BlockingPool:
    """``await pool.run(fn, *args)``: ``fn(*args)`` on one of ``threads`` named threads."""

    def __init__(self, name: str, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"{name} pool needs at least one thread, got {threads}")
        self.name = name
        self.threads = threads
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=f"fusionrank-{name}")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if kwargs:
            return await self.run(lambda: fn(*args, **kwargs))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        """Cancel queued jobs; running ones finish on their own (never waited for)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class Pools:
    """The pools of one worker process, shared by every model version it loads."""

    store: BlockingPool
    compute: BlockingPool

    @classmethod
    def create(cls, store_threads: int, compute_threads: int) -> Pools:
        return cls(BlockingPool("store", store_threads), BlockingPool("compute", compute_threads))

    def close(self) -> None:
        self.store.close()
        self.compute.close()
