"""Closed-loop latency of POST /rank, with the service's own per-stage breakdown.

    python -m loadtest.latency --url http://127.0.0.1:8000 --data data/sample --requests 300

One request at a time over one keep-alive connection, per scenario: 100 given candidates,
1,000 given candidates, and retrieval (no candidates: FAISS top retrieve_k). Each scenario runs
twice, because encoding a query costs more than the rest of a small request: with repeated
queries (a pool of 20, in the service's query cache after warm-up) and with new queries (never
sent before: each one is encoded). Queries are built from the catalogue's attributes
("men blue tshirts", "blue tshirts for men"). Prints client-side p50/p99 and, from /metrics
before and after each run, the server's mean and p50/p99 (bucket-interpolated) per stage.

It only ever talks to the loopback URL it is given, and is bounded in requests and seconds.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_REQUESTS = 20_000
WARM_UP_REQUESTS = 20
REPEATED_QUERIES = 20
STAGES = ("encode", "retrieve", "fetch", "score")


@dataclass(frozen=True)
class Scenario:
    name: str
    candidates: int  # 0: retrieval


SCENARIOS = (Scenario("100 given", 100), Scenario("1,000 given", 1000), Scenario("retrieval", 0))


def catalogue(data: Path) -> tuple[list[str], list[str]]:
    """Product ids and the distinct attribute queries of DATA/products.csv."""
    with (data / "products.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    queries = set()
    for r in rows:
        gender, colour, article = (r[k].lower() for k in ("gender", "baseColour", "articleType"))
        queries.add(" ".join(filter(None, (gender, colour, article))))
        queries.add(" ".join(filter(None, (colour, article, "for" if gender else "", gender))))
    return [r["id"] for r in rows], sorted(queries)


class QuerySource:
    """Repeated queries from a small pool, or new ones never handed out before."""

    def __init__(self, queries: list[str], rng: random.Random) -> None:
        shuffled = queries[:]
        rng.shuffle(shuffled)
        self._pool, self._fresh = shuffled[:REPEATED_QUERIES], iter(shuffled[REPEATED_QUERIES:])
        self._rng = rng

    @property
    def pool(self) -> list[str]:
        return self._pool

    def repeated(self) -> str:
        return self._rng.choice(self._pool)

    def new(self) -> str:
        query = next(self._fresh, None)
        if query is None:  # the catalogue ran out: the cache-hit column shows it
            return self.repeated()
        return query


class Client:
    """One keep-alive HTTP/1.1 connection (http.client: little client-side overhead)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK:
            raise SystemExit(f"--url must be http:// on loopback ({sorted(LOOPBACK)}), not {url}")
        self._connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"content-type": "application/json"} if body is not None else {}
        self._connection.request(method, path, body=body, headers=headers)
        response = self._connection.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self._connection.close()


def scrape(client: Client) -> dict[tuple[str, tuple], float]:
    status, body = client.request("GET", "/metrics")
    if status != 200:
        raise SystemExit(f"GET /metrics answered {status}")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def histogram(before: dict, after: dict, name: str, **labels: str) -> dict[str, object]:
    """Count, mean and bucket-interpolated p50/p99 of one histogram between two scrapes."""
    want = set(labels.items())
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    count = sum(v for (n, lb), v in delta.items() if n == f"{name}_count" and set(lb) == want)
    total = sum(v for (n, lb), v in delta.items() if n == f"{name}_sum" and set(lb) == want)
    buckets = sorted(
        (float(dict(lb)["le"]), v)
        for (n, lb), v in delta.items()
        if n == f"{name}_bucket" and want <= set(lb)
    )
    return {
        "count": count,
        "mean": total / count if count else float("nan"),
        "p50": _quantile(buckets, 0.50, count),
        "p99": _quantile(buckets, 0.99, count),
    }


def _quantile(buckets: list[tuple[float, float]], q: float, count: float) -> float:
    """Prometheus' histogram_quantile: linear inside the bucket holding the rank."""
    if not count:
        return float("nan")
    rank, lower, below = q * count, 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if upper == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = upper, cumulative
    return lower


