"""POST /rank through HTTP on the artifacts exported from the sample, against both feature
stores (embedded and a real Redis).

Expected scores come from a reference that runs the exported graphs directly with
onnxruntime, one query at a time, without the service's cache, batching or padding.
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import faiss
import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fastapi import FastAPI
from tokenizers import Tokenizer

from service.app import create_app
from service.features import EmbeddedFeatureStore, FeatureStore
from service.manifest import Manifest, load_manifest
from service.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ServeApp = Callable[[FastAPI], AbstractAsyncContextManager[httpx.AsyncClient]]
SAMPLE_PRODUCTS = Path(__file__).resolve().parents[2] / "data" / "sample" / "products.csv"


class Reference:
    """The exported model run by hand: tokenizer -> query encoder -> ranker.onnx, with the
    query encoder the service runs by default on CPU (int8 when the export has one)."""

    def __init__(self, artifacts: Path, version_dir: Path) -> None:
        self.manifest: Manifest = load_manifest(version_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1

        def session(graph: str) -> ort.InferenceSession:
            path = self.manifest.path(version_dir, graph)
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        encoder = "query_encoder_int8" if "query_encoder_int8" in self.manifest.graphs else ""
        self.encoder = session(encoder or "query_encoder")
        self.ranker = session("ranker")
        self.tokenizer = Tokenizer.from_file(str(version_dir / self.manifest.tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.manifest.max_tokens)
        self.index = faiss.read_index(str(version_dir / self.manifest.index.file))
        self.ids: list[str] = json.loads((version_dir / self.manifest.index.ids_file).read_text())
        self.store = EmbeddedFeatureStore(artifacts / "features")

    def encode(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray([self.tokenizer.encode(query).ids], dtype=np.int64)
        embedding, retrieval = self.encoder.run(
            None, {"input_ids": ids, "attention_mask": ids * 0 + 1}
        )
        return embedding, retrieval

    def retrieve(self, query: str, k: int) -> list[str]:
        _, rows = self.index.search(self.encode(query)[1].astype(np.float32), k)
        return [self.ids[r] for r in rows[0] if r >= 0]

    def scores(self, query: str, ids: list[str]) -> dict[str, tuple[float, float, float]]:
        batch = self.store.fetch(ids)
        outputs = self.ranker.run(
            ["score", "text_contribution", "image_contribution"],
            {
                "query_embedding": self.encode(query)[0],
                "item_features": batch.matrix,
                "query_index": np.zeros(len(batch.found), np.int64),
            },
        )
        found = [ids[p] for p in batch.found]
        return {i: tuple(float(o[n]) for o in outputs) for n, i in enumerate(found)}

    def ranking(self, query: str, ids: list[str], top_k: int) -> list[tuple[str, float]]:
        scores = self.scores(query, ids)
        position = {item: n for n, item in enumerate(ids)}
        ordered = sorted(scores, key=lambda item: (-scores[item][0], position[item]))
        return [(item, scores[item][0]) for item in ordered[:top_k]]


@pytest.fixture(scope="module")
def reference(sample_artifacts: Path, sample_version_dir: Path) -> Reference:
    return Reference(sample_artifacts, sample_version_dir)


@pytest.fixture(scope="module")
def article_type() -> dict[str, str]:
    with SAMPLE_PRODUCTS.open() as f:
        return {row["id"]: row["articleType"] for row in csv.DictReader(f)}


@pytest.fixture(scope="module", params=["embedded", "redis"])
def rank_store(request: pytest.FixtureRequest, sample_artifacts: Path) -> FeatureStore:
    if request.param == "redis":
        return request.getfixturevalue("sample_redis_store")
    return EmbeddedFeatureStore(sample_artifacts / "features")


@pytest.fixture(scope="module")
async def client(
    serve: ServeApp, sample_artifacts: Path, rank_store: FeatureStore
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(artifacts_dir=sample_artifacts), feature_store=rank_store)
    async with serve(app) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        yield client


def candidates(reference: Reference, count: int, offset: int = 0) -> list[str]:
    step = max(1, len(reference.ids) // count)
    return reference.ids[offset::step][:count]


async def rank(client: httpx.AsyncClient, **body: object) -> dict:
    response = await client.post("/rank", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


async def test_known_query_order_on_the_sample(
    client: httpx.AsyncClient, reference: Reference
) -> None:
    ids = candidates(reference, 120)
    body = await rank(client, query="men red tshirt", candidate_ids=ids, top_k=25)
    expected = reference.ranking("men red tshirt", ids, 25)
    assert [item["id"] for item in body["items"]] == [item for item, _ in expected]
    np.testing.assert_allclose(
        [item["score"] for item in body["items"]], [score for _, score in expected], rtol=1e-5
    )
    assert body["model_version"] == reference.manifest.version
    assert body["missing_ids"] == []


async def test_retrieval_finds_the_asked_article_type(
    client: httpx.AsyncClient, article_type: dict[str, str]
) -> None:
    body = await rank(client, query="black watch for men", top_k=10)
    types = [article_type[item["id"]] for item in body["items"]]
    assert len(types) == 10
    assert types.count("Watches") >= 8, types


async def test_candidates_path_sorts_and_explains(
    client: httpx.AsyncClient, reference: Reference
) -> None:
    ids = candidates(reference, 300, offset=3)
    body = await rank(client, query="women handbag", candidate_ids=ids, top_k=50, explain=True)
    items = body["items"]
    assert len(items) == 50
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True)
    assert {item["id"] for item in items} <= set(ids)
    expected = reference.scores("women handbag", ids)
    for item in items:
        score, text, image = expected[item["id"]]
        assert set(item) == {"id", "score", "text_contribution", "image_contribution", "boost"}
        assert item["boost"] == 0.0  # no boosts asked for
        assert item["text_contribution"] == pytest.approx(text, rel=1e-5, abs=1e-6)
        assert item["image_contribution"] == pytest.approx(image, rel=1e-5, abs=1e-6)
    plain = await rank(client, query="women handbag", candidate_ids=ids, top_k=3)
    assert all(set(item) == {"id", "score"} for item in plain["items"])


async def test_top_k_and_defaults(client: httpx.AsyncClient, reference: Reference) -> None:
    ids = candidates(reference, 40)
    assert len((await rank(client, query="shoes", candidate_ids=ids))["items"]) == 10
    assert len((await rank(client, query="shoes", candidate_ids=ids, top_k=1000))["items"]) == 40
    assert (await rank(client, query="shoes", candidate_ids=[]))["items"] == []


async def test_retrieval_path_reranks_the_index_top_k(
    client: httpx.AsyncClient, reference: Reference
) -> None:
    query = "blue jeans"
    body = await rank(client, query=query, retrieve_k=50, top_k=20)
    retrieved = reference.retrieve(query, 50)
    expected = reference.ranking(query, retrieved, 20)
    assert [item["id"] for item in body["items"]] == [item for item, _ in expected]
    assert body["missing_ids"] == []
    few = await rank(client, query=query, retrieve_k=5, top_k=10)
    assert len(few["items"]) == 5  # only retrieve_k candidates exist
    default = await rank(client, query=query)
    assert len(default["items"]) == 10


async def test_unknown_ids_are_listed_as_missing_and_skipped(
    client: httpx.AsyncClient, reference: Reference
) -> None:
    known = candidates(reference, 6)
    ids = ["no-such-id", known[0], known[1], "also-missing", *known[2:]]
    body = await rank(client, query="watch", candidate_ids=ids, top_k=100)
    assert body["missing_ids"] == ["no-such-id", "also-missing"]
    assert sorted(item["id"] for item in body["items"]) == sorted(known)
    only_missing = await rank(client, query="watch", candidate_ids=["x1", "x2"])
    assert only_missing == {
        "items": [],
        "model_version": reference.manifest.version,
        "missing_ids": ["x1", "x2"],
        "filtered_out": 0,
    }


async def test_many_concurrent_requests_are_batched_and_score_as_alone(
    serve: ServeApp, sample_artifacts: Path, reference: Reference
) -> None:
    # A long wait, so that requests arriving together surely share runs; all 35 admitted.
    settings = Settings(artifacts_dir=sample_artifacts, batch_max_wait_us=50_000, max_in_flight=64)
    app = create_app(settings)
    queries = ["red tshirt", "black watch", "women heels", "men sports shoes", "blue shirt"]
    bodies = []
    for n in range(30):
        ids = candidates(reference, [1, 7, 60, 150, 333][n % 5], offset=n)
        bodies.append(
            {"query": queries[n % 5], "candidate_ids": ids, "top_k": 1000, "explain": True}
        )
    bodies += [{"query": q, "retrieve_k": 300, "top_k": 300} for q in queries]
    async with serve(app) as client:
        alone = [(await client.post("/rank", json=body)).json() for body in bodies]
        histogram = app.state.metrics.batch_requests
        merged_before = _batches_with_more_than_one(histogram)
        together = await asyncio.gather(*(client.post("/rank", json=body) for body in bodies))
        merged_after = _batches_with_more_than_one(histogram)
    assert merged_before == 0  # sent alone, every request had its runs to itself
    assert merged_after > 0
    assert [response.json() for response in together] == alone  # exactly, float for float


def _batches_with_more_than_one(histogram) -> float:
    samples = {
        (s.name, s.labels.get("le")): s.value
        for metric in histogram.collect()
        for s in metric.samples
    }
    return (
        samples[("fusionrank_batch_requests_count", None)]
        - samples[("fusionrank_batch_requests_bucket", "1.0")]
    )
