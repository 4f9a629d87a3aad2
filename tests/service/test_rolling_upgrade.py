"""A rolling upgrade of a fleet, with real processes: two replicas following the published
pointer (FUSIONRANK_FOLLOW_PUBLISHED) behind the real nginx, under open-loop load, while
``python -m export`` publishes a model with other weights (another strategy, so other item
features) into the same Redis prefix. Every answer must be a 200 from the old or the new
model; the replicas switch on their own; after the retention grace ``python -m export
--retire-only`` removes the old features from Redis.

The replicas run without the in-process feature cache, so every request reads Redis: the old
model's replica must keep finding its own (old) features while the new ones are published.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.fleet import replicas_behind_nginx
from tests.service.processes import (
    REPO,
    PacedLoad,
    redis_server,
    report,
    service_environment,
    summary,
)

pytestmark = pytest.mark.slow

SAMPLE = REPO / "data" / "sample"
PREFIX = "fusionrank-rollout-test"
RATE = 50  # requests per second, open loop, through nginx
GRACE_S = 20  # the publisher keeps the superseded version this long (retention grace)
EXPORT_TIMEOUT_S = 1800


def export(artifacts: Path, *args: str) -> str:
    """``python -m export --data data/sample --out artifacts ARGS`` as a user runs it."""
    command = [sys.executable, "-m", "export", "--data", str(SAMPLE), "--out", str(artifacts)]
    done = subprocess.run(
        [*command, *args],
        cwd=REPO,
        env=service_environment(),
        capture_output=True,
        text=True,
        timeout=EXPORT_TIMEOUT_S,
    )
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def served_version(url: str) -> str | None:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).json().get("model_version")
    except (httpx.HTTPError, json.JSONDecodeError):
        return None


def test_replicas_follow_a_published_model_one_by_one_without_a_failed_answer(
    sample_artifacts: Path, tmp_path: Path
) -> None:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for name in ("models", "checkpoints", "items"):
        if (sample_artifacts / name).exists():
            shutil.copytree(sample_artifacts / name, artifacts / name, symlinks=True)
    os.symlink((sample_artifacts / "cache").resolve(), artifacts / "cache")
    old = (artifacts / "models" / "CURRENT").read_text().strip()
    # The new model: another strategy, trained and exported now (embedded store), then the
    # old one made current again, as before a release.
    export(artifacts, "--strategy", "late")
    new = (artifacts / "models" / "CURRENT").read_text().strip()
    assert new != old
    old_features = json.loads((artifacts / "models" / old / "manifest.json").read_text())[
        "features_version"
    ]

    with redis_server() as redis:
        store_args = ["--redis-url", redis.url, "--redis-prefix", PREFIX]
        export(artifacts, "--strategy", "hybrid", *store_args)  # the old model, published
        assert (artifacts / "models" / "CURRENT").read_text().strip() == old
        env = {
            "FUSIONRANK_REDIS_URL": redis.url,
            "FUSIONRANK_REDIS_PREFIX": PREFIX,
            "FUSIONRANK_FOLLOW_PUBLISHED": "true",
            "FUSIONRANK_FOLLOW_INTERVAL_S": "2",
            "FUSIONRANK_FEATURE_CACHE_ITEMS": "0",  # every request reads Redis
            # Two replicas, nginx, Redis, the exporter and the load share two cores here: the
            # bounds are raised so that CPU contention is not what this test measures.
            "FUSIONRANK_REQUEST_TIMEOUT_S": "10",
            "FUSIONRANK_MAX_IN_FLIGHT": "512",
        }
        bodies = [
            {"query": "red tshirt for men", "top_k": 5},
            {"query": "black watch", "retrieve_k": 100, "top_k": 10},
            {"query": "women heels", "candidate_ids": [str(n) for n in range(1500, 1700)]},
        ]
        with replicas_behind_nginx(tmp_path, artifacts, **env) as fleet:
            assert [served_version(url) for url in fleet.replica_urls] == [old, old]
            switched: dict[str, float] = {}
            with PacedLoad(fleet.url, RATE, bodies, duration_s=55) as load:
                time.sleep(5)  # the old model serves
                published_at = time.monotonic()
                export(artifacts, "--strategy", "late", *store_args, "--keep-versions", "1",
                       "--retention-grace-s", str(GRACE_S))  # fmt: skip
                published = time.monotonic()
                while len(switched) < len(fleet.replica_urls):
                    assert time.monotonic() - published < 30, f"switched only {switched}"
                    for url in fleet.replica_urls:
                        if url not in switched and served_version(url) == new:
                            switched[url] = round(time.monotonic() - published, 2)
                    time.sleep(0.1)
                time.sleep(5)  # the new model serves the rest of the run
                outcomes = load.stop()

            keys_before = redis_keys(redis.url, f"{PREFIX}:v:{old_features}:*")
            # The grace counts from the new version's publish time, recorded as export ended.
            time.sleep(max(0.0, published + GRACE_S + 1 - time.monotonic()))
            retired = export(artifacts, *store_args, "--keep-versions", "1",
                             "--retention-grace-s", str(GRACE_S), "--retire-only")  # fmt: skip
            keys_after = redis_keys(redis.url, f"{PREFIX}:v:{old_features}:*")
            still_ready = [httpx.get(f"{u}/readyz").status_code for u in fleet.replica_urls]

    versions = {o.model_version for o in outcomes if o.status == 200}
    report(
        "rolling_upgrade",
        outcomes,
        rate=RATE,
        publish_s=round(published - published_at, 1),
        switched_s_after_publish=sorted(switched.values()),
        answers_by_version={v: sum(o.model_version == v for o in outcomes) for v in versions},
        old_feature_keys_before_retire=keys_before,
        old_feature_keys_after_retire=keys_after,
    )
    assert summary(outcomes)["sent"] >= RATE * 10
    assert all(o.status == 200 for o in outcomes), summary(outcomes)
    assert versions == {old, new}
    assert keys_before > 0 and keys_after == 0
    assert old_features in retired
    assert still_ready == [200, 200]


def redis_keys(url: str, pattern: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return sum(1 for _ in client.scan_iter(match=pattern, count=1000))
    finally:
        client.close()
