"""/rank latency with the features on a Redis Cluster next to a single Redis, in one run.

    python -m loadtest.cluster_rank --cluster-url redis+cluster://127.0.0.1:7000 \
        [--artifacts artifacts] [--redis-url redis://127.0.0.1:6379/0] [--redis-prefix fusionrank]
        [--requests 200] [--candidates 1000]

The current model's features are read from the single Redis (as `make artifacts REDIS_URL=...`
published them) and published to the cluster under ``<prefix>-bench`` unless already there.
Two apps of the same model run in this process, one per store; sequential /rank requests (each
with ``--candidates`` given candidate ids drawn from the index) alternate between them, so both
see the same machine noise, spoken over ASGI (no sockets between client and app: the times are
the service's). The fetch stage alone is timed too. Prints p50/p99 per store as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np

from service.app import create_app
from service.errors import FeatureVersionMissing
from service.features import FeatureStore, RedisClusterFeatureStore, RedisFeatureStore
from service.manifest import load_manifest, resolve_version_dir
from service.settings import Settings

QUERIES = ["red tshirt for men", "black watch", "women heels", "blue jeans", "white sneakers"]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
    }


async def main_async(args: argparse.Namespace) -> dict:
    version_dir = resolve_version_dir(args.artifacts / "models")
    manifest = load_manifest(version_dir)
    ids: list[str] = json.loads((version_dir / manifest.index.ids_file).read_bytes())
    single = RedisFeatureStore.from_url(args.redis_url, prefix=args.redis_prefix)
    cluster = RedisClusterFeatureStore.from_url(
        args.cluster_url, prefix=f"{args.redis_prefix}-bench"
    )
    features = manifest.features_version  # the model's own version, whatever is newest
    try:
        cluster.layout(features)
    except FeatureVersionMissing:
        batch = single.fetch(ids, features)
        assert not batch.missing, f"{len(batch.missing)} ids missing from {args.redis_url}"
        report = cluster.publish(ids, batch.matrix, batch.layout, batch.version)
        print(f"published {report.items} items to the cluster in {report.seconds:.1f}s")

    rng = np.random.default_rng(0)
    bodies = [
        {
            "query": QUERIES[n % len(QUERIES)],
            "candidate_ids": [ids[i] for i in rng.choice(len(ids), args.candidates, replace=False)],
            "top_k": 20,
        }
        for n in range(args.requests)
    ]
    stores: dict[str, FeatureStore] = {"single_redis": single, "redis_cluster": cluster}
    settings = Settings(artifacts_dir=args.artifacts)
    apps = {name: create_app(settings, feature_store=store) for name, store in stores.items()}
    rank_times: dict[str, list[float]] = {name: [] for name in apps}
    fetch_times: dict[str, list[float]] = {name: [] for name in apps}
    async with (
        apps["single_redis"].router.lifespan_context(apps["single_redis"]),
        apps["redis_cluster"].router.lifespan_context(apps["redis_cluster"]),
    ):
        clients = {}
        for name, app in apps.items():
            await app.state.runtime.loaded.wait()
            transport = httpx.ASGITransport(app=app)
            clients[name] = httpx.AsyncClient(transport=transport, base_url="http://bench")
            ready = await clients[name].get("/readyz")
            assert ready.status_code == 200, ready.text
        for body in bodies[:10]:  # warm-up: query cache, connections
            for client in clients.values():
                assert (await client.post("/rank", json=body)).status_code == 200
        answers = {}
        for body in bodies:
            for name, client in clients.items():
                started = time.perf_counter()
                response = await client.post("/rank", json=body)
                rank_times[name].append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
                answers[name] = response.json()
            assert answers["single_redis"] == answers["redis_cluster"]
        for body in bodies:
            for name, store in stores.items():
                started = time.perf_counter()
                store.fetch(body["candidate_ids"], features)
                fetch_times[name].append(time.perf_counter() - started)
        for client in clients.values():
            await client.aclose()
    result = {
        "requests": args.requests,
        "candidates": args.candidates,
        "items": len(ids),
        "rank": {name: percentiles(times) for name, times in rank_times.items()},
        "fetch": {name: percentiles(times) for name, times in fetch_times.items()},
    }
    single.close()
    cluster.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--redis-prefix", default="fusionrank")
    parser.add_argument("--cluster-url", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=1000)
    result = asyncio.run(main_async(parser.parse_args()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
