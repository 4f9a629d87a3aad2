"""/healthz and /readyz: ready only with the model warm and the feature store serving the
model's features; otherwise 503 with the reason, while the process keeps serving."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.features import EmbeddedFeatureStore, FeatureLayout, RedisFeatureStore, Retention
from service.manifest import load_manifest
from service.settings import Settings
from service.stages.scoring import bucket_sizes

pytestmark = pytest.mark.anyio

ServeApp = Callable[[FastAPI], AbstractAsyncContextManager[httpx.AsyncClient]]

VALID = {"query": "red shirt", "candidate_ids": ["1164"]}


async def test_not_ready_before_start(
    tmp_path: Path, unstarted_client: Callable[[FastAPI], httpx.AsyncClient]
) -> None:
    app = create_app(Settings(artifacts_dir=tmp_path))
    async with unstarted_client(app) as client:
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        rank = await client.post("/rank", json=VALID)
    assert health.status_code == 200
    assert ready.status_code == 503
    assert ready.json()["ready"] is False and ready.json()["detail"] == "starting"
    assert rank.status_code == 503 and rank.json() == {"detail": "not ready: starting"}


async def test_missing_artifacts_leave_the_process_serving(tmp_path: Path, serve: ServeApp) -> None:
    async with serve(create_app(Settings(artifacts_dir=tmp_path / "nothing"))) as client:
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        rank = await client.post("/rank", json=VALID)
        metrics = (await client.get("/metrics")).text
    assert health.status_code == 200
    assert ready.status_code == 503
    reason = ready.json()["detail"]
    assert reason.startswith("model not loaded") and "nothing/models/CURRENT" in reason
    assert rank.status_code == 503 and "model not loaded" in rank.json()["detail"]
    assert "fusionrank_model_ready 0.0" in metrics


@pytest.mark.slow
async def test_ready_only_after_every_bucket_is_warm(
    sample_artifacts: Path, sample_version_dir: Path
) -> None:
    settings = Settings(artifacts_dir=sample_artifacts, batch_max_size=2048, batch_min_bucket=16)
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://fr") as client,
    ):
        loading = await client.get("/readyz")  # the model takes far longer than a request
        assert loading.status_code == 503
        assert loading.json()["detail"] in ("starting", "loading the model")
        assert (await client.get("/healthz")).status_code == 200
        await app.state.runtime.loaded.wait()
        ready = await client.get("/readyz")
        batcher = app.state.runtime.pipeline.batcher
    assert ready.status_code == 200, ready.text
    manifest = load_manifest(sample_version_dir)
    assert ready.json() == {
        "ready": True,
        "detail": "ready",
        "model_version": manifest.version,
        "execution_provider": "CPUExecutionProvider",
        "features_version": manifest.features_version,
    }
    assert batcher.warmed == bucket_sizes(16, 2048) == (16, 32, 64, 128, 256, 512, 1024, 2048)


@pytest.mark.slow
async def test_feature_store_down_is_503(
    sample_artifacts: Path, closed_port: int, serve: ServeApp
) -> None:
    store = RedisFeatureStore.from_url(f"redis://127.0.0.1:{closed_port}/0", timeout_s=0.2)
    app = create_app(Settings(artifacts_dir=sample_artifacts), feature_store=store)
    async with serve(app) as client:
        ready = await client.get("/readyz")
        rank = await client.post("/rank", json=VALID)
        health = await client.get("/healthz")
    assert ready.status_code == 503
    assert ready.json()["detail"].startswith("feature store: redis feature store unavailable")
    assert ready.json()["model_version"]  # the model itself is loaded
    assert rank.status_code == 503
    assert rank.json()["detail"].startswith("redis feature store unavailable")
    assert health.status_code == 200


@pytest.mark.slow
async def test_ready_only_while_the_models_own_features_are_stored(
    sample_artifacts: Path,
    sample_version_dir: Path,
    redis_url: str,
    redis_prefix: str,
    serve: ServeApp,
) -> None:
    """Readiness follows the model's own feature version, not the store's pointer: another
    export published beside it changes nothing; its own retired makes the replica unready."""
    manifest = load_manifest(sample_version_dir)
    ids = json.loads((sample_version_dir / manifest.index.ids_file).read_bytes())
    own = EmbeddedFeatureStore(sample_artifacts / "features").fetch(ids, manifest.features_version)
    store = RedisFeatureStore.from_url(redis_url, prefix=redis_prefix)
    layout = FeatureLayout.from_dict(manifest.feature_layout)
    settings = Settings(artifacts_dir=sample_artifacts, feature_cache_items=0)
    async with serve(create_app(settings, feature_store=store)) as c:
        nothing = await c.get("/readyz")
        nothing_rank = await c.post("/rank", json=VALID)
        store.publish(ids, own.matrix, layout, manifest.features_version)
        published = await c.get("/readyz")
        store.publish(["1164"], np.ones((1, layout.dims), np.float16), layout, "f-other")
        beside = await c.get("/readyz")
        beside_rank = await c.post("/rank", json=VALID)
        store.retire(Retention(keep=1, grace_s=0))  # the model's own version is retired
        retired = await c.get("/readyz")
        retired_rank = await c.post("/rank", json=VALID)
    store.close()
    assert nothing.status_code == 503 and "not in the store" in nothing.json()["detail"]
    assert nothing_rank.status_code == 503 and nothing_rank.headers["retry-after"] == "1"
    assert published.status_code == 200
    assert beside.status_code == 200, beside.text  # the pointer names f-other now
    assert beside.json()["features_version"] == manifest.features_version
    assert beside_rank.status_code == 200 and beside_rank.json()["items"][0]["id"] == "1164"
    assert retired.status_code == 503
    assert manifest.features_version in retired.json()["detail"]
    assert retired_rank.status_code == 503 and "retired" in retired_rank.json()["detail"]


def _copy_with(artifacts: Path, version_dir: Path, tmp: Path, replace: dict[str, bytes]) -> Path:
    """A copy of the artifacts (big files linked) with some model files replaced."""
    out = tmp / "artifacts"
    target = out / "models" / version_dir.name
    target.mkdir(parents=True)
    (out / "models" / "CURRENT").write_text(version_dir.name)
    for path in version_dir.iterdir():
        if path.name in replace:
            (target / path.name).write_bytes(replace[path.name])
        else:
            os.symlink(path, target / path.name)
    os.symlink(artifacts / "features", out / "features")
    return out


@pytest.mark.slow
async def test_corrupt_model_file_is_503_naming_it(
    sample_artifacts: Path, sample_version_dir: Path, tmp_path: Path, serve: ServeApp
) -> None:
    ranker = load_manifest(sample_version_dir).graphs["ranker"].file
    broken = _copy_with(sample_artifacts, sample_version_dir, tmp_path, {ranker: b"not onnx"})
    async with serve(create_app(Settings(artifacts_dir=broken))) as client:
        ready = await client.get("/readyz")
        health = await client.get("/healthz")
    assert ready.status_code == 503 and health.status_code == 200
    assert ranker in ready.json()["detail"] and "cannot load" in ready.json()["detail"]


@pytest.mark.slow
async def test_index_that_disagrees_with_its_ids_is_503(
    sample_artifacts: Path, sample_version_dir: Path, tmp_path: Path, serve: ServeApp
) -> None:
    ids_file = load_manifest(sample_version_dir).index.ids_file
    broken = _copy_with(
        sample_artifacts, sample_version_dir, tmp_path, {ids_file: json.dumps(["1"]).encode()}
    )
    async with serve(create_app(Settings(artifacts_dir=broken))) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503 and "index has" in ready.json()["detail"]


@pytest.mark.slow
@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA"
)
async def test_cuda_asked_for_without_it_is_503(sample_artifacts: Path, serve: ServeApp) -> None:
    async with serve(create_app(Settings(artifacts_dir=sample_artifacts, device="cuda"))) as c:
        ready = await c.get("/readyz")
    assert ready.status_code == 503 and "CUDAExecutionProvider" in ready.json()["detail"]
