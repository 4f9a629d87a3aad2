"""The open-loop generator: latency counts from the scheduled send time (queueing included),
and every run is bounded in requests and time. No assertion here is about speed: the bounds
checked are ones a slower machine can only make larger."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import uvicorn

from loadtest.openloop import (
    MAX_REQUESTS,
    TIMEOUT,
    LoadError,
    Target,
    poisson_offsets,
    request_bytes,
    run_open_loop,
    run_sync,
)

SERVICE_S = 0.05  # the test server answers one request at a time, each after this long


class SerialSleeper:
    """An ASGI app that serves one request at a time, sleeping SERVICE_S for each (or
    ``stall_s`` for a POST to /stall)."""

    def __init__(self, stall_s: float = 2.0) -> None:
        self._lock: asyncio.Lock | None = None
        self._stall_s = stall_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body"):
            pass
        if scope["path"] == "/stall":
            await asyncio.sleep(self._stall_s)
        else:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                await asyncio.sleep(SERVICE_S)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"ok":true}'})


@pytest.fixture(scope="module")
def server() -> Iterator[Target]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(
        SerialSleeper(),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    yield Target("127.0.0.1", port)
    server.should_exit = True
    thread.join(timeout=10)


def test_latency_counts_queueing_from_the_scheduled_time(server: Target) -> None:
    # 20 requests due within 0.1 s; the server takes 0.05 s each, one at a time: request i
    # cannot be answered before (i + 1) * 0.05 s, so from its due time it waits at least
    # 0.05 + 0.045 * i s, whatever the machine. A closed-loop client would see ~0.05 s each.
    offsets = [i * 0.005 for i in range(20)]
    requests = [request_bytes(server, "POST", "/rank", b"{}")] * len(offsets)
    run = run_sync(run_open_loop(server, requests, offsets, connections=4, timeout_s=30))
    assert run.status == ["200"] * 20
    latency = run.done - run.scheduled
    floor = SERVICE_S + 0.045 * np.arange(20)
    assert (latency >= floor - 0.005).all(), latency
    assert run.latencies_ms.max() >= 900  # the last one waited behind 19 others
    summary = run.summary(duration_s=0.1, rate=200)
    assert summary["latency_ms"]["max"] >= 900
    assert summary["requests"] == 20 and summary["ok"] == 20 and summary["errors"] == {}


def test_requests_waiting_for_a_connection_count_that_wait(server: Target) -> None:
    # One connection: the client itself queues request i behind the others, and that wait
    # counts too (it is measured from the schedule, not from the moment it was written).
    offsets = [0.0, 0.001, 0.002]
    requests = [request_bytes(server, "POST", "/rank", b"{}")] * 3
    run = run_sync(run_open_loop(server, requests, offsets, connections=1, timeout_s=30))
    assert run.status == ["200"] * 3
    assert run.sent[2] - run.scheduled[2] >= 2 * SERVICE_S - 0.01  # written only when free
    assert run.done[2] - run.scheduled[2] >= 3 * SERVICE_S - 0.01


def test_a_stalled_server_is_bounded_by_the_timeout(server: Target) -> None:
    offsets = [0.0, 0.01]
    requests = [request_bytes(server, "POST", "/stall", b"{}")] * 2
    started = time.monotonic()
    run = run_sync(run_open_loop(server, requests, offsets, connections=2, timeout_s=0.3))
    assert run.status == [TIMEOUT, TIMEOUT]
    assert time.monotonic() - started < 1.9  # the 2 s stall is not waited for
    summary = run.summary(duration_s=0.02, rate=100)
    assert summary["errors"] == {TIMEOUT: 2} and summary["latency_ms"]["p99"] is None


def test_poisson_schedule_is_bounded_and_near_the_rate() -> None:
    offsets = poisson_offsets(200, 10, random.Random(1))
    assert offsets == sorted(offsets) and offsets[0] > 0 and offsets[-1] < 10
    assert 1800 < len(offsets) < 2200
    assert len(poisson_offsets(1000, 600, random.Random(1), max_requests=50)) == 50
    assert len(poisson_offsets(100_000, 600, random.Random(1))) == MAX_REQUESTS
    with pytest.raises(ValueError):
        poisson_offsets(10, 601, random.Random(1))
    with pytest.raises(ValueError):
        poisson_offsets(0, 10, random.Random(1))


def test_only_the_given_loopback_url() -> None:
    assert Target.parse("http://127.0.0.1:8000") == Target("127.0.0.1", 8000)
    for url in ("http://example.com:8000", "https://127.0.0.1:8000", "http://127.0.0.1:8000/x"):
        with pytest.raises(LoadError):
            Target.parse(url)
    assert Target.parse("http://10.0.0.5:80", allow_remote=True).port == 80


def test_a_refused_port_fails_before_the_run(closed_port: int) -> None:
    target = Target("127.0.0.1", closed_port)
    with pytest.raises(LoadError, match="cannot connect"):
        run_sync(run_open_loop(target, [request_bytes(target, "GET", "/")], [0.0]))
