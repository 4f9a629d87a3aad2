"""The Redis Cluster feature store on a real 3-master cluster (redis-server on loopback):
what the shared contract suite cannot see: how items spread, the round trips of one fetch,
the version argument of cluster_store.py's docstring, redirections, and /rank on the cluster.

The contract suite (test_feature_store_contract.py) runs against the same cluster.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi import FastAPI

from service.app import create_app
from service.errors import FeatureStoreUnavailable, FeatureVersionMissing
from service.features import (
    EmbeddedFeatureStore,
    FeatureLayout,
    FeatureStore,
    RedisClusterFeatureStore,
    Retention,
    open_feature_store,
)
from service.features.cluster_store import bucket_tags, parse_cluster_url
from service.settings import Settings
from tests.service.conftest import ServeApp
from tests.service.redis_cluster import delete_prefix

LAYOUT = FeatureLayout(text_dims=12, image_dims=4)
ONLY_CURRENT = Retention(keep=1, grace_s=0)


def catalogue(n: int, value: float | None = None) -> tuple[list[str], np.ndarray]:
    ids = [f"item-{i:06d}" for i in range(n)]
    if value is not None:
        return ids, np.full((n, LAYOUT.dims), value, np.float32)
    return ids, np.random.default_rng(0).standard_normal((n, LAYOUT.dims)).astype(np.float32)


@pytest.fixture
def open_cluster_store(
    redis_cluster_url: str, cluster_prefix: str
) -> Iterator[type[RedisClusterFeatureStore]]:
    opened: list[RedisClusterFeatureStore] = []

    def open_handle(**options: object) -> RedisClusterFeatureStore:
        options.setdefault("grace_s", 0.05)
        opened.append(
            RedisClusterFeatureStore.from_url(redis_cluster_url, prefix=cluster_prefix, **options)
        )
        return opened[-1]

    yield open_handle  # type: ignore[misc]
    for store in opened:
        store.close()


def master_clients(ports: list[int]) -> list[redis.Redis]:
    return [redis.Redis(port=port) for port in ports]


def command_calls(clients: list[redis.Redis], command: str) -> list[int]:
    stats = [client.info("commandstats").get(f"cmdstat_{command}", {}) for client in clients]
    return [int(stat.get("calls", 0)) for stat in stats]


def test_items_spread_evenly_over_the_masters(
    open_cluster_store, redis_cluster_ports: list[int], cluster_prefix: str
) -> None:
    store = open_cluster_store()
    store.publish(*catalogue(6000), LAYOUT, "v1")
    per_master = []
    for client in master_clients(redis_cluster_ports):
        keys = client.scan_iter(match=f"{cluster_prefix}:v:v1:i:*", count=1000)
        per_master.append(sum(1 for _ in keys))
        client.close()
    assert sum(per_master) == 6000
    assert min(per_master) > 0.8 * 6000 / 3, per_master  # 64 buckets, 21 or 22 per master


def test_bucket_tags_cover_the_slot_range_evenly() -> None:
    from redis.crc import key_slot

    tags = bucket_tags("fusionrank", 64)
    slots = [key_slot(tag.encode()) for tag in tags]
    assert [slot * 64 // 16384 for slot in slots] == list(range(64))
    assert bucket_tags("fusionrank", 64) == tags  # deterministic: readers never recompute


def test_a_fetch_is_one_round_trip_per_master(
    open_cluster_store, redis_cluster_ports: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, matrix = catalogue(3000)
    store = open_cluster_store(grace_s=5)
    store.publish(ids, matrix, LAYOUT, "v1")
    store.fetch(ids[:5], "v1")  # learns the version's meta and buckets
    clients = master_clients(redis_cluster_ports)
    for client in clients:
        client.config_resetstat()

    sends: list[tuple[str, int]] = []
    connection_class = redis.connection.Connection
    original = connection_class.send_packed_command

    def counting(self, command, check_health=True):  # type: ignore[no-untyped-def]
        sends.append((self.host, self.port))
        return original(self, command, check_health)

    monkeypatch.setattr(connection_class, "send_packed_command", counting)
    requested = ids[1000:2000]
    batch = store.fetch(requested, "v1")  # as the service does: its model's version
    monkeypatch.undo()

    np.testing.assert_array_equal(batch.matrix, matrix[1000:2000].astype(np.float16))
    assert sorted(port for _, port in sends) == sorted(redis_cluster_ports)  # one write each
    mgets = command_calls(clients, "mget")
    assert all(calls > 0 for calls in mgets), mgets
    assert sum(mgets) == 64  # one MGET per bucket: 1,000 ids touch all 64 buckets
    assert sum(command_calls(clients, "get")) == 1  # the meta, in the same round trip
    for client in clients:
        client.close()


def test_a_round_trip_longer_than_the_grace_rereads_the_meta(
    open_cluster_store, redis_cluster_ports: list[int]
) -> None:
    ids, matrix = catalogue(500)
    store = open_cluster_store(grace_s=0)  # every round trip counts as a stall
    store.publish(ids, matrix, LAYOUT, "v1")
    store.fetch(ids[:5], "v1")
    clients = master_clients(redis_cluster_ports)
    for client in clients:
        client.config_resetstat()
    store.fetch(ids, "v1")
    assert sum(command_calls(clients, "get")) == 2  # in the round trip, and after it
    for client in clients:
        client.close()


def stall_once(monkeypatch: pytest.MonkeyPatch, during_stall: Callable[[], object]) -> list:
    """Make the next fetch round trip call ``during_stall`` after its replies came back (as
    if the reader stalled there); returns what it returned, once called."""
    original = RedisClusterFeatureStore._round_trip
    done: list = []

    def round_trip_then(self, client, plan):  # type: ignore[no-untyped-def]
        replies = original(self, client, plan)
        if not done:
            done.append(during_stall())
        return replies

    monkeypatch.setattr(RedisClusterFeatureStore, "_round_trip", round_trip_then)
    return done


def test_a_version_retired_during_a_stalled_round_trip_is_missing_not_partial(
    open_cluster_store, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, publisher = open_cluster_store(grace_s=0), open_cluster_store(grace_s=0)
    ids, ones = catalogue(2000, 1.0)
    publisher.publish(ids, ones, LAYOUT, "v1")
    assert reader.fetch(ids[:3], "v1").version == "v1"
    retired = stall_once(
        monkeypatch, lambda: publisher.publish(ids, ones + 1, LAYOUT, "v2", retention=ONLY_CURRENT)
    )

    with pytest.raises(FeatureVersionMissing, match="v1"):
        reader.fetch(ids, "v1")
    assert retired and retired[0].removed_versions == ["v1"]
    assert (reader.fetch(ids, "v2").matrix == 2.0).all()


def test_a_version_written_again_during_a_stalled_round_trip_is_read_again(
    open_cluster_store, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, publisher = open_cluster_store(grace_s=0), open_cluster_store(grace_s=0)
    ids, ones = catalogue(2000, 1.0)
    publisher.publish(ids, ones, LAYOUT, "v1")
    assert reader.fetch(ids[:3], "v1").version == "v1"

    def retire_and_write_again() -> None:
        publisher.publish(ids, ones + 1, LAYOUT, "v2", retention=ONLY_CURRENT)
        publisher.publish(ids, ones, LAYOUT, "v1")  # same name, same content, a new write

    stall_once(monkeypatch, retire_and_write_again)
    batch = reader.fetch(ids, "v1")

    assert batch.version == "v1" and (batch.matrix == 1.0).all() and not batch.missing


def test_retiring_waits_out_the_grace_its_meta_promised(open_cluster_store) -> None:
    ids, matrix = catalogue(50)
    seconds = []
    for version, grace_s in (("v1", 1.0), ("v2", 0), ("v3", 5)):
        started = time.monotonic()
        open_cluster_store(grace_s=grace_s).publish(
            ids, matrix, LAYOUT, version, retention=ONLY_CURRENT
        )
        seconds.append(time.monotonic() - started)
    assert seconds[0] < 1.0  # nothing to retire: no reader to wait for
    assert seconds[1] >= 1.0  # readers of v1 were promised 1 s
    assert seconds[2] < 1.0  # readers of v2 were promised nothing: they re-check


def test_a_stale_slot_map_is_refreshed_and_the_fetch_succeeds(open_cluster_store) -> None:
    ids, matrix = catalogue(1000)
    store = open_cluster_store()
    store.publish(ids, matrix, LAYOUT, "v1")
    store.fetch(ids[:3])
    manager = store._client().nodes_manager
    nodes = {nodes[0].name: nodes[0] for nodes in manager.slots_cache.values()}
    names = sorted(nodes)
    # As after resharding: every slot believed to live on the next master over (MOVED).
    for slot, owners in manager.slots_cache.items():
        manager.slots_cache[slot] = [nodes[names[(names.index(owners[0].name) + 1) % 3]]]

    batch = store.fetch(ids)
    np.testing.assert_array_equal(batch.matrix, matrix.astype(np.float16))
    assert store.fetch(ids[:10]).found.size == 10


def test_unreachable_cluster_raises_unavailable_within_the_timeout(closed_port: int) -> None:
    url = f"redis+cluster://127.0.0.1:{closed_port}"
    store = open_feature_store(url, Path("unused"), timeout_s=0.2)  # opening connects nothing
    assert isinstance(store, RedisClusterFeatureStore) and isinstance(store, FeatureStore)
    ids, matrix = catalogue(5)
    calls = [store.ping, lambda: store.fetch(ids), lambda: store.publish(ids, matrix, LAYOUT, "v")]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(FeatureStoreUnavailable):
            call()
        assert time.monotonic() - started < 2
    store.close()


def test_cluster_urls_and_prefixes() -> None:
    assert parse_cluster_url("redis+cluster://a:7000,b:7001") == (
        [("a", 7000), ("b", 7001)],
        None,
        None,
    )
    assert parse_cluster_url("redis+cluster://u:p%40ss@[::1]:7000") == (
        [("::1", 7000)],
        "u",
        "p@ss",
    )
    with pytest.raises(ValueError, match="host:port"):
        parse_cluster_url("redis+cluster://a")
    with pytest.raises(ValueError, match="braces"):
        RedisClusterFeatureStore.from_url("redis+cluster://a:1", prefix="fr{x}")


def test_open_feature_store_picks_the_cluster(redis_cluster_url: str, cluster_prefix: str) -> None:
    store = open_feature_store(redis_cluster_url, Path("unused"), prefix=cluster_prefix)
    assert isinstance(store, RedisClusterFeatureStore)
    store.ping()
    store.close()


# -- /rank on the cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_cluster_store(
    sample_artifacts: Path, sample_version_dir: Path, redis_cluster_url: str, redis_cluster_ports
) -> Iterator[RedisClusterFeatureStore]:
    """The sample's features published to the cluster (as ``python -m export --redis-url
    redis+cluster://...`` would), copied from the embedded store."""
    from service.manifest import load_manifest

    manifest = load_manifest(sample_version_dir)
    ids = json.loads((sample_version_dir / manifest.index.ids_file).read_bytes())
    batch = EmbeddedFeatureStore(sample_artifacts / "features").fetch(ids)
    prefix = "fusionrank-test:rank"
    delete_prefix(redis_cluster_ports, prefix)
    store = RedisClusterFeatureStore.from_url(redis_cluster_url, prefix=prefix)
    store.publish(ids, batch.matrix, batch.layout, batch.version)
    yield store
    store.close()
    delete_prefix(redis_cluster_ports, prefix)