def run_scenario(
    client: Client,
    scenario: Scenario,
    ids: list[str],
    next_query: Callable[[], str],
    requests: int,
    max_seconds: float,
    rng: random.Random,
) -> list[float]:
    def body() -> bytes:
        request: dict[str, object] = {"query": next_query()}
        if scenario.candidates:
            request["candidate_ids"] = rng.sample(ids, min(scenario.candidates, len(ids)))
        return json.dumps(request).encode()

    latencies: list[float] = []
    deadline = time.monotonic() + max_seconds
    while len(latencies) < requests and time.monotonic() < deadline:
        payload = body()  # built before the clock starts
        started = time.perf_counter()
        status, answer = client.request("POST", "/rank", payload)
        latencies.append(time.perf_counter() - started)
        if status != 200:
            raise SystemExit(f"{scenario.name}: POST /rank answered {status}: {answer[:300]!r}")
    return latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.latency", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="loopback only")
    parser.add_argument("--data", type=Path, default=Path("data/sample"), help="catalogue dir")
    parser.add_argument("--requests", type=int, default=300, help="measured per scenario")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="cap per scenario")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 2 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be in [2, {MAX_REQUESTS}]")

    ids, queries = catalogue(args.data)
    rng = random.Random(args.seed)
    source = QuerySource(queries, rng)
    client = Client(args.url)
    status, ready = client.request("GET", "/readyz")
    if status != 200:
        raise SystemExit(f"the service is not ready: {ready.decode()}")
    info = json.loads(ready)
    print(
        f"model {info['model_version']} on {info['execution_provider']}; {len(ids)} products; "
        f"{args.requests} sequential requests per run after {WARM_UP_REQUESTS} warm-up requests"
        "\n"
    )
    columns = ("n", "p50 ms", "p99 ms", "mean ms")
    print(f"{'scenario':<12} {'queries':<9} {' '.join(f'{c:>8}' for c in columns)}   hits")
    rows: dict[str, dict[str, dict]] = {}
    try:
        for query in source.pool:  # the repeated queries are in the service's cache from now on
            client.request("POST", "/rank", json.dumps({"query": query, "top_k": 1}).encode())
        for scenario in SCENARIOS:
            # Warm-up: the connection, the scenario's shapes, and the repeated queries' cache.
            run_scenario(client, scenario, ids, source.repeated, WARM_UP_REQUESTS, 60, rng)
            for kind, next_query in (("repeated", source.repeated), ("new", source.new)):
                before = scrape(client)
                latencies = run_scenario(
                    client, scenario, ids, next_query, args.requests, args.max_seconds, rng
                )
                after = scrape(client)
                hits = counter_delta(before, after, "fusionrank_query_cache_hits_total")
                misses = counter_delta(before, after, "fusionrank_query_cache_misses_total")
                ms = [x * 1000 for x in latencies]
                print(
                    f"{scenario.name:<12} {kind:<9} {len(ms):>8} {statistics.median(ms):>8.2f} "
                    f"{percentile(ms, 0.99):>8.2f} {statistics.fmean(ms):>8.2f}   "
                    f"{hits / max(hits + misses, 1):>4.0%}"
                )
                stages = {
                    stage: histogram(
                        before, after, "fusionrank_stage_duration_seconds", stage=stage
                    )
                    for stage in STAGES
                }
                stages["queue"] = histogram(before, after, "fusionrank_batch_queue_wait_seconds")
                stages["request"] = histogram(
                    before, after, "fusionrank_http_request_duration_seconds", route="/rank"
                )
                rows[f"{scenario.name:<12} {kind:<9}"] = stages
    finally:
        client.close()

    print("\nserver-side breakdown from /metrics, ms as mean/p50/p99 (p50/p99 interpolated in")
    print("histogram buckets; queue = batcher wait, part of score; request = all of /rank):")
    for name, stages in rows.items():
        cells = []
        for stage, h in stages.items():
            if not h["count"]:
                continue
            cells.append(
                f"{stage} {h['mean'] * 1000:.2f}/{h['p50'] * 1000:.2f}/{h['p99'] * 1000:.2f}"
            )
        print(f"{name} " + "  ".join(cells))


def counter_delta(before: dict, after: dict, name: str) -> float:
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name)


if __name__ == "__main__":
    main(sys.argv[1:])
