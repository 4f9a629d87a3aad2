"""Fixtures for the service tests: a real Redis, isolated key prefixes, both feature stores,
and model artifacts exported from the bundled sample."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import redis
from fastapi import FastAPI

from service.features import (
    EmbeddedFeatureStore,
    FeatureStore,
    RedisClusterFeatureStore,
    RedisFeatureStore,
)
from tests.service.redis_cluster import (
    ClusterUnavailable,
    delete_prefix,
    redis_answers,
    redis_cluster,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The local Redis if one answers, else a throwaway redis-server for this session."""
    if redis_answers(DEFAULT_REDIS_URL):
        yield DEFAULT_REDIS_URL
        return
    if shutil.which("redis-server") is None:
        pytest.skip("no Redis on 127.0.0.1:6379 and no redis-server to start")
    port = _free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not redis_answers(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"could not start redis-server on port {port}")
            time.sleep(0.05)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    prefix = f"fusionrank-test:{uuid.uuid4()}"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        redis_client.unlink(*keys)


@pytest.fixture(scope="session")
def redis_cluster_ports() -> Iterator[list[int]]:
    """A 3-master Redis Cluster of this session (redis-server --cluster-enabled on loopback)."""
    try:
        with redis_cluster() as ports:
            yield ports
    except ClusterUnavailable as exc:
        pytest.skip(f"no Redis Cluster: {exc}")


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster_ports: list[int]) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in redis_cluster_ports)


@pytest.fixture
def cluster_prefix(redis_cluster_ports: list[int]) -> Iterator[str]:
    """A key prefix of this test alone on the cluster; its keys are deleted afterwards."""
    prefix = f"fusionrank-test:{uuid.uuid4()}"
    yield prefix
    delete_prefix(redis_cluster_ports, prefix)


@pytest.fixture(params=["redis", "cluster", "embedded"])
def open_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], FeatureStore]]:
    """Opens handles on one empty store of the parametrised backend (a handle per process)."""
    opened: list[FeatureStore] = []
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")

        def open_handle() -> FeatureStore:
            opened.append(RedisFeatureStore.from_url(url, prefix=prefix))
            return opened[-1]
    elif request.param == "cluster":
        url = request.getfixturevalue("redis_cluster_url")
        prefix = request.getfixturevalue("cluster_prefix")

        def open_handle() -> FeatureStore:
            # A short deletion grace keeps the suite quick; fetches rarely take that long, and
            # those that do re-check the pointer.
            store = RedisClusterFeatureStore.from_url(url, prefix=prefix, grace_s=0.05)
            opened.append(store)
            return opened[-1]
    else:

        def open_handle() -> FeatureStore:
            opened.append(EmbeddedFeatureStore(tmp_path / "features"))
            return opened[-1]

    yield open_handle
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[[], FeatureStore]) -> FeatureStore:
    return open_store()


@pytest.fixture
def closed_port() -> int:
    """A local port that nothing listens on."""
    return _free_port()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (``pytest.mark.anyio``) run on asyncio, the service's event loop."""
    return "asyncio"


ServeApp = Callable[[FastAPI], AbstractAsyncContextManager[httpx.AsyncClient]]


@asynccontextmanager
async def _serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        await app.state.runtime.loaded.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fusionrank") as client:
            yield client


@pytest.fixture(scope="session")
def serve() -> ServeApp:
    """``async with serve(app) as client``: runs the app's lifespan, waits until loading ended
    (ready or failed), and yields an httpx client speaking ASGI to it."""
    return _serving


@pytest.fixture
def unstarted_client() -> Callable[[FastAPI], httpx.AsyncClient]:
    """A client for an app whose lifespan has not run (nothing loaded)."""

    def make(app: FastAPI) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fr")

    return make


@pytest.fixture(scope="session", autouse=True)
def _no_fusionrank_environment() -> Iterator[None]:
    """Settings in tests come from the test, not from FUSIONRANK_* variables of the caller
    (``make test`` exports some)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("FUSIONRANK_"):
                patch.delenv(name)
        yield


@pytest.fixture(scope="session")
def sample_version_dir(sample_artifacts: Path) -> Path:
    from service.manifest import resolve_version_dir

    return resolve_version_dir(sample_artifacts / "models")


@pytest.fixture(scope="session")
def sample_redis_store(
    sample_artifacts: Path, sample_version_dir: Path, redis_url: str
) -> Iterator[RedisFeatureStore]:
    """The sample's features published to the real Redis under a prefix of their own (what
    ``python -m export --redis-url`` does, copied from the embedded store)."""
    import json

    from service.manifest import load_manifest

    manifest = load_manifest(sample_version_dir)
    ids = json.loads((sample_version_dir / manifest.index.ids_file).read_bytes())
    batch = EmbeddedFeatureStore(sample_artifacts / "features").fetch(ids)
    assert not batch.missing, "every indexed item has features"
    prefix = f"fusionrank-test:{uuid.uuid4()}"
    store = RedisFeatureStore.from_url(redis_url, prefix=prefix)
    store.publish(ids, batch.matrix, batch.layout, batch.version)
    yield store
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.unlink(*keys)
    client.close()
    store.close()
