"""The feature store contract shared by every backend.

A store holds immutable *versions* of per-item feature vectors and one pointer naming the
current version. ``publish`` writes a whole new version under its own namespace, then switches
the pointer, then deletes every other version (which also removes a partial version left by a
killed publisher). Publishing the version that is already current does nothing. A reader
resolves the pointer once per ``fetch``, so it only ever sees one whole version.

There is a single publisher at a time (the offline exporter); readers are many. A version name
is never reused for different content: readers may cache what they know of a version.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from service.features.format import FeatureLayout

# Versions name a key namespace and a directory: no separators, no leading dot.
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class FeatureBatch:
    """Result of one fetch."""

    version: str
    layout: FeatureLayout
    matrix: np.ndarray  # (n_found, dims) in the layout dtype, rows in request order of found ids
    found: np.ndarray  # int64 positions in the requested id list that were found
    missing: list[str] = field(default_factory=list)  # requested ids absent from the version


@dataclass
class PublishReport:
    version: str
    items: int  # items written; 0 when the version was already current
    seconds: float
    removed_versions: list[str] = field(default_factory=list)


@runtime_checkable
class FeatureStore(Protocol):
    def layout(self) -> FeatureLayout:
        """Layout of the current version; raises NoPublishedVersion."""
        ...

    def current_version(self) -> str | None: ...

    def publish(
        self,
        ids: Sequence[str],
        matrix: np.ndarray,
        layout: FeatureLayout,
        version: str,
        *,
        batch_size: int = 2000,
        progress: Callable[[int], None] | None = None,
    ) -> PublishReport:
        """Write ``matrix`` rows under ``ids`` as ``version``, make it current, drop the rest.

        ``progress`` is called with the number of items written so far after each batch.
        """
        ...

    def fetch(self, ids: Sequence[str]) -> FeatureBatch:
        """Features of ``ids`` from the current version; raises NoPublishedVersion."""
        ...

    def ping(self) -> None:
        """Raise FeatureStoreUnavailable unless the backend answers."""
        ...

    def versions(self) -> list[str]:
        """Every version with data stored, complete or partial, sorted."""
        ...

    def close(self) -> None: ...


class PublishesVersions(ABC):
    """The publish sequence every backend shares: unchanged version -> nothing; otherwise write
    the whole version aside, then switch the pointer to it and drop the other versions. A
    backend supplies how to read the pointer, write a version and switch."""

    @abstractmethod
    def current_version(self) -> str | None: ...

    @abstractmethod
    def _write_version(
        self,
        ids: Sequence[str],
        matrix: np.ndarray,
        layout: FeatureLayout,
        version: str,
        *,
        batch_size: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        """Write a whole version without making it current."""

    @abstractmethod
    def _switch_to(self, version: str) -> list[str]:
        """Make the written ``version`` current, delete every other; the versions removed."""

    def publish(
        self,
        ids: Sequence[str],
        matrix: np.ndarray,
        layout: FeatureLayout,
        version: str,
        *,
        batch_size: int = 2000,
        progress: Callable[[int], None] | None = None,
    ) -> PublishReport:
        """See FeatureStore.publish."""
        check_publish_args(ids, matrix, layout, version, batch_size)
        started = time.perf_counter()
        if self.current_version() == version:
            return PublishReport(version, 0, time.perf_counter() - started)
        self._write_version(ids, matrix, layout, version, batch_size=batch_size, progress=progress)
        removed = self._switch_to(version)
        return PublishReport(version, len(ids), time.perf_counter() - started, removed)


def check_publish_args(
    ids: Sequence[str], matrix: np.ndarray, layout: FeatureLayout, version: str, batch_size: int
) -> None:
    """Reject arguments that would publish an ambiguous or unreadable version."""
    if not _VERSION_RE.fullmatch(version):
        raise ValueError(f"invalid version name {version!r}: use [A-Za-z0-9._-], no leading dot")
    if matrix.ndim != 2 or matrix.shape != (len(ids), layout.dims):
        raise ValueError(
            f"matrix shape {matrix.shape} != ({len(ids)} ids, {layout.dims} layout dims)"
        )
    if len(set(ids)) != len(ids):
        raise ValueError("ids contain duplicates")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
