"""Candidate features: from the in-process cache, the rest in one store round trip.

in:  ids: list[str]
out: FeatureBatch(matrix float16 [n_found, text_dims + image_dims], found int64 [n_found],
     missing list[str]) from the store version the model was exported with, whatever version
     the store's pointer names (versions live side by side during a rolling upgrade)

``probe`` is the cheap cache lookup the event loop may call; ``fetch`` given a complete probe
does no I/O either. ``warm`` (at start-up), ``fetch`` with misses and ``check`` block (Redis or
the file system): call them off the event loop.
Only rows of the model's own feature version enter the cache (stages.feature_cache), so a
request served from it ranks exactly as one served from the store. Ids the store does not
know are not cached. An item whose stored value is unreadable is reported missing (counted and
logged with its id): one damaged value costs that item, not the request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from service.errors import FeatureFormatError
from service.features import FeatureBatch, FeatureLayout, FeatureStore
from service.stages.feature_cache import CacheProbe, FeatureCache

log = logging.getLogger(__name__)

_LOGGED_IDS = 10  # ids named per log line of unreadable values


class FetchObserver(Protocol):
    def feature_cache(self, *, hits: int, misses: int) -> None: ...

    def unreadable_features(self, count: int) -> None: ...


class FeatureFetcher:
    def __init__(
        self,
        store: FeatureStore,
        layout: FeatureLayout,
        version: str,
        *,
        cache_items: int = 0,
        observer: FetchObserver | None = None,
    ) -> None:
        self._store = store
        self._layout = layout
        self._version = version  # the manifest's features_version
        self._cache = FeatureCache(cache_items, layout.dims) if cache_items else None
        self._observer = observer

    @property
    def version(self) -> str:
        return self._version

    @property
    def layout(self) -> FeatureLayout:
        return self._layout

    def probe(self, ids: Sequence[str]) -> CacheProbe | None:
        """Which of ``ids`` the cache holds (cheap: the event loop may call it); None when
        there is no cache."""
        return None if self._cache is None else self._cache.probe(ids)

    def fetch(self, ids: Sequence[str], probe: CacheProbe | None = None) -> FeatureBatch:
        """The features of ``ids``: cached rows, the rest from the store in one round trip.
        ``probe`` is this request's probe when the caller made one; when it is complete
        nothing blocks, otherwise this blocks on the store."""
        if self._cache is None:
            return self._fetch_from_store(ids)
        if probe is None:
            probe = self._cache.probe(ids)
        self._observe(len(probe.hit_positions), len(probe.miss_positions))
        if probe.complete:
            return FeatureBatch(self._version, self._layout, probe.rows, probe.hit_positions)
        fetched = self._fetch_from_store([ids[p] for p in probe.miss_positions])
        fetched_positions = probe.miss_positions[fetched.found]
        self._cache.insert([ids[p] for p in fetched_positions], fetched.matrix)
        if not len(probe.hit_positions):
            fetched.found = fetched_positions
            return fetched
        # Cached and fetched rows merged back into request order (ties rank by position).
        found = np.union1d(probe.hit_positions, fetched_positions)
        matrix = np.empty((len(found), self._layout.dims), dtype=fetched.matrix.dtype)
        matrix[np.searchsorted(found, probe.hit_positions)] = probe.rows
        matrix[np.searchsorted(found, fetched_positions)] = fetched.matrix
        return FeatureBatch(self._version, self._layout, matrix, found, fetched.missing)

    def warm(self, ids: Sequence[str], chunk: int = 2000) -> int:
        """Load the first ``capacity`` of ``ids`` into the cache, ``chunk`` per round trip
        (blocking); returns the rows cached. Raises the store's errors."""
        if self._cache is None:
            return 0
        ids = list(ids[: self._cache.capacity])
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            batch = self._fetch_from_store(part)
            self._cache.insert([part[p] for p in batch.found.tolist()], batch.matrix)
        return len(self._cache)

    def _observe(self, hits: int, misses: int) -> None:
        if self._observer is not None:
            self._observer.feature_cache(hits=hits, misses=misses)

    def _fetch_from_store(self, ids: Sequence[str]) -> FeatureBatch:
        batch = self._store.fetch(ids, self._version)
        if batch.layout != self._layout:
            raise FeatureFormatError(
                f"feature version {batch.version} has layout {batch.layout}, the model expects "
                f"{self._layout}"
            )
        if batch.corrupt:
            log.error(
                "feature version %s: %d unreadable value(s), ranked without them: %s",
                self._version,
                len(batch.corrupt),
                ", ".join(repr(i) for i in batch.corrupt[:_LOGGED_IDS]),
            )
            if self._observer is not None:
                self._observer.unreadable_features(len(batch.corrupt))
        if batch.matrix.dtype != np.float16:  # a float32 layout; the ranker takes float16
            batch.matrix = batch.matrix.astype(np.float16)
        return batch

    def check(self) -> None:
        """Raise unless the store answers and holds the model's feature version whole."""
        self._store.ping()
        layout = self._store.layout(self._version)
        if layout != self._layout:
            raise FeatureFormatError(
                f"feature version {self._version} has layout {layout}, the model expects "
                f"{self._layout}"
            )
