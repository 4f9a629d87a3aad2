"""Candidate retrieval: the FAISS inner-product index over item features.

in:  retrieval_vector float32 [dims], k: int
out: list[str] of at most k product ids, best first

``search`` is blocking (a scan of the index): call it off the event loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np

from service.errors import ArtifactError
from service.manifest import Manifest


class Retriever:
    def __init__(self, index: faiss.Index, ids: list[str]) -> None:
        self._index = index
        self._ids = ids

    @classmethod
    def load(cls, version_dir: Path, manifest: Manifest, *, threads: int) -> Retriever:
        spec = manifest.index
        path, ids_path = version_dir / spec.file, version_dir / spec.ids_file
        if not path.is_file():
            raise ArtifactError(f"{path}: no such index file")
        faiss.omp_set_num_threads(threads)
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise ArtifactError(f"{path}: FAISS cannot read it: {exc}") from exc
        try:
            ids = json.loads(ids_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{ids_path}: cannot read the index ids: {exc}") from exc
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ArtifactError(f"{ids_path}: expected a JSON list of string ids")
        if index.d != spec.dims or index.ntotal != len(ids):
            raise ArtifactError(
                f"{path}: index has {index.ntotal} vectors of {index.d} dims, manifest and "
                f"{ids_path.name} say {len(ids)} of {spec.dims}"
            )
        return cls(index, ids)

    @property
    def dims(self) -> int:
        return self._index.d

    def search(self, vector: np.ndarray, k: int) -> list[str]:
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        _, rows = self._index.search(query, min(k, self._index.ntotal))
        ids = self._ids
        return [ids[row] for row in rows[0].tolist() if row >= 0]
