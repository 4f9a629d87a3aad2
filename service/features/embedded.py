"""Feature store in a local directory, for running without a Redis server.

Layout on disk::

    root/CURRENT                      the newest published version's name (replaced atomically)
    root/PUBLISHED.json               {version: when it was last published (Unix seconds)}
    root/<version>/features.npy       [N, dims] in the layout dtype, memory-mapped by readers
    root/<version>/ids.json           the N item ids, in row order
    root/<version>/layout.json        FeatureLayout.to_dict()
    root/.partial-<version>-<hex>/    a version being written (renamed to root/<version> when done)
    root/.retired-<version>-<hex>/    a version being removed (renamed away first, then deleted)

A version directory appears whole (one rename) and disappears whole (one rename), so a reader
sees a version whole or not at all. A reader keeps each version it opened (memmap + id -> row
dict) and checks with one stat per fetch that the directory is still there; a fetch that
raced a removal still reads whole rows (POSIX keeps unlinked, mapped files alive).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import (
    FeatureFormatError,
    FeatureStoreUnavailable,
)
from service.features.base import FeatureBatch, PublishesVersions
from service.features.format import FeatureLayout

_POINTER = "CURRENT"
_PUBLISHED = "PUBLISHED.json"
_PARTIAL = ".partial-"
_RETIRED = ".retired-"
_LAYOUT = "layout.json"


@dataclass(frozen=True)
class _OpenVersion:
    version: str
    layout: FeatureLayout
    matrix: np.ndarray  # read-only memmap
    row_of: dict[str, int]


class EmbeddedFeatureStore(PublishesVersions):
    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        self._pointer = self._root / _POINTER
        self._opened: dict[str, _OpenVersion] = {}

    # -- reading -----------------------------------------------------------------------

    def current_version(self) -> str | None:
        try:
            return self._pointer.read_text().strip()
        except FileNotFoundError:
            return None

    def layout(self, version: str | None = None) -> FeatureLayout:
        version = self._named(version)
        try:
            return _read_layout(self._root / version)
        except FileNotFoundError:
            raise self._missing(version) from None

    def fetch(self, ids: Sequence[str], version: str | None = None) -> FeatureBatch:
        opened = self._open(self._named(version))
        rows = [opened.row_of.get(item_id) for item_id in ids]
        found = [pos for pos, row in enumerate(rows) if row is not None]
        missing = [ids[pos] for pos, row in enumerate(rows) if row is None]
        # Fancy indexing copies the rows out of the memmap into an ordinary array.
        matrix = np.asarray(opened.matrix[np.asarray([rows[pos] for pos in found], dtype=np.int64)])
        return FeatureBatch(
            opened.version, opened.layout, matrix, np.asarray(found, dtype=np.int64), missing
        )

    def ping(self) -> None:
        if not self._root.is_dir():
            raise FeatureStoreUnavailable(f"feature store directory {self._root} is missing")

    def versions(self) -> list[str]:
        names = set()
        for path in self._root.iterdir():
            if path.name.startswith(_PARTIAL):
                names.add(_name_in(path.name, _PARTIAL))
            elif path.is_dir() and not path.name.startswith("."):
                names.add(path.name)
        return sorted(names)

    def close(self) -> None:
        self._opened = {}

    # -- publishing --------------------------------------------------------------------

    def _is_whole(self, version: str) -> bool:
        return (self._root / version / _LAYOUT).is_file()

    def _write_version(
        self,
        ids: Sequence[str],
        matrix: np.ndarray,
        layout: FeatureLayout,
        version: str,
        *,
        batch_size: int = 2000,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Write a whole version into a temp dir, then rename it to root/<version>."""
        self._remove_leftovers({version})  # of a killed publish of this same version
        partial = self._root / f"{_PARTIAL}{version}-{uuid.uuid4().hex}"
        partial.mkdir()
        features = np.lib.format.open_memmap(
            partial / "features.npy", mode="w+", dtype=layout.numpy_dtype, shape=matrix.shape
        )
        for start in range(0, len(ids), batch_size):
            features[start : start + batch_size] = matrix[start : start + batch_size]
            if progress is not None:
                progress(min(start + batch_size, len(ids)))
        features.flush()
        del features
        (partial / "ids.json").write_text(json.dumps(list(ids)))
        (partial / _LAYOUT).write_text(json.dumps(layout.to_dict()))
        final = self._root / version
        if final.exists():  # left without a layout by a failed removal: not whole
            shutil.rmtree(final)
        partial.rename(final)

    def _published(self) -> dict[str, float]:
        try:
            return {
                k: float(v) for k, v in json.loads((self._root / _PUBLISHED).read_text()).items()
            }
        except FileNotFoundError:
            return {}

    def _record_published(self, version: str, at: float) -> None:
        self._write_published({**self._published(), version: at})

    def _set_pointer(self, version: str) -> None:
        _write_atomically(self._pointer, version)

    def _delete_versions(self, versions: set[str]) -> None:
        for version in versions:
            directory = self._root / version
            if directory.is_dir():  # one rename: readers see it whole, then gone
                directory.rename(self._root / f"{_RETIRED}{version}-{uuid.uuid4().hex}")
        self._remove_leftovers(versions)
        published = self._published()
        self._write_published({k: v for k, v in published.items() if k not in versions})

    # -- helpers -----------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"in {self._root}"

    def _open(self, version: str) -> _OpenVersion:
        directory = self._root / version
        if not directory.is_dir():  # one stat: retired since it was opened, or never there
            self._opened.pop(version, None)
            raise self._missing(version)
        opened = self._opened.get(version)
        if opened is None:
            try:
                opened = _open_version(directory, version)
            except FileNotFoundError:
                raise self._missing(version) from None
            self._opened[version] = opened
        return opened

    def _remove_leftovers(self, versions: set[str]) -> None:
        """Delete the partial and retired directories of ``versions`` (of any version when
        retired) and pointer temp files of a killed publish."""
        for path in self._root.iterdir():
            name = path.name
            if name.startswith(_RETIRED) or (
                name.startswith(_PARTIAL) and _name_in(name, _PARTIAL) in versions
            ):
                shutil.rmtree(path, ignore_errors=True)
            elif name.startswith((f".{_POINTER}-", f".{_PUBLISHED}-")):
                path.unlink(missing_ok=True)

    def _write_published(self, published: dict[str, float]) -> None:
        _write_atomically(self._root / _PUBLISHED, json.dumps(published, sort_keys=True))


def _name_in(directory_name: str, marker: str) -> str:
    """The version name in a ``<marker><version>-<hex>`` directory name."""
    return directory_name.removeprefix(marker).rsplit("-", 1)[0]


def _read_layout(directory: Path) -> FeatureLayout:
    try:
        return FeatureLayout.from_dict(json.loads((directory / _LAYOUT).read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise FeatureFormatError(f"{directory / _LAYOUT}: invalid layout: {exc}") from exc


def _open_version(directory: Path, version: str) -> _OpenVersion:
    layout = _read_layout(directory)
    ids = json.loads((directory / "ids.json").read_text())
    matrix = np.load(directory / "features.npy", mmap_mode="r")
    if matrix.dtype != layout.numpy_dtype or matrix.shape != (len(ids), layout.dims):
        raise FeatureFormatError(
            f"{directory}: features.npy is {matrix.dtype} {matrix.shape}, expected "
            f"{layout.dtype} ({len(ids)}, {layout.dims})"
        )
    row_of = {item_id: row for row, item_id in enumerate(ids)}
    return _OpenVersion(version, layout, matrix, row_of)


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}-{uuid.uuid4().hex}")
    temp.write_text(text)
    os.replace(temp, path)
