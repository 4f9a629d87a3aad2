"""Open-loop HTTP load: requests leave at scheduled (Poisson) times, whatever the server does.

    offsets = poisson_offsets(rate=50, duration_s=10, rng=random.Random(0))
    run = asyncio.run(run_open_loop(Target.parse(url), "/rank", bodies, offsets))

Each request's latency is measured from its *scheduled* send time, not from when it was
actually written: a server that stalls makes the requests scheduled behind the stall wait, and
that wait is counted (no coordinated omission). A closed-loop client would instead slow down
with the server and report only service times.

The client is a minimal HTTP/1.1 keep-alive client over a fixed set of connections used in
turn (oldest idle first), so that with several server workers every worker gets connections
and no one connection carries the whole load. When every connection is busy a due request
waits for one, and that wait is part of its latency. It costs tens of microseconds per request:
on a two-core machine the generator must leave the CPU to the server it measures.

Every run is bounded: at most ``MAX_REQUESTS`` requests, ``MAX_DURATION_S`` of schedule, and
each request is abandoned (status "timeout") ``timeout_s`` after its scheduled time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

MAX_REQUESTS = 200_000
MAX_DURATION_S = 600.0
MAX_CONNECTIONS = 512
IDLE_REOPEN_S = 4.0  # under uvicorn's 5 s keep-alive timeout
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
TIMEOUT = "timeout"
CONNECTION = "connection"


class LoadError(Exception):
    """A run that cannot start (bad target, nothing listening)."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str, *, allow_remote: bool = False) -> Target:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise LoadError(f"--url must be an http:// URL, not {url!r}")
        if parts.path not in ("", "/"):
            raise LoadError(f"--url is the service root, without a path: {url!r}")
        if not allow_remote and parts.hostname not in LOOPBACK:
            raise LoadError(f"{url}: not a loopback host ({', '.join(sorted(LOOPBACK))})")
        return cls(parts.hostname, parts.port or 80)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def poisson_offsets(
    rate: float, duration_s: float, rng: random.Random, *, max_requests: int = MAX_REQUESTS
) -> list[float]:
    """Send times (seconds from the start) of a Poisson process of ``rate`` per second."""
    if not 0 < rate <= 100_000:
        raise ValueError(f"rate must be in (0, 100000], got {rate}")
    if not 0 < duration_s <= MAX_DURATION_S:
        raise ValueError(f"duration must be in (0, {MAX_DURATION_S}] s, got {duration_s}")
    offsets: list[float] = []
    t = 0.0
    cap = min(max_requests, MAX_REQUESTS)
    while len(offsets) < cap:
        t += rng.expovariate(rate)
        if t >= duration_s:
            break
        offsets.append(t)
    return offsets


def request_bytes(target: Target, method: str, path: str, body: bytes | None = None) -> bytes:
    """One whole HTTP/1.1 request, built ahead of the run so sending costs nothing."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + (body or b"")


class _Connection:
    """One keep-alive HTTP/1.1 connection; reconnects after the server closes it.

    A server closes keep-alive connections idle longer than its timeout (uvicorn: 5 s), which
    at low rates over many connections is most of them. So a connection idle longer than
    ``IDLE_REOPEN_S`` is reopened before use, and a request on a reused connection that the
    server closed before answering a byte is sent once more on a new one, as HTTP clients do.
    """

    def __init__(self, target: Target) -> None:
        self._target = target
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._used = 0.0  # loop time of the last answer (or of connecting)

    async def connect(self) -> None:
        self.close()
        self._reader, self._writer = await asyncio.open_connection(
            self._target.host, self._target.port
        )
        self._used = asyncio.get_running_loop().time()

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        now = asyncio.get_running_loop().time()
        if self._writer is None or now - self._used > IDLE_REOPEN_S:
            await self.connect()
            return await self._exchange(request)
        try:
            return await self._exchange(request)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                raise  # the server had started answering: not a stale connection
            await self.connect()
            return await self._exchange(request)

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers = head.lower()
        length = _header(headers, b"content-length")
        if length is not None:
            body = await reader.readexactly(int(length))
        elif _header(headers, b"transfer-encoding") == b"chunked":
            body = await _read_chunked(reader)
        else:  # no length: the body ends when the server closes
            body = await reader.read()
            self.close()
        if _header(headers, b"connection") == b"close":
            self.close()
        self._used = asyncio.get_running_loop().time()
        return status, body

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _header(head: bytes, name: bytes) -> bytes | None:
    start = head.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    return head[start : head.index(b"\r\n", start)].strip()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


@dataclass
class RunResult:
    """Per request, in schedule order: seconds from the run's start."""

    scheduled: np.ndarray  # when it was due
    sent: np.ndarray  # when it was written (NaN: never sent)
    done: np.ndarray  # when it was answered (NaN: never)
    status: list[str]  # "200", "503", ..., "timeout", "connection"
    wall_s: float  # from the start to the last answer or abandonment
    first_error: str = ""

    @property
    def latencies_ms(self) -> np.ndarray:
        """From the scheduled time to the answer, of the requests answered 200."""
        ok = np.array([s == "200" for s in self.status], dtype=bool)
        return (self.done[ok] - self.scheduled[ok]) * 1000.0

    def summary(self, duration_s: float, rate: float) -> dict[str, object]:
        """Offered and achieved rate, latency percentiles (ms) and errors by status."""
        n = len(self.status)
        lat = self.latencies_ms
        ok = len(lat)
        errors = Counter(s for s in self.status if s != "200")
        lag = (self.sent - self.scheduled)[~np.isnan(self.sent)] * 1000.0
        return {
            "offered_rate": rate,
            "duration_s": duration_s,
            "requests": n,
            "sent_rate": n / duration_s,
            "ok": ok,
            "achieved_rate": ok / max(self.wall_s, duration_s) if n else 0.0,
            "latency_ms": _percentiles(lat),
            "errors": dict(sorted(errors.items())),
            "error_rate": (n - ok) / n if n else 0.0,
            "send_lag_ms": _percentiles(lag, keys=("p50", "p99", "max")),
            "first_error": self.first_error,
        }


