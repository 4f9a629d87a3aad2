"""Sharded FAISS retrieval gives the single index's results: exact (Flat) shards on the
catalogue's real item vectors, through export.index, the service's Retriever and /rank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from export.index import build_index, set_search_depth
from service.features import EmbeddedFeatureStore
from service.manifest import load_manifest, write_manifest
from service.stages.retrieval import Retriever

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
FULL_ARTIFACTS = REPO / "artifacts"


@pytest.fixture(scope="module")
def sample_vectors(sample_artifacts: Path) -> tuple[list[str], np.ndarray]:
    version_dir = manifest_dir(sample_artifacts)
    manifest = load_manifest(version_dir)
    ids = json.loads((version_dir / manifest.index.ids_file).read_bytes())
    batch = EmbeddedFeatureStore(sample_artifacts / "features").fetch(ids)
    return ids, batch.matrix.astype(np.float32)


def manifest_dir(artifacts: Path) -> Path:
    return artifacts / "models" / (artifacts / "models" / "CURRENT").read_text().strip()


def queries_from(vectors: np.ndarray, n: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = vectors[rng.choice(len(vectors), n, replace=False)]
    return (rows + rng.normal(0, 0.05, rows.shape)).astype(np.float32)


def assert_same_results(single: faiss.Index, sharded: faiss.Index, queries: np.ndarray, k: int):
    set_search_depth(single, k)
    set_search_depth(sharded, k)
    for batch in (queries, *queries[:8, None]):  # a batch (BLAS) and one query at a time
        scores, rows = single.search(batch, k)
        sharded_scores, sharded_rows = sharded.search(batch, k)
        np.testing.assert_array_equal(sharded_rows, rows)
        np.testing.assert_array_equal(sharded_scores, scores)


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_flat_shards_equal_the_single_index_on_the_sample(
    sample_vectors: tuple[list[str], np.ndarray], tmp_path: Path, shards: int
) -> None:
    ids, vectors = sample_vectors
    queries = queries_from(vectors)
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    single = build_index(ids, vectors, queries, tmp_path / "one", "Flat")
    sharded = build_index(ids, vectors, queries, tmp_path / "many", "Flat", shards=shards)

    assert single.spec.shards == [] and (tmp_path / "one" / "index.faiss").is_file()
    assert len(sharded.spec.shards) == shards and not (tmp_path / "many" / "index.faiss").exists()
    parts = [faiss.read_index(str(tmp_path / "many" / name)) for name in sharded.spec.shards]
    assert sum(part.ntotal for part in parts) == len(ids)
    assert sharded.spec.recall_at_100 == single.spec.recall_at_100 == 1.0
    assert_same_results(single.index, sharded.index, queries, k=100)

    # The service loads the shard files named by the manifest and answers as with one file.
    one = Retriever.load(tmp_path / "one", single.spec, threads=1)
    for threads in (1, 2):
        many = Retriever.load(tmp_path / "many", sharded.spec, threads=threads)
        for query in queries[:16]:
            assert many.search(query, 200) == one.search(query, 200)


def test_hnsw_shards_search_every_shard(
    sample_vectors: tuple[list[str], np.ndarray], tmp_path: Path
) -> None:
    ids, vectors = sample_vectors
    queries = queries_from(vectors)
    sharded = build_index(ids, vectors, queries, tmp_path, "HNSW32,Flat", shards=3)
    assert sharded.spec.recall_at_100 > 0.95
    _, rows = sharded.index.search(queries, 100)
    assert (rows >= 0).all() and rows.max() >= 2 * len(ids) // 3  # the last shard answers too


def test_flat_shards_on_the_full_catalogue() -> None:
    """The full catalogue's index (44k items), when this checkout has it, cut into 4 shards."""
    try:
        version_dir = manifest_dir(FULL_ARTIFACTS)
        manifest = load_manifest(version_dir)
    except Exception:
        pytest.skip("no full-catalogue artifacts in this checkout")
    index = faiss.read_index(str(version_dir / manifest.index.file))
    if "Flat" not in manifest.index.factory or manifest.index.shards:
        pytest.skip(f"the full catalogue's index is {manifest.index.factory}")
    vectors = index.reconstruct_n(0, index.ntotal)
    ids = [str(n) for n in range(index.ntotal)]
    queries = queries_from(vectors)
    shard_dir = REPO / ".cache" / "shard-test"
    shutil.rmtree(shard_dir, ignore_errors=True)
    shard_dir.mkdir(parents=True)
    try:
        sharded = build_index(ids, vectors, queries, shard_dir, "Flat", shards=4)
        assert_same_results(index, sharded.index, queries, k=200)
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)


@pytest.mark.anyio
async def test_rank_retrieves_the_same_through_a_sharded_index(
    sample_artifacts: Path, tmp_path: Path, serve
) -> None:
    from service.app import create_app
    from service.settings import Settings

    source = manifest_dir(sample_artifacts)
    manifest = load_manifest(source)
    ids = json.loads((source / manifest.index.ids_file).read_bytes())
    target = tmp_path / "models" / source.name
    target.mkdir(parents=True)
    for path in source.iterdir():  # the same version, with its index cut into 3 shards
        if path.name not in (manifest.index.file, "manifest.json"):
            (target / path.name).symlink_to(path)
    vectors = faiss.read_index(str(source / manifest.index.file)).reconstruct_n(0, len(ids))
    built = build_index(ids, vectors, queries_from(vectors), target, "Flat", shards=3)
    write_manifest(target, manifest.model_copy(update={"index": built.spec}))
    (tmp_path / "models" / "CURRENT").write_text(source.name)
    (tmp_path / "features").symlink_to(sample_artifacts / "features")

    bodies = [{"query": q, "retrieve_k": 300, "top_k": 30} for q in ("red tshirt", "black watch")]
    answers = []
    for artifacts in (sample_artifacts, tmp_path):
        async with serve(create_app(Settings(artifacts_dir=artifacts))) as client:
            responses = [await client.post("/rank", json=body) for body in bodies]
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        answers.append([r.json() for r in responses])
    assert answers[0] == answers[1]
