"""python -m loadtest.cluster_rank as a user runs it: the sample's features in the real
Redis (published under a prefix of this test's own), a real 3-master Redis Cluster, and the
two stores' /rank answers compared request by request (the command asserts they agree)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.features import RedisFeatureStore
from tests.service.processes import REPO, service_environment
from tests.service.redis_cluster import delete_prefix

pytestmark = pytest.mark.slow


def test_cluster_rank_compares_the_two_stores(
    sample_artifacts: Path,
    sample_redis_store: RedisFeatureStore,
    redis_url: str,
    redis_cluster_url: str,
    redis_cluster_ports: list[int],
) -> None:
    prefix = sample_redis_store._prefix  # where the fixture published the sample's features
    try:
        done = subprocess.run(
            [sys.executable, "-m", "loadtest.cluster_rank", "--cluster-url", redis_cluster_url,
             "--artifacts", str(sample_artifacts), "--redis-url", redis_url,
             "--redis-prefix", prefix, "--requests", "6", "--candidates", "100"],
            cwd=REPO, env=service_environment(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        delete_prefix(redis_cluster_ports, f"{prefix}-bench")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{") :])
    assert result["requests"] == 6 and result["candidates"] == 100
    for part in ("rank", "fetch"):
        assert set(result[part]) == {"single_redis", "redis_cluster"}
        assert all(v["p50_ms"] > 0 for v in result[part].values())
