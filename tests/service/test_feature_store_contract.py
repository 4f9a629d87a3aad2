"""Contract suite run against every FeatureStore backend (real Redis, a real 3-master Redis
Cluster and embedded; no mocks): versions side by side, read by name, retired by Retention.

Values are stored as float16, so fetched rows equal the float16-cast source exactly; against the
float32 source they are within float16 rounding (relative error <= 2**-11).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis

from service.errors import (
    FeatureStoreFault,
    FeatureStoreUnavailable,
    FeatureVersionMissing,
    NoPublishedVersion,
)
from service.features import (
    EmbeddedFeatureStore,
    FeatureLayout,
    FeatureStore,
    RedisFeatureStore,
    Retention,
    open_feature_store,
)

LAYOUT = FeatureLayout(text_dims=12, image_dims=4)
ONLY_CURRENT = Retention(keep=1, grace_s=0)  # retire everything but the current version


def catalogue(start: int, stop: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    ids = [f"item-{i:06d}" for i in range(start, stop)]
    rng = np.random.default_rng(seed)
    return ids, rng.standard_normal((len(ids), LAYOUT.dims)).astype(np.float32)


def constant_catalogue(n: int, value: float) -> tuple[list[str], np.ndarray]:
    return [f"item-{i:06d}" for i in range(n)], np.full((n, LAYOUT.dims), value, np.float32)


class PublisherKilled(Exception):
    pass


def kill_after_first_batch(items_written: int) -> None:
    raise PublisherKilled(items_written)


def test_fetch_returns_published_rows_in_request_order(store: FeatureStore) -> None:
    ids, matrix = catalogue(0, 300)
    report = store.publish(ids, matrix, LAYOUT, "v1", batch_size=64)
    assert (report.version, report.items, report.removed_versions) == ("v1", 300, [])

    wanted_rows = [250, 3, 3, 17, 299, 0]  # any order, repeats allowed
    requested = ["nope-a", ids[250], ids[3], ids[3], "nope-b", ids[17], ids[299], ids[0], "nope-c"]
    batch = store.fetch(requested)

    assert batch.version == "v1"
    assert batch.layout == LAYOUT == store.layout()
    assert batch.found.dtype == np.int64
    assert batch.found.tolist() == [1, 2, 3, 5, 6, 7]
    assert batch.missing == ["nope-a", "nope-b", "nope-c"]
    assert batch.matrix.dtype == np.float16
    assert batch.matrix.shape == (6, LAYOUT.dims)
    np.testing.assert_array_equal(batch.matrix, matrix.astype(np.float16)[wanted_rows])
    np.testing.assert_allclose(batch.matrix, matrix[wanted_rows], rtol=2**-11, atol=0)


def test_fetch_of_no_ids_or_only_unknown_ids(store: FeatureStore) -> None:
    store.publish(*catalogue(0, 10), LAYOUT, "v1")
    for requested in ([], ["unknown"]):
        batch = store.fetch(requested)
        assert batch.matrix.shape == (0, LAYOUT.dims)
        assert batch.found.tolist() == []
        assert batch.missing == requested


def test_publish_keeps_the_previous_version_readable_beside_the_new_one(
    store: FeatureStore,
) -> None:
    old_ids, old_matrix = catalogue(0, 300, seed=1)
    store.publish(old_ids, old_matrix, LAYOUT, "v1")
    new_ids, new_matrix = catalogue(100, 400, seed=2)  # items 0..99 left the catalogue
    report = store.publish(new_ids, new_matrix, LAYOUT, "v2", batch_size=64)

    assert (report.items, report.removed_versions) == (300, [])
    assert store.current_version() == "v2"
    assert store.versions() == ["v1", "v2"]
    # A replica still on the old model reads the old version, whatever the pointer says.
    old = store.fetch(old_ids, "v1")
    assert old.version == "v1" and not old.missing
    np.testing.assert_array_equal(old.matrix, old_matrix.astype(np.float16))
    assert store.layout("v1") == LAYOUT
    new = store.fetch(new_ids)  # no version named: the current one
    assert new.version == "v2" and not new.missing
    np.testing.assert_array_equal(new.matrix, new_matrix.astype(np.float16))
    dropped = store.fetch([f"item-{i:06d}" for i in range(100)], "v2")
    assert dropped.found.size == 0 and len(dropped.missing) == 100


def test_retention_keeps_the_newest_and_the_recently_superseded(store: FeatureStore) -> None:
    ids, matrix = catalogue(0, 20)
    for version in ("v1", "v2", "v3"):
        store.publish(ids, matrix, LAYOUT, version, retention=Retention(keep=1, grace_s=60))
    # v1 and v2 were superseded moments ago: within the grace, so replicas may still use them.
    assert store.versions() == ["v1", "v2", "v3"]

    assert store.retire(Retention(keep=2, grace_s=0)) == ["v1"]
    assert store.versions() == ["v2", "v3"]
    with pytest.raises(FeatureVersionMissing, match="v1"):
        store.fetch(ids, "v1")
    with pytest.raises(FeatureVersionMissing, match="v1"):
        store.layout("v1")

    assert store.retire(ONLY_CURRENT) == ["v2"]
    assert store.retire(ONLY_CURRENT) == []
    assert store.versions() == ["v3"] and store.current_version() == "v3"
    assert not store.fetch(ids, "v3").missing


def test_publishing_a_stored_version_again_moves_the_pointer_back(store: FeatureStore) -> None:
    ids, matrix = catalogue(0, 30)
    store.publish(ids, matrix, LAYOUT, "v1")
    store.publish(ids, matrix + 1, LAYOUT, "v2")
    rollback = store.publish(ids, matrix + 5, LAYOUT, "v1", retention=ONLY_CURRENT)

    assert (rollback.items, rollback.removed_versions) == (0, ["v2"])  # nothing rewritten
    assert store.current_version() == "v1" and store.versions() == ["v1"]
    np.testing.assert_array_equal(store.fetch(ids).matrix, matrix.astype(np.float16))


def test_republishing_the_current_version_is_a_noop(store: FeatureStore) -> None:
    ids, matrix = catalogue(0, 50)
    store.publish(ids, matrix, LAYOUT, "v1")
    report = store.publish(ids, matrix + 1, LAYOUT, "v1")

    assert (report.version, report.items, report.removed_versions) == ("v1", 0, [])
    np.testing.assert_array_equal(store.fetch(ids).matrix, matrix.astype(np.float16))


def test_nothing_published_yet(store: FeatureStore) -> None:
    assert store.current_version() is None
    assert store.versions() == []
    with pytest.raises(NoPublishedVersion):
        store.fetch(["item-000001"])
    with pytest.raises(NoPublishedVersion):
        store.layout()
    with pytest.raises(FeatureVersionMissing):
        store.fetch(["item-000001"], "v1")
    with pytest.raises(FeatureVersionMissing):
        store.layout("v1")
    assert store.retire(ONLY_CURRENT) == []


def test_publish_rejects_ambiguous_input(store: FeatureStore) -> None:
    ids, matrix = catalogue(0, 4)
    with pytest.raises(ValueError, match="version"):
        store.publish(ids, matrix, LAYOUT, "bad:name")
    with pytest.raises(ValueError, match="shape"):
        store.publish(ids[:3], matrix, LAYOUT, "v1")
    with pytest.raises(ValueError, match="duplicates"):
        store.publish([ids[0]] * 4, matrix, LAYOUT, "v1")
    assert store.versions() == []


def test_concurrent_reader_only_sees_whole_versions(
    open_store: Callable[[], FeatureStore],
) -> None:
    reader, publisher = open_store(), open_store()  # two handles, as two processes would have
    publisher.publish(*constant_catalogue(20_000, 1.0), LAYOUT, "v1")
    failures: list[BaseException] = []

    def republish() -> None:
        try:
            publisher.publish(*constant_catalogue(20_000, 2.0), LAYOUT, "v2", batch_size=500)
        except BaseException as exc:  # surfaced in the main thread
            failures.append(exc)

    thread = threading.Thread(target=republish)
    rng = np.random.default_rng(0)
    seen = {"v1": 0, "v2": 0}
    thread.start()
    while thread.is_alive() or seen["v2"] == 0:
        requested = [f"item-{i:06d}" for i in rng.choice(20_000, size=500, replace=False)]
        batch = reader.fetch(requested)
        expected = {"v1": 1.0, "v2": 2.0}[batch.version]
        assert batch.missing == [] and batch.found.size == 500, batch.version
        assert (batch.matrix == expected).all(), batch.version
        seen[batch.version] += 1
        assert not failures, failures
    thread.join()

    assert not failures, failures
    assert seen["v1"] > 0 and seen["v2"] > 0, seen
    assert reader.versions() == ["v1", "v2"]


def test_a_version_being_retired_reads_whole_or_missing_never_partial(
    open_store: Callable[[], FeatureStore],
) -> None:
    reader, publisher = open_store(), open_store()
    publisher.publish(*constant_catalogue(20_000, 1.0), LAYOUT, "v1")
    failures: list[BaseException] = []

    def replace_and_retire() -> None:
        try:
            publisher.publish(
                *constant_catalogue(20_000, 2.0), LAYOUT, "v2", retention=ONLY_CURRENT
            )
        except BaseException as exc:  # surfaced in the main thread
            failures.append(exc)

    thread = threading.Thread(target=replace_and_retire)
    rng = np.random.default_rng(1)
    whole = 0
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        requested = [f"item-{i:06d}" for i in rng.choice(20_000, size=500, replace=False)]
        try:
            batch = reader.fetch(requested, "v1")  # a replica still on the old model
        except FeatureVersionMissing:
            break
        assert batch.missing == [] and (batch.matrix == 1.0).all()
        whole += 1
    thread.join()

    assert not failures, failures
    assert whole > 0
    with pytest.raises(FeatureVersionMissing):
        reader.fetch(["item-000001"], "v1")
    assert reader.versions() == ["v2"]


def test_killed_publisher_leaves_readers_on_the_old_version(store: FeatureStore) -> None:
    ids, matrix = catalogue(0, 200, seed=1)
    store.publish(ids, matrix, LAYOUT, "v1")
    with pytest.raises(PublisherKilled):
        store._write_version(  # type: ignore[attr-defined]
            *catalogue(0, 200, seed=2), LAYOUT, "v2", batch_size=50, progress=kill_after_first_batch
        )

    assert store.current_version() == "v1"
    assert store.versions() == ["v1", "v2"]  # the partial version is stored but not readable
    batch = store.fetch(ids)
    assert batch.version == "v1"
    np.testing.assert_array_equal(batch.matrix, matrix.astype(np.float16))

    report = store.publish(*catalogue(0, 200, seed=3), LAYOUT, "v3")
    assert report.removed_versions == ["v2"]  # never published; v1 is kept for its readers
    assert store.versions() == ["v1", "v3"]
    assert store.retire(ONLY_CURRENT) == ["v1"]
    assert store.versions() == ["v3"]


def test_publish_after_a_killed_publish_of_the_same_version(store: FeatureStore) -> None:
    store.publish(*catalogue(0, 100), LAYOUT, "v1")
    old_ids, old_matrix = catalogue(0, 100, seed=2)
    with pytest.raises(PublisherKilled):
        store._write_version(  # type: ignore[attr-defined]
            old_ids, old_matrix, LAYOUT, "v2", batch_size=50, progress=kill_after_first_batch
        )
    new_ids, new_matrix = catalogue(500, 600, seed=3)  # disjoint ids: leftovers would show
    report = store.publish(new_ids, new_matrix, LAYOUT, "v2", retention=ONLY_CURRENT)

    assert report.removed_versions == ["v1"]
    assert store.versions() == ["v2"]
    assert store.fetch(old_ids).found.size == 0
    np.testing.assert_array_equal(store.fetch(new_ids).matrix, new_matrix.astype(np.float16))


# -- Redis only ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda value: b"XX" + value[2:], "bad magic"),
        (lambda value: value + b"\x00\x00", "wrong length"),
    ],
    ids=["bad-magic", "wrong-length"],
)
def test_redis_unreadable_value_is_reported_missing_and_the_rest_read(
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
    corrupt: Callable[[bytes], bytes],
    reason: str,
) -> None:
    store = RedisFeatureStore.from_url(redis_url, prefix=redis_prefix)
    ids, matrix = catalogue(0, 20)
    store.publish(ids, matrix, LAYOUT, "v1")
    key = f"{redis_prefix}:v:v1:i:item-000007"
    redis_client.set(key, corrupt(redis_client.get(key)))

    batch = store.fetch(["unknown", *ids])
    assert batch.corrupt == ["item-000007"]
    assert batch.missing == ["unknown", "item-000007"]
    assert batch.found.tolist() == [p for p in range(1, 21) if p != 8]
    expected = np.delete(matrix, 7, axis=0).astype(np.float16)
    np.testing.assert_array_equal(batch.matrix, expected)
    store.close()


def test_redis_user_without_read_permission_is_a_fault_not_unavailable(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """An ACL user that may not read the keys: Redis answers NOPERM, which retrying does not
    mend, so the store raises FeatureStoreFault (the service answers 500, not 503)."""
    publisher = RedisFeatureStore.from_url(redis_url, prefix=redis_prefix)
    ids, matrix = catalogue(0, 5)
    publisher.publish(ids, matrix, LAYOUT, "v1")
    user, password = f"fusionrank-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    redis_client.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], commands=["+@all"], keys=["~elsewhere:*"]
    )
    host_url = redis_url.split("://", 1)[1]
    reader = RedisFeatureStore.from_url(
        f"redis://{user}:{password}@{host_url}", prefix=redis_prefix
    )
    try:
        reader.ping()  # the user can connect
        with pytest.raises(FeatureStoreFault, match="(?i)permission"):
            reader.fetch(ids, "v1")
    finally:
        reader.close()
        publisher.close()
        redis_client.acl_deluser(user)


def test_redis_unreachable_raises_unavailable_within_the_timeout(closed_port: int) -> None:
    store = RedisFeatureStore.from_url(f"redis://127.0.0.1:{closed_port}", timeout_s=0.2)
    ids, matrix = catalogue(0, 5)
    calls = [store.ping, lambda: store.fetch(ids), lambda: store.publish(ids, matrix, LAYOUT, "v")]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(FeatureStoreUnavailable) as raised:
            call()
        assert time.monotonic() - started < 2
        assert isinstance(raised.value.__cause__, redis.exceptions.ConnectionError)
    store.close()


def test_open_feature_store_picks_the_backend(redis_url: str, tmp_path: Path) -> None:
    with_url = open_feature_store(redis_url, tmp_path, prefix="fusionrank-test:unused")
    without = open_feature_store(None, tmp_path)
    assert isinstance(with_url, RedisFeatureStore) and isinstance(with_url, FeatureStore)
    assert isinstance(without, EmbeddedFeatureStore) and isinstance(without, FeatureStore)
    with_url.ping()
    without.ping()
    with_url.close()
