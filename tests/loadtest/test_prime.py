"""Priming the query cache: rounds until a round finds the head cached, for servers whose
requests land on one of several worker caches (each with its own), through real HTTP."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator

import orjson
import pytest
import uvicorn

from loadtest.openloop import Target
from loadtest.runner import prime
from loadtest.workload import Workload, WorkQuery


class WorkerCaches:
    """An ASGI /rank that answers from one of ``workers`` query caches picked at random per
    request (as the kernel spreads connections over worker processes), with the service's
    query-cache counters at /metrics (or no /metrics at all)."""

    def __init__(self, workers: int, metrics: bool = True) -> None:
        self.caches: list[set[str]] = [set() for _ in range(workers)]
        self.hits = self.misses = 0
        self._metrics = metrics
        self._rng = random.Random(0)

    async def __call__(self, scope, receive, send) -> None:  # HTTP only: served lifespan="off"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, answer = 200, b"{}"
        if scope["path"] == "/rank":
            query = orjson.loads(body)["query"]
            cache = self._rng.choice(self.caches)
            if query in cache:
                self.hits += 1
            else:
                self.misses += 1
                cache.add(query)
        elif scope["path"] == "/metrics" and self._metrics:
            answer = (
                f"fusionrank_query_cache_hits_total {self.hits}\n"
                f"fusionrank_query_cache_misses_total {self.misses}\n"
            ).encode()
        else:
            status = 404
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": answer})


@pytest.fixture
def serve() -> Iterator:
    servers = []

    def start(app: WorkerCaches) -> Target:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
        server = uvicorn.Server(config)
        threading.Thread(target=server.run, daemon=True).start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.02)
        servers.append(server)
        return Target("127.0.0.1", port)

    yield start
    for server in servers:
        server.should_exit = True


def _workload(queries: int) -> Workload:
    texts = [WorkQuery(f"query {n}", "Tshirts", "derived") for n in range(queries)]
    return Workload(["1", "2", "3"], ["Tshirts"] * 3, texts)


def test_rounds_go_on_until_every_worker_has_the_head(serve) -> None:
    app, workload = WorkerCaches(workers=2), _workload(60)
    result = prime(serve(app), workload, 40, rate=2000.0, max_rounds=20)
    head = {q.text for q in workload.head(40)}
    assert result["rounds"] > 2  # one pass cannot fill two caches picked at random
    assert result["hit_rate_last_round"] >= 0.99
    # A hit says only that the worker that answered had it, so "every cache has every query" is
    # likely, not certain; a single pass would leave each cache about half the head.
    coverage = [len(head & cache) / len(head) for cache in app.caches]
    assert min(coverage) >= 0.8, coverage
    assert result["requests"] == result["ok"] == 40 * result["rounds"]
    assert result["errors"] == {}


def test_one_worker_needs_two_rounds_and_no_metrics_one(serve) -> None:
    one = prime(serve(WorkerCaches(workers=1)), _workload(30), 30, rate=2000.0, max_rounds=9)
    assert (one["rounds"], one["hit_rate_last_round"]) == (2, 1.0)
    blind = prime(
        serve(WorkerCaches(workers=2, metrics=False)), _workload(30), 30, rate=2000, max_rounds=9
    )
    assert (blind["rounds"], blind["hit_rate_last_round"]) == (1, None)
