"""An in-process cache of item feature rows of ONE feature version, in front of the store.

in:  ids: list[str]
out: positions of the cached ids, their rows (float16 [n, dims]), positions of the others

A feature version is immutable (a version name is never reused for other content,
service.features.base), and the cache only ever holds rows of the version the served model
was exported with, so a cached row is never stale: the store is asked only for the ids the
cache lacks. A 1,000-candidate request found whole in the cache costs ~0.1 ms of dict probes
and one gather, where the Redis round trip costs ~4–6 ms here plus 1–2 ms of Redis's own CPU
(shared NOTES).

Rows live in one preallocated matrix (``capacity`` rows, 256 bytes each for the 2 x 64
float16 layout, plus ~100 bytes of dict entry per id); when it is full the oldest rows are
overwritten first (a ring). All methods are thread-safe: the event loop probes, worker
threads insert what the store returned.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from itertools import repeat
from typing import NamedTuple

import numpy as np


class CacheProbe(NamedTuple):
    hit_positions: np.ndarray  # int64 positions in the probed id list found in the cache
    rows: np.ndarray  # their rows, in that order
    miss_positions: np.ndarray  # int64 positions of the ids to fetch from the store

    @property
    def complete(self) -> bool:
        """Every probed id was cached."""
        return not len(self.miss_positions)


class FeatureCache:
    def __init__(self, capacity: int, dims: int, dtype: np.dtype | type = np.float16) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._rows = np.zeros((capacity, dims), dtype=dtype)
        self._slot_of: dict[str, int] = {}
        self._id_in: list[str | None] = [None] * capacity  # which id each slot holds
        self._next = 0  # the slot written next; the ring's oldest once it is full
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._slot_of)

    def probe(self, ids: Sequence[str]) -> CacheProbe:
        """Split ``ids`` into cached (with their rows) and not cached."""
        with self._lock:  # an insert must not recycle a slot between the lookup and the copy
            slots = np.fromiter(
                map(self._slot_of.get, ids, repeat(-1)), dtype=np.int64, count=len(ids)
            )
            hit = slots >= 0
            rows = self._rows[slots[hit]]  # fancy indexing copies
        return CacheProbe(np.flatnonzero(hit), rows, np.flatnonzero(~hit))

    def insert(self, ids: Sequence[str], rows: np.ndarray) -> None:
        """Keep ``rows`` (one per id, same order) for later probes; ids already kept are skipped."""
        if len(ids) != len(rows):
            raise ValueError(f"{len(ids)} ids but {len(rows)} rows")
        with self._lock:
            new: list[int] = []
            slots: list[int] = []
            for n, item in enumerate(ids):
                if item in self._slot_of:  # another thread inserted it meanwhile
                    continue
                slot = self._next
                self._next = (slot + 1) % self.capacity
                evicted = self._id_in[slot]
                if evicted is not None:
                    del self._slot_of[evicted]
                self._id_in[slot] = item
                self._slot_of[item] = slot
                new.append(n)
                slots.append(slot)
            if len(new) > self.capacity:  # more rows than slots: only the last ones stayed
                new, slots = new[-self.capacity :], slots[-self.capacity :]
            if slots:
                self._rows[slots] = rows[new]
