"""The fused ranker: one onnxruntime run scores the candidates of one or many queries.

in:  query_embedding float32 [Q, 384] (float16 for ranker_fp16), item_features float16
     [N, text_dims + image_dims], query_index int64 [N] (row of query_embedding per candidate),
     with N one of ``buckets``
out: Scores(score, text_contribution, image_contribution), each float32 [N]

Shapes are bucketed (powers of two from min_bucket, capped by max_batch) so onnxruntime sees a
handful of shapes and its memory stays flat; the batcher pads to them and warms each one. With
CUDA the float16 graph ``ranker_fp16`` is preferred when exported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from service.errors import ArtifactError
from service.manifest import Manifest
from service.stages.onnx_session import CUDA, open_session, provider_of, wants_cuda

GRAPH = "ranker"
GRAPH_FP16 = "ranker_fp16"
INPUTS = ("query_embedding", "item_features", "query_index")
OUTPUTS = ("score", "text_contribution", "image_contribution")
QUERY_DIMS = 384

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

log = logging.getLogger(__name__)


class Scores(NamedTuple):
    score: np.ndarray
    text_contribution: np.ndarray
    image_contribution: np.ndarray


def bucket_sizes(min_bucket: int, max_batch: int) -> tuple[int, ...]:
    """Powers of two from ``min_bucket`` (rounded up) below ``max_batch``, then ``max_batch``."""
    sizes = []
    size = 1 << max(0, min_bucket - 1).bit_length()
    while size < max_batch:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch)
    return tuple(sizes)


class Scorer:
    def __init__(
        self, session: ort.InferenceSession, graph: str, feature_dims: int, buckets: tuple[int, ...]
    ) -> None:
        self._session = session
        self.graph = graph
        self.feature_dims = feature_dims
        self.buckets = buckets
        types = {i.name: i.type for i in session.get_inputs()}
        try:
            self.query_dtype = np.dtype(_ORT_TYPES[types["query_embedding"]])
        except KeyError:
            raise ArtifactError(
                f"{graph}: query_embedding is {types['query_embedding']}, not float32/float16"
            ) from None
        if types["item_features"] != "tensor(float16)" or types["query_index"] != "tensor(int64)":
            raise ArtifactError(
                f"{graph}: item_features must be float16 and query_index int64, the graph has "
                f"{types['item_features']} and {types['query_index']}"
            )

    @classmethod
    def load(
        cls,
        version_dir: Path,
        manifest: Manifest,
        *,
        device: str,
        threads: int,
        max_batch: int,
        min_bucket: int,
    ) -> Scorer:
        if GRAPH not in manifest.graphs:
            raise ArtifactError(f"{version_dir}: manifest has no {GRAPH!r} graph")
        buckets = bucket_sizes(min_bucket, max_batch)
        dims = manifest.layout.dims
        if wants_cuda(device) and GRAPH_FP16 in manifest.graphs:
            session = cls._open(version_dir, manifest, GRAPH_FP16, device, threads)
            if provider_of(session) == CUDA:
                return cls(session, GRAPH_FP16, dims, buckets)
            log.warning("%s needs CUDA to pay off; using %s on CPU", GRAPH_FP16, GRAPH)
        session = cls._open(version_dir, manifest, GRAPH, device, threads)
        return cls(session, GRAPH, dims, buckets)

    @staticmethod
    def _open(
        version_dir: Path, manifest: Manifest, graph: str, device: str, threads: int
    ) -> ort.InferenceSession:
        return open_session(
            manifest.path(version_dir, graph),
            device=device,
            threads=threads,
            inputs=INPUTS,
            outputs=OUTPUTS,
        )

    @property
    def provider(self) -> str:
        return provider_of(self._session)

    def bucket(self, rows: int) -> int:
        """The smallest bucket that holds ``rows`` candidates."""
        for size in self.buckets:
            if size >= rows:
                return size
        raise ValueError(f"{rows} candidates exceed the largest batch ({self.buckets[-1]})")

    def run(
        self, query_embedding: np.ndarray, item_features: np.ndarray, query_index: np.ndarray
    ) -> Scores:
        """Score one packed batch (blocking)."""
        outputs = self._session.run(
            OUTPUTS,
            {
                "query_embedding": query_embedding,
                "item_features": item_features,
                "query_index": query_index,
            },
        )
        return Scores(*(np.asarray(out, dtype=np.float32) for out in outputs))
