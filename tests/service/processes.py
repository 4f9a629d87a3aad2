"""Real processes for the fault tests: a redis-server of the test's own, ``python -m service``
on a free loopback port, and a bounded load of concurrent /rank clients that records what
every request got (status, reason, latency, or the transport error that lost it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import httpx
import pytest

from service.features import EmbeddedFeatureStore, RedisFeatureStore
from service.manifest import load_manifest
from tests.service.redis_cluster import redis_answers

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120
MAX_LOAD_S = 60  # every load loop stops by itself
LOST = "lost"  # no HTTP response at all (connection error or client timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_environment(**env: str) -> dict[str, str]:
    """The caller's environment without FUSIONRANK_* variables, plus ``env``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONRANK_")}
    environment.update(env)
    return environment


# -- redis-server --------------------------------------------------------------------------


class RedisServer:
    """A redis-server of one test, on a fixed port across restarts, without persistence."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.answers():
            assert self.process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not answer"
            time.sleep(0.05)

    def answers(self) -> bool:
        return redis_answers(self.url, timeout_s=0.3)

    def stop(self) -> None:
        """SIGTERM and wait: the server is gone, its data too (no persistence)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # in case it was paused
            self.process.terminate()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers (a hung Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/debian-packages installs it)")
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def publish_sample(sample_artifacts: Path, version_dir: Path, url: str) -> str:
    """What the compose file's ``artifacts`` job publishes: the sample's features in Redis."""
    manifest = load_manifest(version_dir)
    ids = json.loads((version_dir / manifest.index.ids_file).read_bytes())
    batch = EmbeddedFeatureStore(sample_artifacts / "features").fetch(ids)
    store = RedisFeatureStore.from_url(url)
    try:
        store.publish(ids, batch.matrix, batch.layout, batch.version)
    finally:
        store.close()
    return batch.version


# -- python -m service ---------------------------------------------------------------------


