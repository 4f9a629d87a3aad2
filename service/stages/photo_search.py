"""Search by photo: the exact inner-product index over the items' photo vectors
(``photo_index.faiss``, written by the export; rows in the item index's order, so the
attribute filter's bitmap over index rows applies to it unchanged).

in:  a photo vector float32 [photo_dims] (unit length, PhotoEncoder), k, optionally
     allowed: bool [n_indexed] (a filter)
out: search -> list[str] of at most k product ids, best first;
     similarity -> float32 [rows]: the cosine of each row's photo vector to the photo's

Both block (a scan of the vectors): call them off the event loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.errors import ArtifactError
from service.manifest import Manifest
from service.stages.retrieval import Retriever


class PhotoIndex:
    def __init__(self, retriever: Retriever, vectors: np.ndarray) -> None:
        self._retriever = retriever
        self._vectors = vectors  # [n_indexed, photo_dims] float32, the index's own rows

    @classmethod
    def load(
        cls, version_dir: Path, manifest: Manifest, item_ids: list[str], *, threads: int
    ) -> PhotoIndex:
        spec = manifest.photo_index
        retriever = Retriever.load(version_dir, spec, threads=threads)
        if retriever.ids != item_ids:
            raise ArtifactError(
                f"{version_dir / spec.file}: its rows are not the item index's rows"
            )
        index = retriever.index
        if index.ntotal and not index.is_trained:
            raise ArtifactError(f"{version_dir / spec.file}: the index is not trained")
        vectors = index.reconstruct_n(0, index.ntotal)  # exact (Flat): the vectors themselves
        return cls(retriever, np.ascontiguousarray(vectors, dtype=np.float32))

    @property
    def dims(self) -> int:
        return self._retriever.dims

    def search(self, vector: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[str]:
        return self._retriever.search(vector, k, allowed)

    def similarity(self, vector: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Cosine of rows' photo vectors to ``vector`` (both unit length: the inner product)."""
        return (self._vectors[rows] @ vector).astype(np.float32)
