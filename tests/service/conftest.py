"""Fixtures for the service tests: a real Redis, isolated key prefixes, both feature stores."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from service.features import EmbeddedFeatureStore, FeatureStore, RedisFeatureStore

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The local Redis if one answers, else a throwaway redis-server for this session."""
    if _answers(DEFAULT_REDIS_URL):
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
        while not _answers(url):
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


@pytest.fixture(params=["redis", "embedded"])
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