@pytest.mark.slow
@pytest.mark.anyio
async def test_rank_on_the_cluster_answers_as_on_the_embedded_store(
    serve: ServeApp,
    sample_artifacts: Path,
    sample_version_dir: Path,
    sample_cluster_store: RedisClusterFeatureStore,
) -> None:
    ids = json.loads((sample_version_dir / "index_ids.json").read_bytes())
    bodies = [
        {"query": "red tshirt for men", "candidate_ids": ids[::3][:1000], "top_k": 50},
        {"query": "black watch", "candidate_ids": ["missing-id", *ids[5:400]], "explain": True},
        {"query": "women heels", "retrieve_k": 300, "top_k": 20},
    ]
    answers: dict[str, list[dict]] = {}
    stores: dict[str, FeatureStore] = {
        "embedded": EmbeddedFeatureStore(sample_artifacts / "features"),
        "cluster": sample_cluster_store,
    }
    for name, store in stores.items():
        app: FastAPI = create_app(Settings(artifacts_dir=sample_artifacts), feature_store=store)
        async with serve(app) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            responses = [await client.post("/rank", json=body) for body in bodies]
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        answers[name] = [r.json() for r in responses]
    assert answers["cluster"] == answers["embedded"]
    assert answers["cluster"][1]["missing_ids"] == ["missing-id"]
