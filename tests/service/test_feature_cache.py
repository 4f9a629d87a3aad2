"""The in-process feature cache (service.stages.feature_cache) and the fetch stage in front of
a real Redis: cached and fetched rows agree, a cached request needs no round trip, and what the
cache cannot answer still fails with the store's 503."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.app import create_app
from service.errors import FeatureStoreUnavailable
from service.features import RedisFeatureStore
from service.manifest import Manifest, load_manifest
from service.settings import Settings
from service.stages.feature_cache import FeatureCache
from service.stages.feature_fetch import FeatureFetcher
from tests.service.processes import publish_sample, redis_server


def _indexed(version_dir: Path) -> tuple[Manifest, list[str]]:
    """The sample export's manifest and its indexed product ids."""
    manifest = load_manifest(version_dir)
    return manifest, json.loads((version_dir / manifest.index.ids_file).read_bytes())


def _rows(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float16)[:, None] * np.ones(5, np.float16)


def test_probe_returns_inserted_rows_and_splits_the_rest() -> None:
    cache = FeatureCache(capacity=10, dims=5)
    cache.insert(["a", "b", "c"], _rows(3))
    probe = cache.probe(["x", "c", "a", "y"])
    assert probe.hit_positions.tolist() == [1, 2]
    assert probe.rows[:, 0].tolist() == [2.0, 0.0]  # c's row, then a's
    assert probe.miss_positions.tolist() == [0, 3]


def test_a_full_cache_overwrites_its_oldest_rows() -> None:
    cache = FeatureCache(capacity=3, dims=5)
    cache.insert(["a", "b", "c"], _rows(3))
    cache.insert(["d"], _rows(1, start=7))
    probe = cache.probe(["a", "b", "c", "d"])
    assert probe.miss_positions.tolist() == [0]  # a was the oldest
    assert probe.rows[:, 0].tolist() == [1.0, 2.0, 7.0]
    assert len(cache) == 3


def test_inserting_more_rows_than_slots_keeps_the_last_ones() -> None:
    cache = FeatureCache(capacity=2, dims=5)
    cache.insert(["a", "b", "c", "d", "e"], _rows(5))
    probe = cache.probe(["a", "b", "c", "d", "e"])
    assert probe.hit_positions.tolist() == [3, 4]
    assert probe.rows[:, 0].tolist() == [3.0, 4.0]


def test_an_id_already_cached_keeps_its_row() -> None:
    cache = FeatureCache(capacity=4, dims=5)
    cache.insert(["a"], _rows(1, start=1))
    cache.insert(["a", "b"], _rows(2, start=5))
    assert cache.probe(["a", "b"]).rows[:, 0].tolist() == [1.0, 6.0]
    assert len(cache) == 2


@pytest.mark.slow
def test_fetch_through_the_cache_equals_the_store_and_survives_redis_going_away(
    sample_artifacts: Path, sample_version_dir: Path
) -> None:
    manifest, ids = _indexed(sample_version_dir)
    with redis_server() as redis:
        version = publish_sample(sample_artifacts, sample_version_dir, redis.url)
        store = RedisFeatureStore.from_url(redis.url, timeout_s=0.5)
        plain = FeatureFetcher(store, manifest.layout, version)
        cached = FeatureFetcher(store, manifest.layout, version, cache_items=1000)

        first = ids[:300]
        assert not cached.probe(first).complete  # nothing cached yet
        cached.fetch(first)
        # Cached, fetched and unknown ids mixed, in an order unlike either fetch.
        mixed = [*ids[250:400], "no-such-id", *ids[::-7][:50], *ids[:50]]
        want, got = plain.fetch(mixed), cached.fetch(mixed)
        assert got.found.tolist() == want.found.tolist()
        assert got.missing == want.missing == ["no-such-id"]
        np.testing.assert_array_equal(got.matrix, want.matrix)

        probe = cached.probe(first)
        assert probe.complete
        again = cached.fetch(first, probe)
        np.testing.assert_array_equal(again.matrix, plain.fetch(first).matrix)

        redis.stop()
        probe = cached.probe(first)
        after = cached.fetch(first, probe)  # answered in-process: Redis is not asked
        assert probe.complete and after.found.tolist() == list(range(300))
        with pytest.raises(FeatureStoreUnavailable):
            cached.fetch(ids[-5:])  # never fetched, so the store must answer
        store.close()


@pytest.mark.slow
def test_warming_loads_the_first_ids_that_fit(
    sample_artifacts: Path, sample_version_dir: Path
) -> None:
    manifest, ids = _indexed(sample_version_dir)
    with redis_server() as redis:
        version = publish_sample(sample_artifacts, sample_version_dir, redis.url)
        store = RedisFeatureStore.from_url(redis.url, timeout_s=0.5)
        fetcher = FeatureFetcher(store, manifest.layout, version, cache_items=700)
        assert fetcher.warm([*ids[:300], "no-such-id", *ids[300:]], chunk=128) == 699
        want = FeatureFetcher(store, manifest.layout, version).fetch(ids[:699])
        redis.stop()
        probe = fetcher.probe(ids[:699])
        assert probe.complete
        np.testing.assert_array_equal(fetcher.fetch(ids[:699], probe).matrix, want.matrix)
        assert not fetcher.probe(ids[699:701]).complete
        store.close()


@pytest.mark.slow
@pytest.mark.anyio
async def test_ranking_from_the_cache_equals_ranking_from_redis(
    sample_artifacts: Path, sample_version_dir: Path, serve
) -> None:
    manifest, ids = _indexed(sample_version_dir)
    body = {"query": "navy blue jeans for men", "candidate_ids": ids[:400], "top_k": 20}
    with redis_server() as redis:
        publish_sample(sample_artifacts, sample_version_dir, redis.url)
        store = RedisFeatureStore.from_url(redis.url, timeout_s=0.5)
        uncached = create_app(
            Settings(artifacts_dir=sample_artifacts, feature_cache_items=0), feature_store=store
        )
        async with serve(uncached) as client:
            from_redis = await client.post("/rank", json=body)
        # Warmed at start-up with the first 1,000 indexed items, which include the body's.
        settings = Settings(artifacts_dir=sample_artifacts, feature_cache_items=1000)
        async with serve(create_app(settings, feature_store=store)) as client:
            first = await client.post("/rank", json=body)
            redis.stop()
            cached = await client.post("/rank", json=body)
            other = await client.post("/rank", json={**body, "candidate_ids": ids[-10:]})
            metrics = (await client.get("/metrics")).text
        store.close()
    assert from_redis.status_code == first.status_code == cached.status_code == 200
    assert cached.json() == first.json() == from_redis.json()
    assert other.status_code == 503
    assert other.json()["detail"].startswith("redis feature store unavailable")
    assert "fusionrank_feature_cache_hits_total 800.0" in metrics
    assert "fusionrank_feature_cache_misses_total 10.0" in metrics
