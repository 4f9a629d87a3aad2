"""Fixtures for the service tests: a real Redis, isolated key prefixes, both feature stores,
and model artifacts exported from the bundled sample."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import redis
from fastapi import FastAPI

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


REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
ARTIFACTS_CACHE = REPO / ".cache" / "test-artifacts"
EMBEDDINGS_CACHE = REPO / ".cache" / "embeddings"
EXPORT_TIMEOUT_S = 3600


def _artifacts_key() -> str:
    """Changes whenever the exporter, the models or the sample change."""
    digest = hashlib.sha256()
    for folder in ("export", "models"):
        for path in sorted((REPO / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    for path in sorted(SAMPLE.iterdir()):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def sample_artifacts() -> Path:
    """Artifacts exported from the sample by ``python -m export`` (hybrid strategy): models/
    with CURRENT, and the features in the embedded store at features/. Built once per change
    of the exporter, models or sample and kept under .cache/test-artifacts/ (minutes on two
    cores the first time); concurrent sessions wait for one another's build."""
    if not (REPO / "export" / "__main__.py").is_file():
        pytest.skip("the exporter (export/__main__.py) is not in this checkout")
    out = ARTIFACTS_CACHE / _artifacts_key()
    ARTIFACTS_CACHE.mkdir(parents=True, exist_ok=True)
    with (ARTIFACTS_CACHE / f"{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "models" / "CURRENT").is_file():
            _export_sample(out)
    return out


def _export_sample(out: Path) -> None:
    out.mkdir(exist_ok=True)
    cache = out / "cache"  # frozen-encoder embeddings: shared, keyed by catalogue content
    if not cache.exists():
        EMBEDDINGS_CACHE.mkdir(parents=True, exist_ok=True)
        cache.symlink_to(EMBEDDINGS_CACHE, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONRANK_")}
    command = [sys.executable, "-m", "export", "--data", str(SAMPLE), "--out", str(out)]
    command += ["--strategy", "hybrid"]
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S
    )
    if done.returncode != 0 or not (out / "models" / "CURRENT").is_file():
        pytest.fail(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
            f"{done.stderr[-3000:]}"
        )


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
