"""The feature store contract shared by every backend.

A store holds immutable *versions* of per-item feature vectors, side by side, and a pointer
naming the newest published one. A reader asks for the version its model was exported with,
whatever the pointer says, so replicas serving the old model and replicas serving the new one
read from the same store during a rolling upgrade; the pointer only tells them what is newest.

``publish`` writes a whole new version under its own namespace (its meta last: a version with
meta is whole), records when it was published, moves the pointer to it, then retires the
versions that ``Retention`` no longer keeps: the newest ``keep`` published ones and every
version superseded less than ``grace_s`` ago stay; the rest are removed, meta first, so a
reader sees a version either whole or gone. Data left by a killed publisher (never published)
is removed by the next publish. Publishing the version that is already current does nothing;
publishing an older, still stored version (a rollback) only moves the pointer back to it.

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

from service.errors import FeatureVersionMissing, NoPublishedVersion
from service.features.format import FeatureLayout, decode_readable

# Versions name a key namespace and a directory: no separators, no leading dot.
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class FeatureBatch:
    """Result of one fetch."""

    version: str
    layout: FeatureLayout
    matrix: np.ndarray  # (n_found, dims) in the layout dtype, rows in request order of found ids
    found: np.ndarray  # int64 positions in the requested id list that were found
    missing: list[str] = field(default_factory=list)  # requested ids not found (corrupt too)
    corrupt: list[str] = field(default_factory=list)  # of those, ids whose value is unreadable


@dataclass(frozen=True)
class Retention:
    """Which published versions a publish (or ``retire``) keeps; the rest are removed.

    ``keep``: the newest published versions kept whatever their age (the current one is
    always among them). ``grace_s``: a version superseded by a newer one less than this long
    ago is kept too, so replicas still serving it can switch at their own pace.
    """

    keep: int = 2
    grace_s: float = 600.0

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1 (the current version), got {self.keep}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")

    def kept(self, published: dict[str, float], now: float) -> set[str]:
        """The versions of ``published`` (name -> publish time) this retention keeps."""
        newest_first = sorted(published, key=published.__getitem__, reverse=True)
        kept = set(newest_first[: self.keep])
        for newer, older in zip(newest_first, newest_first[1:], strict=False):
            if now - published[newer] < self.grace_s:  # older was superseded at newer's publish
                kept.add(older)
        return kept


DEFAULT_RETENTION = Retention()


@dataclass
class PublishReport:
    version: str
    items: int  # items written; 0 when the version was already stored whole
    seconds: float
    removed_versions: list[str] = field(default_factory=list)


@runtime_checkable
class FeatureStore(Protocol):
    def current_version(self) -> str | None:
        """The newest published version (the pointer), None before any publish."""
        ...

    def layout(self, version: str | None = None) -> FeatureLayout:
        """Layout of ``version`` (default: the current one), read from the store now: raises
        FeatureVersionMissing unless that version is wholly stored, NoPublishedVersion when
        no version is named and none is published."""
        ...

    def publish(
        self,
        ids: Sequence[str],
        matrix: np.ndarray,
        layout: FeatureLayout,
        version: str,
        *,
        retention: Retention = DEFAULT_RETENTION,
        batch_size: int = 2000,
        progress: Callable[[int], None] | None = None,
    ) -> PublishReport:
        """Write ``matrix`` rows under ``ids`` as ``version``, make it current, then retire
        what ``retention`` does not keep. ``progress`` is called with the number of items
        written so far after each batch."""
        ...

    def retire(self, retention: Retention) -> list[str]:
        """Remove the versions ``retention`` does not keep (and unpublished leftovers); the
        names removed. The current version is always kept."""
        ...

    def fetch(self, ids: Sequence[str], version: str | None = None) -> FeatureBatch:
        """Features of ``ids`` from ``version`` (default: the current one), all from that one
        whole version; raises FeatureVersionMissing when it is not (or no longer) stored.
        Ids it does not hold, or whose value is unreadable, are reported missing."""
        ...

    def ping(self) -> None:
        """Raise FeatureStoreUnavailable unless the backend answers."""
        ...

    def versions(self) -> list[str]:
        """Every version with data stored, complete or partial, sorted."""
        ...

    def close(self) -> None: ...


class PublishesVersions(ABC):
    """The publish sequence every backend shares: write the version aside unless it is stored
    whole already, record its publish time, move the pointer, retire. A backend supplies the
    storage steps below."""

    @abstractmethod
    def current_version(self) -> str | None: ...

    @abstractmethod
    def versions(self) -> list[str]: ...

    @property
    @abstractmethod
    def _where(self) -> str:
        """Where the versions live, for messages: "under 'prefix'", "in /dir"."""

    def _named(self, version: str | None) -> str:
        """``version``, or the current one when None (NoPublishedVersion if there is none)."""
        if version is not None:
            return version
        current = self.current_version()
        if current is None:
            raise NoPublishedVersion(f"nothing published {self._where}")
        return current

    def _missing(self, version: str) -> FeatureVersionMissing:
        return FeatureVersionMissing(
            f"feature version {version} is not in the store {self._where} (not published "
            "yet, or retired)"
        )

    @abstractmethod
    def _is_whole(self, version: str) -> bool:
        """Whether ``version`` is stored whole (its meta is there)."""

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
        """Write a whole version (meta last) without making it current."""

    @abstractmethod
    def _published(self) -> dict[str, float]:
        """Published versions and when each was last published (Unix seconds)."""

    @abstractmethod
    def _record_published(self, version: str, at: float) -> None: ...

    @abstractmethod
    def _set_pointer(self, version: str) -> None: ...

    @abstractmethod
    def _delete_versions(self, versions: set[str]) -> None:
        """Remove these versions, meta first, then forget their publish times."""

    def publish(
        self,
        ids: Sequence[str],
        matrix: np.ndarray,
        layout: FeatureLayout,
        version: str,
        *,
        retention: Retention = DEFAULT_RETENTION,
        batch_size: int = 2000,
        progress: Callable[[int], None] | None = None,
    ) -> PublishReport:
        """See FeatureStore.publish."""
        check_publish_args(ids, matrix, layout, version, batch_size)
        started = time.perf_counter()
        whole = self._is_whole(version)
        if whole and self.current_version() == version:
            return PublishReport(version, 0, time.perf_counter() - started)
        if not whole:
            self._write_version(
                ids, matrix, layout, version, batch_size=batch_size, progress=progress
            )
        self._record_published(version, time.time())  # before the pointer: retire sees it
        self._set_pointer(version)
        removed = self.retire(retention)
        items = 0 if whole else len(ids)
        return PublishReport(version, items, time.perf_counter() - started, removed)

    def retire(self, retention: Retention) -> list[str]:
        """See FeatureStore.retire."""
        published = self._published()
        kept = retention.kept(published, time.time())
        current = self.current_version()
        if current is not None:
            kept.add(current)
        doomed = (set(self.versions()) | set(published)) - kept
        if doomed:
            self._delete_versions(doomed)
        return sorted(doomed)


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


def batch_from_values(
    version: str, layout: FeatureLayout, ids: list[str], values: list[bytes | None]
) -> FeatureBatch:
    """The batch of one key-value fetch: ``values[i]`` is the stored value of ``ids[i]``, None
    when the version has no such item; an unreadable value makes its id missing and corrupt."""
    if None not in values:  # the usual case: every id known
        present, known = values, np.arange(len(ids), dtype=np.int64)
    else:
        known = np.asarray([p for p, v in enumerate(values) if v is not None], dtype=np.int64)
        present = [values[p] for p in known.tolist()]
    matrix, readable = decode_readable(layout, present)  # type: ignore[arg-type]
    found = known[readable]
    if len(found) == len(ids):
        return FeatureBatch(version, layout, matrix, found, [])
    corrupt = [ids[p] for p in known[~readable].tolist()]
    found_set = set(found.tolist())
    missing = [item_id for p, item_id in enumerate(ids) if p not in found_set]
    return FeatureBatch(version, layout, matrix, found, missing, corrupt)
