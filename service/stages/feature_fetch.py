"""Candidate features from the feature store, in one round trip for all candidates.

in:  ids: list[str]
out: FeatureBatch(matrix float16 [n_found, text_dims + image_dims], found int64 [n_found],
     missing list[str]) from the store version the model was exported with

``fetch`` and ``check`` are blocking (Redis or the file system): call them off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.errors import FeatureStoreError, FeatureVersionMismatch, NoPublishedVersion
from service.features import FeatureBatch, FeatureLayout, FeatureStore


class FeatureFetcher:
    def __init__(self, store: FeatureStore, layout: FeatureLayout, version: str) -> None:
        self._store = store
        self._layout = layout
        self._version = version  # the manifest's features_version

    @property
    def version(self) -> str:
        return self._version

    def fetch(self, ids: Sequence[str]) -> FeatureBatch:
        batch = self._store.fetch(ids)
        if batch.version != self._version:
            raise self._mismatch(batch.version)
        if batch.layout != self._layout:
            raise FeatureStoreError(
                f"feature version {batch.version} has layout {batch.layout}, the model expects "
                f"{self._layout}"
            )
        if batch.matrix.dtype != np.float16:  # a float32 layout; the ranker takes float16
            batch.matrix = batch.matrix.astype(np.float16)
        return batch

    def check(self) -> None:
        """Raise unless the store answers and serves the model's feature version."""
        self._store.ping()
        current = self._store.current_version()
        if current is None:
            raise NoPublishedVersion("the feature store has no published version")
        if current != self._version:
            raise self._mismatch(current)

    def _mismatch(self, current: str) -> FeatureVersionMismatch:
        return FeatureVersionMismatch(
            f"the feature store serves version {current}, the model was exported with "
            f"{self._version}"
        )