def _percentiles(
    values: np.ndarray, keys: Sequence[str] = ("p50", "p90", "p99", "p99.9", "max", "mean")
) -> dict[str, float | None]:
    """Nearest-rank percentiles (the value at or above the rank: never interpolated down)."""
    if len(values) == 0:
        return dict.fromkeys(keys)
    out: dict[str, float | None] = {}
    for key in keys:
        if key == "max":
            value = float(values.max())
        elif key == "mean":
            value = float(values.mean())
        else:
            value = float(np.percentile(values, float(key[1:]), method="higher"))
        out[key] = round(value, 3)
    return out


@dataclass
class _Progress:
    sent: int = 0
    done: int = 0
    errors: int = 0
    recent: list[float] = field(default_factory=list)


async def run_open_loop(
    target: Target,
    requests: Sequence[bytes],
    offsets: Sequence[float],
    *,
    connections: int = 32,
    timeout_s: float = 10.0,
    label: str = "",
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Send ``requests[i]`` (whole HTTP requests, see request_bytes) at ``offsets[i]`` seconds
    after the start, over up to ``connections`` keep-alive connections."""
    if len(requests) != len(offsets):
        raise ValueError(f"{len(requests)} requests but {len(offsets)} offsets")
    if len(offsets) > MAX_REQUESTS:
        raise ValueError(f"at most {MAX_REQUESTS} requests per run")
    if offsets and (offsets[-1] > MAX_DURATION_S or list(offsets) != sorted(offsets)):
        raise ValueError(f"offsets must be sorted and within {MAX_DURATION_S} s")
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise ValueError(f"connections must be in [1, {MAX_CONNECTIONS}]")
    loop = asyncio.get_running_loop()
    n = len(offsets)
    sent = np.full(n, np.nan)
    done = np.full(n, np.nan)
    status = [TIMEOUT] * n
    state = _Progress()
    first_error: list[str] = []

    # Open every connection before the clock starts: a refused port fails the run at once.
    pool = [_Connection(target) for _ in range(connections)]
    try:
        await asyncio.gather(*(c.connect() for c in pool))
    except OSError as exc:
        for c in pool:
            c.close()
        raise LoadError(f"cannot connect to {target.url}: {exc}") from exc
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    for c in pool:
        idle.put_nowait(c)

    start = loop.time() + 0.01

    async def one(i: int) -> None:
        due = start + offsets[i]
        conn = None
        try:
            async with asyncio.timeout_at(due + timeout_s):
                conn = await idle.get()
                sent[i] = loop.time() - start
                state.sent += 1
                code, _ = await conn.exchange(requests[i])
            done[i] = loop.time() - start
            status[i] = str(code)
            if code == 200:
                state.recent.append(done[i] - offsets[i])
        except TimeoutError:
            status[i] = TIMEOUT
            if conn is not None:
                conn.close()  # a late answer must not be read as the next request's
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            status[i] = CONNECTION
            if not first_error:
                first_error.append(f"{type(exc).__name__}: {exc}")
            if conn is not None:
                conn.close()
        finally:
            state.done += 1
            if status[i] != "200":
                state.errors += 1
            if conn is not None:
                idle.put_nowait(conn)

    reporter = None
    if progress is not None:
        reporter = loop.create_task(_report(progress, state, n, start, label, loop))
    tasks = []
    try:
        for i, offset in enumerate(offsets):
            delay = start + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(one(i)))
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        for c in pool:
            c.close()
    answered = done[~np.isnan(done)]
    last = max(answered.max() if len(answered) else 0.0, offsets[-1] if n else 0.0)
    if any(s == TIMEOUT for s in status):
        last = max(last, offsets[-1] + timeout_s if n else 0.0)
    return RunResult(
        np.asarray(offsets, dtype=float),
        sent,
        done,
        status,
        last,
        first_error[0] if first_error else "",
    )


async def _report(
    progress: Callable[[str], None],
    state: _Progress,
    total: int,
    start: float,
    label: str,
    loop: asyncio.AbstractEventLoop,
) -> None:
    while True:
        await asyncio.sleep(1.0)
        recent, state.recent = state.recent, []
        p99 = f"{np.percentile(recent, 99) * 1000:7.1f}" if recent else "      -"
        progress(
            f"{label} {loop.time() - start:5.1f}s sent {state.sent}/{total} "
            f"answered {state.done} errors {state.errors} "
            f"in flight {state.sent - state.done} p99(last 1s) {p99} ms"
        )


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (as the service uses), else asyncio's own loop."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.new_event_loop()


def run_sync(coro):  # type: ignore[no-untyped-def]
    """Run ``coro`` to completion on a fresh event loop (uvloop when available)."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def monotonic_ms() -> float:
    return time.monotonic() * 1000.0


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
