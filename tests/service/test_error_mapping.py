"""One exception -> HTTP mapping (service/http_errors.py), through HTTP: an unreadable value
for one item costs that item, not the request; a fault retrying cannot mend (a Redis user
without read permission, an unexpected error) is a JSON 500, never text/plain, and the real
nginx passes it on after one try instead of retrying it on every replica.

Status chosen for a Redis that refuses the service's reads (NOPERM): 500. It is not
transient (every replica has the same credentials, and retrying only multiplies the load),
so it must not be a 503 that balancers and clients retry; it is the service's configuration
that is wrong, not the client's request, so not a 4xx.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import pytest
import redis
from fastapi import FastAPI

from service.app import create_app
from service.features import EmbeddedFeatureStore, FeatureBatch, RedisFeatureStore
from service.manifest import load_manifest
from service.settings import Settings
from tests.service.fleet import replicas_behind_nginx

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ServeApp = Callable[[FastAPI], AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def published(
    sample_artifacts: Path, sample_version_dir: Path, redis_url: str, redis_prefix: str
) -> tuple[str, list[str]]:
    """The sample's features in the real Redis under this test's prefix: (version, ids)."""
    manifest = load_manifest(sample_version_dir)
    ids = json.loads((sample_version_dir / manifest.index.ids_file).read_bytes())
    batch = EmbeddedFeatureStore(sample_artifacts / "features").fetch(ids)
    store = RedisFeatureStore.from_url(redis_url, prefix=redis_prefix)
    store.publish(ids, batch.matrix, batch.layout, batch.version)
    store.close()
    return batch.version, ids


@pytest.fixture
def reader_without_item_access(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> Iterator[str]:
    """A Redis URL of an ACL user that may read the pointer and the metas (so the service
    starts and is ready) but no item value: every fetch of items is answered NOPERM."""
    user, password = f"fusionrank-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    redis_client.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        commands=["+@all"],
        keys=[f"~{redis_prefix}:current", f"~{redis_prefix}:v:*:meta"],
    )
    yield f"redis://{user}:{password}@{redis_url.split('://', 1)[1]}"
    redis_client.acl_deluser(user)


async def test_an_unreadable_value_is_one_missing_id_and_the_rest_is_ranked(
    sample_artifacts: Path,
    published: tuple[str, list[str]],
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
    serve: ServeApp,
) -> None:
    version, ids = published
    damaged, *others = ids[:20]
    key = f"{redis_prefix}:v:{version}:i:{damaged}"
    redis_client.set(key, redis_client.get(key)[:-3])  # truncated: wrong length
    settings = Settings(
        artifacts_dir=sample_artifacts, redis_url=redis_url, redis_prefix=redis_prefix
    )
    body = {"query": "red tshirt", "candidate_ids": [damaged, *others], "top_k": 30}
    async with serve(create_app(settings)) as client:
        first = await client.post("/rank", json=body)
        again = await client.post("/rank", json=body)  # never cached: read, and refused, again
        metrics = (await client.get("/metrics")).text

    for response in (first, again):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["missing_ids"] == [damaged]
        assert sorted(item["id"] for item in answer["items"]) == sorted(others)
    # Once at start-up (the cache fill reads every indexed item), once per request.
    assert "fusionrank_unreadable_features_total 3.0" in metrics


async def test_a_redis_that_refuses_reads_is_a_json_500_and_the_replica_stays_up(
    sample_artifacts: Path,
    published: tuple[str, list[str]],
    reader_without_item_access: str,
    redis_prefix: str,
    serve: ServeApp,
) -> None:
    _, ids = published
    settings = Settings(
        artifacts_dir=sample_artifacts,
        redis_url=reader_without_item_access,
        redis_prefix=redis_prefix,
    )
    async with serve(create_app(settings)) as client:
        ready = await client.get("/readyz")
        rank = await client.post("/rank", json={"query": "red tshirt", "candidate_ids": ids[:5]})
        health = await client.get("/healthz")
    assert ready.status_code == 200  # the metas are readable: the version is whole
    assert rank.status_code == 500
    assert rank.headers["content-type"] == "application/json"
    assert "retry-after" not in rank.headers  # not worth retrying
    assert "permission" in rank.json()["detail"]
    assert health.status_code == 200


class ExplodingStore(EmbeddedFeatureStore):
    """The sample's store whose item fetches fail with an error nobody planned for."""

    def fetch(self, ids: Sequence[str], version: str | None = None) -> FeatureBatch:
        raise RuntimeError("disk on fire")


async def test_an_unexpected_error_is_a_json_500_not_text(
    sample_artifacts: Path, serve: ServeApp
) -> None:
    store = ExplodingStore(sample_artifacts / "features")
    settings = Settings(artifacts_dir=sample_artifacts, feature_cache_items=0)
    async with serve(create_app(settings, feature_store=store)) as client:
        rank = await client.post("/rank", json={"query": "red", "candidate_ids": ["1164"]})
        after = await client.get("/healthz")
    assert rank.status_code == 500
    assert rank.headers["content-type"] == "application/json"
    assert rank.json() == {"detail": "internal error: RuntimeError: disk on fire"}
    assert after.status_code == 200


def test_nginx_passes_a_permanent_fault_on_after_one_try(
    sample_artifacts: Path,
    published: tuple[str, list[str]],
    reader_without_item_access: str,
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    _, ids = published
    env = {
        "FUSIONRANK_REDIS_URL": reader_without_item_access,
        "FUSIONRANK_REDIS_PREFIX": redis_prefix,
    }
    with replicas_behind_nginx(tmp_path, sample_artifacts, **env) as fleet:
        response = httpx.post(
            f"{fleet.url}/rank", json={"query": "red", "candidate_ids": ids[:5]}, timeout=30
        )
        tried = [
            count_rank_answers(httpx.get(f"{url}/metrics", timeout=10).text, "500")
            for url in fleet.replica_urls
        ]
    print(
        f"\nFAULT permanent_behind_nginx: status {response.status_code}, tries per replica {tried}"
    )
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert "," not in response.headers["x-upstream"]  # one upstream tried
    assert sum(tried) == 1, tried


def count_rank_answers(metrics: str, status: str) -> int:
    line = f'fusionrank_http_requests_total{{method="POST",route="/rank",status="{status}"}}'
    for row in metrics.splitlines():
        if row.startswith(line):
            return int(float(row.split()[-1]))
    return 0
