"""Feature store in a local directory, for running without a Redis server.

Layout on disk::

    root/CURRENT                      the current version's name (replaced atomically)
    root/<version>/features.npy       [N, dims] in the layout dtype, memory-mapped by readers
    root/<version>/ids.json           the N item ids, in row order
    root/<version>/layout.json        FeatureLayout.to_dict()
    root/.partial-<version>-<hex>/    a version being written (renamed to root/<version> when done)

A reader keeps the opened version (memmap + id -> row dict) and reopens only when CURRENT
changes, which it checks with one stat per fetch. An opened version stays readable after a
publisher deletes it (POSIX keeps unlinked, mapped files alive), so a reader never mixes two.
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

from service.errors import FeatureFormatError, FeatureStoreUnavailable, NoPublishedVersion
from service.features.base import FeatureBatch, PublishesVersions
from service.features.format import FeatureLayout

_POINTER = "CURRENT"
_PARTIAL = ".partial-"
_OPEN_ATTEMPTS = 3  # each retry means a publish removed the version between stat and open


@dataclass(frozen=True)
class _OpenVersion:
    pointer_stat: tuple[int, int, int]  # (inode, mtime_ns, size) of CURRENT when it was read
    version: str
    layout: FeatureLayout
    matrix: np.ndarray  # read-only memmap
    row_of: dict[str, int]


class EmbeddedFeatureStore(PublishesVersions):
    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        self._pointer = self._root / _POINTER
        self._open: _OpenVersion | None = None

    # -- reading -----------------------------------------------------------------------

    def current_version(self) -> str | None:
        try:
            return self._pointer.read_text().strip()
        except FileNotFoundError:
            return None

    def layout(self) -> FeatureLayout:
        return self._current().layout

    def fetch(self, ids: Sequence[str]) -> FeatureBatch:
        opened = self._current()
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
                names.add(path.name.removeprefix(_PARTIAL).rsplit("-", 1)[0])
            elif path.is_dir():
                names.add(path.name)
        return sorted(names)

    def close(self) -> None:
        self._open = None

    # -- publishing --------------------------------------------------------------------

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
        (partial / "layout.json").write_text(json.dumps(layout.to_dict()))
        final = self._root / version
        if final.exists():  # complete but never made current: a publisher died after rename
            shutil.rmtree(final)
        partial.rename(final)

    def _switch_to(self, version: str) -> list[str]:
        _write_atomically(self._pointer, version)
        return self._delete_versions(keep=version)

    def _delete_versions(self, keep: str) -> list[str]:
        removed = set()
        for path in self._root.iterdir():
            if path.name in (_POINTER, keep):
                continue
            if path.name.startswith(_PARTIAL):
                removed.add(path.name.removeprefix(_PARTIAL).rsplit("-", 1)[0])
            elif path.is_dir():
                removed.add(path.name)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith(f".{_POINTER}-"):  # pointer temp file of a killed publish
                path.unlink(missing_ok=True)
        removed.discard(keep)  # a killed earlier attempt at this same version is not "removed"
        return sorted(removed)

    # -- helpers -----------------------------------------------------------------------

    def _current(self) -> _OpenVersion:
        for _ in range(_OPEN_ATTEMPTS):
            try:
                st = self._pointer.stat()
            except FileNotFoundError:
                raise NoPublishedVersion(f"nothing published in {self._root}") from None
            pointer_stat = (st.st_ino, st.st_mtime_ns, st.st_size)
            opened = self._open
            if opened is not None and opened.pointer_stat == pointer_stat:
                return opened
            try:
                opened = self._open_version(self._pointer.read_text().strip(), pointer_stat)
            except FileNotFoundError:
                continue  # CURRENT moved on and its version was removed: look again
            self._open = opened
            return opened
        raise FeatureStoreUnavailable(f"feature version in {self._root} kept changing")

    def _open_version(self, version: str, pointer_stat: tuple[int, int, int]) -> _OpenVersion:
        directory = self._root / version
        layout = FeatureLayout.from_dict(json.loads((directory / "layout.json").read_text()))
        ids = json.loads((directory / "ids.json").read_text())
        matrix = np.load(directory / "features.npy", mmap_mode="r")
        if matrix.dtype != layout.numpy_dtype or matrix.shape != (len(ids), layout.dims):
            raise FeatureFormatError(
                f"{directory}: features.npy is {matrix.dtype} {matrix.shape}, expected "
                f"{layout.dtype} ({len(ids)}, {layout.dims})"
            )
        row_of = {item_id: row for row, item_id in enumerate(ids)}
        return _OpenVersion(pointer_stat, version, layout, matrix, row_of)


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}-{uuid.uuid4().hex}")
    temp.write_text(text)
    os.replace(temp, path)