@dataclass
class ServiceProcess:
    process: subprocess.Popen[str]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def terminate(self, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_service(log: Path, **env: str) -> ServiceProcess:
    """``python -m service`` with FUSIONRANK_* ``env`` on a free loopback port (whatever
    ``env`` says of the port); returns once /readyz answers 200."""
    port = free_port()
    environment = service_environment(
        **{"FUSIONRANK_HOST": "127.0.0.1", **env, "FUSIONRANK_PORT": str(port)}
    )
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=REPO,
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    service = ServiceProcess(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"python -m service exited {process.returncode}:\n{service.output()}")
        if time.monotonic() > deadline:
            service.terminate()
            pytest.fail(f"python -m service did not get ready:\n{service.output()}")
        try:
            if httpx.get(f"{service.url}/readyz", timeout=2).status_code == 200:
                return service
        except httpx.TransportError:
            pass
        time.sleep(0.2)


@contextlib.contextmanager
def running_service(log: Path, **env: str) -> Iterator[ServiceProcess]:
    service = start_service(log, **env)
    try:
        yield service
    finally:
        service.terminate()


# -- load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    sent: float  # perf_counter when the request left
    done: float
    status: int | str  # the HTTP status, or LOST
    detail: str = ""  # the JSON reason of an error, or the transport error
    retry_after: str | None = None
    model_version: str | None = None
    upstream: str = ""  # nginx's X-Upstream: the replica(s) tried, "a, b" when it retried

    @property
    def seconds(self) -> float:
        return self.done - self.sent


class BackgroundLoad:
    """A load that runs ``self._run()`` on an event loop of its own thread: ``with`` starts it,
    ``stop()`` ends it and returns what every request got (``outcomes``)."""

    outcomes: list[Outcome]
    timeout_s: float

    def __post_init__(self) -> None:
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stopping.set()
        self._thread.join(timeout=MAX_LOAD_S + self.timeout_s + 30)
        return self.outcomes

    async def _run(self) -> None:
        raise NotImplementedError


@dataclass
class Load(BackgroundLoad):
    """``clients`` concurrent clients posting /rank in a loop on a thread of their own, until
    ``stop()`` (or MAX_LOAD_S): each waits for its answer before sending the next."""

    url: str
    clients: int
    bodies: list[dict]
    timeout_s: float = 10.0
    backoff_s: float = 0.05  # after an error status: a client that backs off a little
    outcomes: list[Outcome] = field(default_factory=list)

    def since(self, moment: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.sent >= moment]

    def wait_for(self, status: int, after: float, timeout_s: float = 30) -> Outcome:
        """The first outcome with ``status`` sent after ``after`` (waits for it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for outcome in self.since(after):
                if outcome.status == status:
                    return outcome
            time.sleep(0.05)
        raise AssertionError(f"no {status} within {timeout_s} s: {summary(self.since(after))}")

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(
            base_url=self.url, timeout=self.timeout_s, limits=limits
        ) as client:
            await asyncio.gather(*(self._client(client, n) for n in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient, n: int) -> None:
        ends = time.monotonic() + MAX_LOAD_S
        count = n
        while not self._stopping.is_set() and time.monotonic() < ends:
            body = self.bodies[count % len(self.bodies)]
            count += self.clients
            outcome = await post(client, body)
            self.outcomes.append(outcome)
            if outcome.status != 200:
                await asyncio.sleep(self.backoff_s)


@dataclass
class PacedLoad(BackgroundLoad):
    """Open loop: a /rank request every ``1 / rate`` seconds whatever the server does (slow
    answers do not slow the sending), from a thread of its own, until ``stop()`` or
    ``duration_s`` (at most MAX_LOAD_S)."""

    url: str
    rate: float
    bodies: list[dict]
    duration_s: float = MAX_LOAD_S
    timeout_s: float = 10.0
    outcomes: list[Outcome] = field(default_factory=list)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(
            base_url=self.url, timeout=self.timeout_s, limits=limits
        ) as client:
            started = time.monotonic()
            duration = min(self.duration_s, MAX_LOAD_S)
            tasks = []
            sent = 0
            while not self._stopping.is_set() and time.monotonic() - started < duration:
                body = self.bodies[sent % len(self.bodies)]
                tasks.append(asyncio.create_task(self._one(client, body)))
                sent += 1
                await asyncio.sleep(max(0.0, started + sent / self.rate - time.monotonic()))
            await asyncio.gather(*tasks)

    async def _one(self, client: httpx.AsyncClient, body: dict) -> None:
        self.outcomes.append(await post(client, body))


async def post(client: httpx.AsyncClient, body: dict) -> Outcome:
    sent = time.perf_counter()
    try:
        response = await client.post("/rank", json=body)
    except httpx.HTTPError as exc:
        return Outcome(sent, time.perf_counter(), LOST, f"{type(exc).__name__}: {exc}")
    done = time.perf_counter()
    try:
        payload = response.json()
    except json.JSONDecodeError:
        payload = {"detail": f"not JSON: {response.text[:200]!r}"}
    return Outcome(
        sent,
        done,
        response.status_code,
        "" if response.status_code == 200 else str(payload.get("detail")),
        response.headers.get("retry-after"),
        payload.get("model_version") if response.status_code == 200 else None,
        response.headers.get("x-upstream", ""),
    )


async def burst(url: str, bodies: list[dict], timeout_s: float = 30) -> list[Outcome]:
    """POST /rank ``bodies`` at the same moment: one raw HTTP/1.1 connection each, all opened
    first, then every request written before any answer is read (httpx costs a millisecond
    of client CPU per request, which would spread the burst out on two cores)."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    connections = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in bodies))
    sent: list[float] = []
    for (_, writer), body in zip(connections, bodies, strict=True):
        payload = json.dumps(body).encode()
        writer.write(
            b"POST /rank HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (host.encode(), len(payload), payload)
        )
        sent.append(time.perf_counter())

    async def answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, at: float
    ) -> Outcome:
        try:
            async with asyncio.timeout(timeout_s):
                raw = await reader.read()  # connection: close, so up to EOF
        except (OSError, TimeoutError) as exc:
            return Outcome(at, time.perf_counter(), LOST, f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()
        done = time.perf_counter()
        head, _, payload = raw.partition(b"\r\n\r\n")
        if not head:
            return Outcome(at, done, LOST, "no response")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        body = json.loads(payload) if payload else {}
        return Outcome(
            at,
            done,
            status,
            "" if status == 200 else str(body.get("detail")),
            headers.get("retry-after"),
            body.get("model_version") if status == 200 else None,
        )

    return list(
        await asyncio.gather(
            *(answer(r, w, at) for (r, w), at in zip(connections, sent, strict=True))
        )
    )


def summary(outcomes: list[Outcome]) -> dict[str, int]:
    """sent / ok / failed (an HTTP error status) / lost (no response), and the statuses."""
    statuses = Counter(str(o.status) for o in outcomes)
    return {
        "sent": len(outcomes),
        "ok": statuses.get("200", 0),
        "failed": sum(n for s, n in statuses.items() if s not in ("200", LOST)),
        "lost": statuses.get(LOST, 0),
        **{f"status_{s}": n for s, n in sorted(statuses.items())},
    }


def report(name: str, outcomes: list[Outcome], **extra: object) -> None:
    """One line per fault for the closing note (shown with ``pytest -s`` or on failure)."""
    ok = sorted(o.seconds for o in outcomes if o.status == 200)
    figures = {**summary(outcomes), **extra}
    if ok:
        figures["ok_p50_ms"] = round(1000 * ok[len(ok) // 2], 1)
        figures["ok_p99_ms"] = round(1000 * ok[min(len(ok) - 1, int(len(ok) * 0.99))], 1)
    print(f"\nFAULT {name}: {json.dumps(figures)}")


def rank_bodies(count: int = 50) -> list[dict]:
    """Distinct queries, so the query cache does not hide the work."""
    words = ["red", "blue", "black", "white", "green", "navy", "pink", "grey"]
    things = ["tshirt", "shirt", "watch", "heels", "sports shoes", "jeans", "kurta", "bag"]
    return [
        {"query": f"{words[n % 8]} {things[(n // 8) % 8]} {n}", "top_k": 10} for n in range(count)
    ]
