"""The FAISS candidate index over the stored item vectors, with its recall measured against an
exact scan on real queries.

Which index: below `FLAT_BELOW` items an exact inner-product scan is both exact and fast
(128 dims x 44k items is ~1-2 ms per query here), so "auto" picks `Flat`; larger catalogues get
HNSW32, whose efSearch the service raises to at least the requested k.

Sharding (``shards=N``): the rows are cut into N contiguous blocks, each indexed on its own with
the same factory and saved as ``index.NNN-of-MMM.faiss``; the service searches them as one
``faiss.IndexShards`` (successive ids, results merged by score). Exact (Flat) shards give the
single index's results exactly. What it buys: shards build in parallel or on different machines,
load in parallel, and bound one file's (and one process's) memory; ``loadtest/index_scale.py``
measures memory and build time per million items.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from service.manifest import IndexSpec
from service.stages.retrieval import combine_shards

FLAT_BELOW = 200_000
INDEX_FILE = "index.faiss"
IDS_FILE = "index_ids.json"
PHOTO_INDEX_FILE = "photo_index.faiss"


@dataclass(frozen=True)
class IndexBuild:
    spec: IndexSpec
    index: faiss.Index


def choose_factory(factory: str, items: int) -> str:
    if factory != "auto":
        return factory
    return "Flat" if items < FLAT_BELOW else "HNSW32,Flat"


def shard_file(number: int, shards: int) -> str:
    return f"index.{number:03d}-of-{shards:03d}.faiss"


def set_search_depth(index: faiss.Index, k: int) -> None:
    """HNSW returns at most efSearch results: keep it at least k (no-op for other indexes)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexShards):
        for number in range(index.count()):
            set_search_depth(index.at(number), k)
    elif "HNSW" in type(index).__name__:
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", max(k, 128))


def recall_at(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int = 100) -> float:
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, k)
    set_search_depth(index, k)
    _, found = index.search(queries, k)
    hits = [len(set(t) & set(f)) / k for t, f in zip(truth, found, strict=True)]
    return float(np.mean(hits))


def build_index(
    ids: list[str],
    features: np.ndarray,
    queries: np.ndarray,
    out_dir: Path,
    factory: str = "auto",
    shards: int = 1,
) -> IndexBuild:
    """Index `features` (rows in `ids` order), save it and the row -> id map into out_dir.

    ``shards`` > 1 cuts the rows into that many contiguous blocks, one index file each."""
    if not 1 <= shards <= max(1, len(ids)):
        raise ValueError(f"shards must be in [1, {max(1, len(ids))}], got {shards}")
    vectors = np.ascontiguousarray(features, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    chosen = choose_factory(factory, len(ids))
    started = time.perf_counter()
    bounds = np.linspace(0, len(ids), shards + 1).round().astype(int)
    parts = [
        _build_one(vectors[low:high], chosen)
        for low, high in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    build_seconds = time.perf_counter() - started
    index = parts[0] if shards == 1 else combine_shards(parts)
    k = min(100, len(ids))
    recall = recall_at(index, vectors, queries, k)
    shard_files = [] if shards == 1 else [shard_file(n, shards) for n in range(shards)]
    for part, name in zip(parts, shard_files or [INDEX_FILE], strict=True):
        faiss.write_index(part, str(out_dir / name))
    (out_dir / IDS_FILE).write_text(json.dumps(ids))
    spec = IndexSpec(
        file=INDEX_FILE,
        ids_file=IDS_FILE,
        factory=chosen,
        metric="inner_product",
        dims=vectors.shape[1],
        items=len(ids),
        recall_at_100=round(recall, 4),
        build_seconds=round(build_seconds, 2),
        shards=shard_files,
    )
    return IndexBuild(spec, index)


def _build_one(vectors: np.ndarray, factory: str) -> faiss.Index:
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    return index


def build_photo_index(vectors: np.ndarray, out_dir: Path) -> IndexSpec:
    """The exact inner-product index over item photo vectors (models.photo_head), rows in the
    same order as the item index's (its ids file), so one filter bitmap serves both. Always
    Flat: photo vectors are small (128 float32 = 512 B an item, 23 MB for 44k items) and an
    exact scan of them takes about a millisecond here."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    started = time.perf_counter()
    index = _build_one(vectors, "Flat")
    build_seconds = time.perf_counter() - started
    faiss.write_index(index, str(out_dir / PHOTO_INDEX_FILE))
    return IndexSpec(
        file=PHOTO_INDEX_FILE,
        ids_file=IDS_FILE,
        factory="Flat",
        metric="inner_product",
        dims=vectors.shape[1],
        items=len(vectors),
        recall_at_100=1.0,  # an exact scan
        build_seconds=round(build_seconds, 2),
    )
