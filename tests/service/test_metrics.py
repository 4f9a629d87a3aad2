"""/metrics: every metric family is exposed from the start, counts what happens, and passes
``promtool check metrics``."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.manifest import load_manifest
from service.settings import Settings

pytestmark = pytest.mark.anyio

ServeApp = Callable[[FastAPI], AbstractAsyncContextManager[httpx.AsyncClient]]

FAMILIES = {
    "fusionrank_http_requests": "counter",
    "fusionrank_http_request_duration_seconds": "histogram",
    "fusionrank_stage_duration_seconds": "histogram",
    "fusionrank_batch_size": "histogram",
    "fusionrank_batch_requests": "histogram",
    "fusionrank_batch_queue_wait_seconds": "histogram",
    "fusionrank_batch_releases": "counter",
    "fusionrank_query_cache_hits": "counter",
    "fusionrank_query_cache_misses": "counter",
    "fusionrank_missing_ids": "counter",
    "fusionrank_model_info": "gauge",
    "fusionrank_model_ready": "gauge",
}


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"promtool check metrics:\n{done.stdout}{done.stderr}"


async def test_every_family_is_exposed_before_traffic(tmp_path: Path, serve: ServeApp) -> None:
    async with serve(create_app(Settings(artifacts_dir=tmp_path))) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    types = {family.name: family.type for family in text_string_to_metric_families(response.text)}
    assert {name: types.get(name) for name in FAMILIES} == FAMILIES
    samples = parse(response.text)
    for stage in ("encode", "retrieve", "fetch", "score"):
        assert ("fusionrank_stage_duration_seconds_count", frozenset({("stage", stage)})) in samples
    for reason in ("full", "timeout"):
        assert ("fusionrank_batch_releases_total", frozenset({("reason", reason)})) in samples
    promtool_check(response.text)


@pytest.fixture(scope="module")
async def traffic(
    serve: ServeApp, sample_artifacts: Path, sample_version_dir: Path
) -> AsyncIterator[str]:
    """/metrics after a known mix of requests on the sample artifacts."""
    manifest = load_manifest(sample_version_dir)
    ids = json.loads((sample_version_dir / manifest.index.ids_file).read_bytes())[:3]
    async with serve(create_app(Settings(artifacts_dir=sample_artifacts))) as client:
        assert (await client.get("/readyz")).status_code == 200
        for body in (
            {"query": "red tshirt", "candidate_ids": [*ids, "nope-1", "nope-2"]},  # miss
            {"query": "red tshirt", "candidate_ids": ids},  # hit
            {"query": "black watch", "retrieve_k": 20},  # miss, retrieval
        ):
            assert (await client.post("/rank", json=body)).status_code == 200
        assert (await client.post("/rank", json={"query": ""})).status_code == 422
        yield (await client.get("/metrics")).text


@pytest.mark.slow
async def test_metrics_count_requests_stages_batches_and_cache(
    traffic: str, sample_version_dir: Path
) -> None:
    samples = parse(traffic)
    requests = "fusionrank_http_requests_total"
    assert value(samples, requests, route="/rank", method="POST", status="200") == 3
    assert value(samples, requests, route="/rank", method="POST", status="422") == 1
    assert value(samples, requests, route="/readyz", method="GET", status="200") == 1
    assert value(samples, "fusionrank_http_request_duration_seconds_count", route="/rank") == 4
    stage_counts = {
        stage: value(samples, "fusionrank_stage_duration_seconds_count", stage=stage)
        for stage in ("encode", "retrieve", "fetch", "score")
    }
    assert stage_counts == {"encode": 3, "retrieve": 1, "fetch": 3, "score": 3}
    assert value(samples, "fusionrank_query_cache_hits_total") == 1
    assert value(samples, "fusionrank_query_cache_misses_total") == 2
    assert value(samples, "fusionrank_missing_ids_total") == 2
    batches = value(samples, "fusionrank_batch_size_count")
    assert batches == 3 and value(samples, "fusionrank_batch_requests_count") == 3
    assert value(samples, "fusionrank_batch_size_sum") == 3 + 3 + 20
    assert value(samples, "fusionrank_batch_queue_wait_seconds_count") == 3
    releases = sum(
        value(samples, "fusionrank_batch_releases_total", reason=r) for r in ("full", "timeout")
    )
    assert releases == batches
    manifest = load_manifest(sample_version_dir)
    info = {
        "version": manifest.version,
        "strategy": manifest.strategy,
        "execution_provider": "CPUExecutionProvider",
    }
    assert value(samples, "fusionrank_model_info", **info) == 1
    assert value(samples, "fusionrank_model_ready") == 1


@pytest.mark.slow
async def test_metrics_after_traffic_pass_promtool(traffic: str) -> None:
    promtool_check(traffic)
