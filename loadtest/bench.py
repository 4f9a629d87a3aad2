"""``make bench``: the service against a naive baseline, same model, same load, one run.

    python -m loadtest.bench --data ../shared/data/fashion [--artifacts artifacts]
        [--redis-url redis://127.0.0.1:6379/0] [--prefix fusionrank-bench] [--step-seconds 8]

1. builds (or reuses: the exporter is idempotent) the catalogue's artifacts and publishes its
   item features to Redis under a key prefix of the bench's own;
2. starts the service (``python -m service``) on a free loopback port with 1 worker, waits for
   /readyz, sweeps open-loop rates for 1,000 given candidates, 100 given candidates and the
   retrieval path (retrieve_k 200), reading the service's per-stage timings from /metrics,
   then checks filtered retrieval (loadtest.filtered: 200 random filter sets against the
   catalogue and an exact search, and retrieval at 50 req/s without and with filters) and
   search by photo at 20 req/s (loadtest.photo);
3. starts the naive server (loadtest/naive_server.py: same graphs, one onnxruntime run per
   request, one Redis GET per item, no batcher, no cache), checks that both answer the same
   top 10 on a few queries, and sweeps it on the same workload;
4. does 2. again with 2 workers;
5. writes ``<artifacts>/bench/report.json``, ``report.md`` (pasteable) and ``latency.png``.

Each server is started by this process and stopped by it (SIGTERM to its PID, then SIGKILL to
its own process group if it lingers), also when a step fails or the run is interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import redis

from loadtest import filtered, photo
from loadtest.openloop import Target, print_progress
from loadtest.runner import get, post_json, prime, scrape, service_stages, sweep
from loadtest.workload import REPO, Workload, default_query_files
from models.catalogue import load_catalogue

DEFAULT_PREFIX = "fusionrank-bench"
READY_TIMEOUT_S = 300
STOP_TIMEOUT_S = 30
SUSTAINABLE_P99_MS = 1000.0  # "sustains a rate": keeps up, answers within a second
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FILTER_SETS = 200  # random filter sets checked by the filtered-retrieval scenario
FILTERED_RATE = 50.0
FILTERED_P99_RATIO = 1.5
PRIME_QUERIES = 1500  # the popular head (~70 % of requests) is in each worker's query cache

# name, candidates, p99 target (ms), p50 target (ms), rate target (req/s), service rates
SCENARIOS = (
    ("1,000 given", 1000, 40.0, 15.0, 50.0, (10, 25, 50, 75, 100, 150, 200, 300)),
    ("100 given", 100, 15.0, 6.0, 200.0, (50, 100, 200, 300, 400, 600, 800)),
    ("retrieval k=200", 0, 20.0, None, None, (25, 50, 100, 200, 300, 400, 600)),
)
TARGET_RATES = {name: rate for name, _, _, _, rate, _ in SCENARIOS}
DISPLAY_RATES = {"retrieval k=200": 50.0}  # no rate in its target: figures shown at this one
NAIVE_RATES = {
    1000: (1, 2, 3, 5, 8, 10, 15, 25),
    100: (5, 10, 20, 30, 50, 75, 100, 150),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="the catalogue directory")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="Redis key prefix of the bench")
    parser.add_argument("--step-seconds", type=float, default=8.0, help="per offered rate")
    parser.add_argument("--warmup-seconds", type=float, default=5.0, help="before each sweep")
    parser.add_argument("--workers", default="1,2", help="service worker counts to sweep")
    parser.add_argument("--out", type=Path, help="default: <artifacts>/bench")
    parser.add_argument("--skip-export", action="store_true", help="artifacts are published")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.data / "products.csv").is_file():
        parser.error(
            f"no catalogue at {args.data} (expected {args.data / 'products.csv'}): pass "
            "DATA=<catalogue dir>, e.g. make bench DATA=../shared/data/fashion"
        )
    args.out = args.out or args.artifacts / "bench"
    args.worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    return args


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process this run starts, waits for and stops (by its PID)."""

    def __init__(self, name: str, module: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.port = free_port()
        self.target = Target("127.0.0.1", self.port)
        self._command = [sys.executable, "-m", module]
        self._env = {**env, "FUSIONRANK_HOST": "127.0.0.1", "FUSIONRANK_PORT": str(self.port)}
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self.ready: dict = {}
        self.start_seconds = 0.0

    def start(self) -> None:
        started = time.perf_counter()
        log = self._log_path.open("wb")
        self._process = subprocess.Popen(
            self._command,
            cwd=REPO,
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: uvicorn's workers stop with it
        )
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self._process.returncode}):\n{self.log()}"
                )
            with contextlib.suppress(OSError):
                status, body = get(self.target, "/readyz", timeout_s=5)
                if status == 200:
                    self.ready = json.loads(body)
                    self.start_seconds = time.perf_counter() - started
                    print_progress(
                        f"{self.name}: ready on {self.target.url} (pid {self._process.pid}) in "
                        f"{self.start_seconds:.1f} s"
                    )
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready within {READY_TIMEOUT_S} s:\n{self.log()}")

    def stop(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the group this run created
            process.wait(timeout=10)
        # uvicorn's worker processes are in the same group; none may outlive the run.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 0)
            time.sleep(1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def cpu_seconds(self) -> float:
        """User + system CPU of every process in the server's group (its workers too)."""
        return sum(self.cpu_by_thread().values())

    def cpu_by_thread(self) -> dict[str, float]:
        """CPU seconds of the server's group: its processes' main threads (the event loops)
        and all their other threads (thread pools, the inference thread, onnxruntime)."""
        out = {"main": 0.0, "other": 0.0}
        if self._process is None:
            return out
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) != self._process.pid:  # pgrp: the session this run made
                    continue
                for task in (entry / "task").iterdir():
                    stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    kind = "main" if task.name == entry.name else "other"
                    out[kind] += (int(stat[11]) + int(stat[12])) / CLOCK_TICKS
        return out

    def settle(self, window_s: float = 0.5, idle: float = 0.1, max_s: float = 30.0) -> None:
        """Wait until the server uses under ``idle`` of a core (work left over from a step
        that overloaded it, e.g. requests the client gave up on), at most ``max_s``."""
        deadline = time.monotonic() + max_s
        before = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(window_s)
            after = self.cpu_seconds()
            if after - before < idle * window_s:
                return
            before = after

    def log(self, chars: int = 3000) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@contextlib.contextmanager
def serving(server: Server) -> Iterator[Server]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


def server_env(args: argparse.Namespace, workers: int, version: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FUSIONRANK_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(
        FUSIONRANK_ARTIFACTS_DIR=str(args.artifacts.resolve()),
        FUSIONRANK_REDIS_URL=args.redis_url,
        FUSIONRANK_REDIS_PREFIX=args.prefix,
        FUSIONRANK_WORKERS=str(workers),
        FUSIONRANK_LOG_LEVEL="warning",
    )
    if version:
        env["FUSIONRANK_MODEL_VERSION"] = version
    return env


# -- steps ----------------------------------------------------------------------------------


def export(args: argparse.Namespace) -> dict[str, object]:
    command = [sys.executable, "-m", "export", "--data", str(args.data), "--out"]
    command += [str(args.artifacts), "--redis-url", args.redis_url, "--redis-prefix", args.prefix]
    print_progress("$ " + " ".join(command))
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONRANK_")}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"export failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    lines = done.stdout.strip().splitlines()
    last = lines[-1] if lines else ""
    # "current model: VERSION (DIR)": the servers are pinned to it, whatever CURRENT says later.
    version = (
        last.split(": ", 1)[1].split(" ", 1)[0] if last.startswith("current model: ") else None
    )
    return {"seconds": round(time.perf_counter() - started, 1), "model_version": version}


def parity(service: Target, naive: Target, workload: Workload, queries: int = 8) -> dict:
    """Top 10 of both servers on the first ``queries`` workload queries, given and retrieved."""
    same = total = 0
    max_diff = 0.0
    mismatches = []
    for query in workload.queries[:queries]:
        for candidates in (1000, 0):
            body = workload.body(query, candidates)
            _, a = post_json(service, "/rank", body)
            _, b = post_json(naive, "/rank", body)
            ours, theirs = json.loads(a)["items"], json.loads(b)["items"]
            total += 1
            if [i["id"] for i in ours] == [i["id"] for i in theirs]:
                same += 1
            else:
                mismatches.append(query.text)
            for x, y in zip(ours, theirs, strict=False):
                max_diff = max(max_diff, abs(x["score"] - y["score"]))
    return {
        "lists": total,
        "same_top10": same,
        "max_score_diff": max_diff,
        "mismatches": mismatches,
    }


def cpu_profile(
    server: Server, workload: Workload, redis_url: str, requests: int = 300
) -> dict[str, dict]:
    """One request at a time (closed loop, no queueing) per scenario: the client's latency,
    the server's CPU per request on its event loop and on its other threads, and Redis's CPU
    per request (INFO cpu), next to the server's own stage timings."""
    client = redis.Redis.from_url(redis_url)
    out = {}
    try:
        for name, candidates, *_ in SCENARIOS:
            rng = random.Random(1)
            bodies, _ = workload.bodies(requests, candidates, rng)
            for body in bodies[:20]:
                post_json(server.target, "/rank", body)
            before, metrics = server.cpu_by_thread(), scrape(server.target)
            redis_before = _redis_cpu(client)
            latencies = []
            connection = http.client.HTTPConnection(server.target.host, server.target.port)
            try:
                for body in bodies:
                    started = time.perf_counter()
                    connection.request(
                        "POST", "/rank", body=body, headers={"content-type": "application/json"}
                    )
                    response = connection.getresponse()
                    response.read()
                    latencies.append((time.perf_counter() - started) * 1000)
            finally:
                connection.close()
            after = server.cpu_by_thread()
            stages = service_stages(metrics, scrape(server.target)) if metrics else {}
            latencies.sort()
            out[name] = {
                "requests": requests,
                "client_p50_ms": round(latencies[len(latencies) // 2], 2),
                "event_loop_cpu_ms": round((after["main"] - before["main"]) * 1000 / requests, 2),
                "other_threads_cpu_ms": round(
                    (after["other"] - before["other"]) * 1000 / requests, 2
                ),
                "redis_cpu_ms": round((_redis_cpu(client) - redis_before) * 1000 / requests, 2),
                "stages_mean_ms": {
                    k: v["mean"] for k, v in (stages.get("stages_ms") or {}).items()
                },
                "query_cache_hit_rate": stages.get("query_cache_hit_rate"),
                "loadavg": round(os.getloadavg()[0], 2),
            }
    finally:
        client.close()
    return out


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run_sweeps(
    server: Server, workload: Workload, args: argparse.Namespace, naive: bool
) -> dict[str, dict]:
    """The scenarios' sweeps. Each goes on past its latency target up to the rate the server
    sustains (p99 under 1 s, no errors): the curve shows the knee, the report the figures at
    the target rate, and at 1,000 given candidates the two servers' sustained rates, on the
    same bar, give their ratio."""
    results = {}
    for name, candidates, p99, _, _, rates in SCENARIOS:
        if naive and candidates not in NAIVE_RATES:
            continue
        results[name] = sweep(
            server.target,
            workload,
            candidates=candidates,
            rates=NAIVE_RATES[candidates] if naive else rates,
            duration_s=args.step_seconds,
            p99_target_ms=p99,
            stop_p99_ms=SUSTAINABLE_P99_MS,  # on past the target: the knee, and the rate
            warmup_s=args.warmup_seconds,
            seed=args.seed,
            progress=print_progress,
            settle=lambda step: server.settle(),
            connections=64 if naive else 32,
        )
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git_describe(),
        "data": str(args.data),
        "redis": {"url": args.redis_url, "prefix": args.prefix},
        "step_seconds": args.step_seconds,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    version = None
    if not args.skip_export:
        report["export"] = export(args)
        version = report["export"]["model_version"]
    workload = Workload.build(args.data, query_files=default_query_files(), seed=args.seed)
    report["workload"] = workload.describe()
    runs: dict[str, dict] = {}
    report["runs"] = runs
    for workers in args.worker_counts:
        service = Server(
            f"service ({workers} worker{'s' if workers > 1 else ''})",
            "service",
            server_env(args, workers, version),
            args.out / f"service-{workers}w.log",
        )
        with serving(service):
            primed = prime(
                service.target,
                workload,
                PRIME_QUERIES,
                max_rounds=2 + 4 * workers,
                progress=print_progress,
            )
            service.settle()
            profile = cpu_profile(service, workload, args.redis_url) if workers == 1 else None
            runs[f"service-{workers}w"] = {
                "server": "service",
                "workers": workers,
                "ready": service.ready,
                "start_seconds": round(service.start_seconds, 1),
                "priming": {
                    k: primed.get(k)
                    for k in ("requests", "ok", "errors", "rounds", "hit_rate_last_round")
                },
                "cpu_profile": profile,
                "sweeps": run_sweeps(service, workload, args, naive=False),
            }
            if workers == 1:
                runs["service-1w"]["filtered_retrieval"] = filtered_retrieval(
                    service.target, workload, args
                )
                runs["service-1w"]["photo_queries"] = photo.photo_load(
                    service.target,
                    photo.photo_bodies(args.data, photo.PHOTOS, args.seed),
                    photo.DEFAULT_RATE,
                    args.step_seconds,
                    args.seed,
                )
                naive = Server(
                    "naive (1 worker)",
                    "loadtest.naive_server",
                    server_env(args, 1, version),
                    args.out / "naive-1w.log",
                )
                with serving(naive):
                    report["parity"] = parity(service.target, naive.target, workload)
                    service.stop()  # idle, but out of the naive run's way
                    runs["naive-1w"] = {
                        "server": "naive",
                        "workers": 1,
                        "ready": naive.ready,
                        "start_seconds": round(naive.start_seconds, 1),
                        "sweeps": run_sweeps(naive, workload, args, naive=True),
                    }
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["targets"] = targets(runs)
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    png = plot(runs, args.out / "latency.png")
    report["plot"] = png.name if png else None
    (args.out / "report.md").write_text(markdown(report))
    print_progress(f"wrote {args.out / 'report.md'}, report.json, {png.name if png else 'no plot'}")
    print(markdown_targets(report))


def filtered_retrieval(target: Target, workload: Workload, args: argparse.Namespace) -> dict:
    """loadtest.filtered on the 1-worker service: FILTER_SETS random filter sets checked
    against the catalogue and an exact search, then retrieval at FILTERED_RATE without and
    with filters in alternating steps (the issue's target: filtered p99 <= 1.5x)."""
    exact = filtered.ExactRetrieval(args.artifacts)
    products = {p.id: p for p in load_catalogue(args.data)}
    catalogue = [products[i] for i in exact.ids]
    correctness = filtered.check_sets(
        target, exact, products, workload, FILTER_SETS, 100, args.seed
    )
    latency = filtered.latency(
        target, workload, catalogue, FILTERED_RATE, args.step_seconds, 2, 200, args.seed
    )
    return {"correctness": correctness, "latency": latency}


def markdown_filtered(result: dict) -> list[str]:
    c, lat = result["correctness"], result["latency"]
    met = lat["p99_ratio"] <= FILTERED_P99_RATIO and not c["items_not_matching"]
    return [
        "## Filtered retrieval (`python -m loadtest.filtered`, 1 worker)",
        "",
        f"{c['filter_sets']} random filter sets of real attribute values, retrieve_k = top_k = "
        f"100: {c['items_not_matching']} returned items not matching, {c['answers_short_of_k']} "
        f"answers short of k; recall@100 against an exact filtered search mean "
        f"{c['mean_recall_at_100']}, min {c['min_recall_at_100']} (matching items per set: "
        f"median {c['matching_items_median']:,}).",
        "",
        "| at /s | retrieval k=200 | requests | p50 ms | p99 ms |",
        "|---:|---|---:|---:|---:|",
        *(
            f"| {lat['rate']:g} | {kind} | {lat[kind]['requests']} | {lat[kind]['p50_ms']} | "
            f"{lat[kind]['p99_ms']} |"
            for kind in ("unfiltered", "filtered")
        ),
        "",
        f"Filtered p99 / unfiltered p99 = {lat['p99_ratio']} (target <= "
        f"{FILTERED_P99_RATIO:g}): **{'met' if met else 'not met'}**.",
        "",
    ]


# -- the report -----------------------------------------------------------------------------


def machine() -> dict[str, object]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import onnxruntime

    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
        "gpu": "none: no GPU machine was lent to this task; CPU only",
    }


def git_describe() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    return "unknown"


def _step_at(result: dict | None, rate: float) -> dict | None:
    if not result:
        return None
    return next((s for s in result["steps"] if s["offered_rate"] == rate), None)


def targets(runs: dict[str, dict]) -> list[dict[str, object]]:
    out = []
    service_runs = {k: v for k, v in runs.items() if v["server"] == "service"}
    for name, _, p99, p50, rate, _ in SCENARIOS:
        rows = {}
        for key, run in service_runs.items():
            result = run["sweeps"].get(name)
            if result is None:
                continue
            step = _step_at(result, rate or DISPLAY_RATES.get(name))
            met = result["highest_rate_held"] is not None
            if rate is not None:
                met = met and result["highest_rate_held"] >= rate
                met = met and step is not None and step["held"]
                if p50 is not None:
                    met = met and step is not None and step["latency_ms"]["p50"] <= p50
            rows[key] = {
                "highest_rate_held": result["highest_rate_held"],
                "shown_rate": step["offered_rate"] if step else None,
                "at_target_rate": step["latency_ms"] if step else None,
                "met": bool(met),
            }
        out.append(
            {
                "target": name,
                "p99_ms": p99,
                "p50_ms": p50,
                "rate": rate,
                "runs": rows,
                "met": any(r["met"] for r in rows.values()),
            }
        )
    naive = runs.get("naive-1w", {}).get("sweeps", {}).get("1,000 given")
    naive_rate = naive["highest_rate_sustained"] if naive else None
    ratios, strict = {}, {}
    for key, run in service_runs.items():
        result = run["sweeps"].get("1,000 given")
        if not result or not naive_rate:
            ratios[key] = strict[key] = None
            continue
        ours, held_40 = result["highest_rate_sustained"], result["highest_rate_held"]
        ratios[key] = ours / naive_rate if ours else None
        strict[key] = held_40 / naive_rate if held_40 else None
    out.append(
        {
            "target": "3x naive at 1,000 given",
            "naive_sustainable_rate": naive_rate,
            "ratios": ratios,  # both sustaining (p99 < 1 s, no errors)
            "ratios_service_within_40ms": strict,  # the service also within its 40 ms target
            "met": any(r is not None and r >= 3 for r in ratios.values()),
        }
    )
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def markdown_targets(report: dict) -> str:
    lines = [
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in report["targets"]:
        if "ratios" in t:
            cells = []
            for key, ratio in t["ratios"].items():
                strict = t["ratios_service_within_40ms"][key]
                cells.append(
                    f"{key}: {_fmt(ratio)}× (within its 40 ms p99 target: {_fmt(strict)}×)"
                )
            measured = (
                f"rates sustained (no errors, p99 < 1 s), service ÷ naive (naive: "
                f"{_fmt(t['naive_sustainable_rate'], 0)} req/s): " + "<br>".join(cells)
            )
            lines.append(
                f"| ≥ 3× the naive server's rate, 1,000 given | {measured} | {_yes(t['met'])} |"
            )
            continue
        want = f"p99 ≤ {t['p99_ms']:g} ms"
        if t["p50_ms"] is not None:
            want = f"p50 ≤ {t['p50_ms']:g} ms, " + want
        if t["rate"] is not None:
            want += f" at ≥ {t['rate']:g} req/s"
        cells = []
        for key, row in t["runs"].items():
            text = f"{key}: held up to {_fmt(row['highest_rate_held'], 0)} req/s"
            lat = row["at_target_rate"]
            if lat:
                text += (
                    f"; at {row['shown_rate']:g}/s p50 {_fmt(lat['p50'])} / p99 "
                    f"{_fmt(lat['p99'])} ms"
                )
            cells.append(text)
        lines.append(f"| {t['target']}: {want} | {'<br>'.join(cells)} | {_yes(t['met'])} |")
    return "\n".join(lines)


def _yes(met: bool) -> str:
    return "**yes**" if met else "**no**"


def markdown(report: dict) -> str:
    m = report["machine"]
    w = report["workload"]
    runs = report["runs"]
    first = next(iter(runs.values()), {})
    ready = first.get("ready", {})
    out = [
        "# fusionrank load test (`make bench`)",
        "",
        f"{report['started']}, git {report['git']}, {report['seconds']:.0f} s. Machine: "
        f"{m['cpus']} × {m['cpu']}, CPU only ({m['gpu']}); onnxruntime {m['onnxruntime']}, "
        f"Python {m['python']}. **Load average** (1/5/15 min) at start "
        f"{'/'.join(map(str, report['loadavg_start']))}, at end "
        f"{'/'.join(map(str, report['loadavg_end']))}: other work shared the two cores, so the "
        "figures below are what this machine gave then; each step lists its own load.",
        "",
        f"Model {ready.get('model_version')} on {ready.get('execution_provider')}, features "
        f"{ready.get('features_version')} in Redis ({report['redis']['url']}, prefix "
        f"`{report['redis']['prefix']}`); catalogue {report['data']} "
        f"({w['catalogue_products']:,} products). Workload: {w['queries']:,} distinct queries "
        f"({', '.join(f'{v:,} {k}' for k, v in w['queries_by_source'].items())}) drawn with a "
        f"Zipf skew (s = {w['zipf_exponent']}); each service first gets the {PRIME_QUERIES:,} "
        "most popular queries, in rounds until one finds 99 % of them cached in whichever "
        "worker answers (a query cache as after some traffic; the naive server has none); "
        "Poisson arrivals; latency from each request's scheduled send time; "
        f"{report['step_seconds']:g} s per offered rate after a warm-up; top_k 10.",
        "",
        "## Targets",
        "",
        markdown_targets(report),
        "",
    ]
    parity_result = report.get("parity")
    if parity_result:
        out += [
            f"Naive and service agree: {parity_result['same_top10']}/{parity_result['lists']} "
            "top-10 lists identical (1,000 given and retrieval on the first queries of the "
            f"workload), largest score difference {parity_result['max_score_diff']:.1e}.",
            "",
        ]
    filtered = runs.get("service-1w", {}).get("filtered_retrieval")
    if filtered:
        out += markdown_filtered(filtered)
    photos = runs.get("service-1w", {}).get("photo_queries")
    if photos:
        lat = photos["latency_ms"]
        out += [
            "## Search by photo (`python -m loadtest.photo`, 1 worker)",
            "",
            f"A random product's own photo as the query, no text, at {photos['rate']:g} req/s "
            f"for {photos['duration_s']:g} s: {photos['requests']} requests, errors "
            f"{photos['errors'] or 0}, p50 {lat['p50']} ms, p99 {lat['p99']} ms; the product "
            f"itself first in {photos['own_product_first']} checks.",
            "",
        ]
    out += ["## Sweeps", ""]
    if report.get("plot"):
        out += [f"![latency vs throughput]({report['plot']})", ""]
    for key, run in runs.items():
        for name, result in run["sweeps"].items():
            target = result["p99_target_ms"]
            held = _fmt(result["highest_rate_held"], 0)
            heading = (
                f"### {key}: {name} — highest rate held (p99 ≤ {target:g} ms, no errors): "
                f"{held} req/s"
            )
            if result["stop_p99_ms"] != target:
                heading += (
                    f"; sustained (p99 ≤ {result['stop_p99_ms']:g} ms, no errors): "
                    f"{_fmt(result['highest_rate_sustained'], 0)} req/s"
                )
            out += [
                heading,
                "",
                "| offered /s | achieved /s | p50 | p90 | p99 | p99.9 | max (ms) | errors | "
                "cache hits | rows/run | load 1m | held |",
                "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
            ]
            for s in result["steps"]:
                lat = s["latency_ms"]
                svc = s.get("service") or {}
                hit = svc.get("query_cache_hit_rate")
                rows = svc.get("mean_rows_per_batch")
                errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0"
                out.append(
                    f"| {s['offered_rate']:g} | {s['achieved_rate']:.1f} | {_fmt(lat['p50'])} | "
                    f"{_fmt(lat['p90'])} | {_fmt(lat['p99'])} | {_fmt(lat['p99.9'])} | "
                    f"{_fmt(lat['max'])} | {errors} | {'–' if hit is None else f'{hit:.0%}'} | "
                    f"{_fmt(rows, 0)} | {s['loadavg_after'][0]:.2f} | "
                    f"{'yes' if s['held'] else 'no'} |"
                )
            out.append("")
    out += stage_tables(runs)
    out += cpu_table(runs)
    return "\n".join(out) + "\n"


def stage_tables(runs: dict[str, dict]) -> list[str]:
    out = [
        "## Service stages from /metrics",
        "",
        "Server-side mean / p99 in ms per stage (p99 interpolated in the histogram buckets) at the "
        "target rate (retrieval: 50/s); `score` includes "
        "`batch queue` (the wait for the inference thread); "
        "`request` is the whole of /rank inside the server.",
        "",
        "| run | scenario | at /s | encode | retrieve | fetch | batch queue | score | request | "
        "query cache hits | feature cache hits | rows/run | requests/run |",
        "|---|---|---:|---|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for key, run in runs.items():
        if run["server"] != "service":
            continue
        for name, result in run["sweeps"].items():
            rate = TARGET_RATES.get(name) or DISPLAY_RATES.get(name)
            step = _step_at(result, rate) if rate else None
            step = step or (result["steps"][0] if result["steps"] else None)
            if step is None or "service" not in step:
                continue
            svc = step["service"]
            stages = svc["stages_ms"]

            def cell(stage: str, stages: dict = stages) -> str:
                s = stages.get(stage)
                return "–" if s is None else f"{s['mean']:.2f} / {s['p99']:.2f}"

            hit = svc["query_cache_hit_rate"]
            rows_hit = svc.get("feature_cache_hit_rate")
            out.append(
                f"| {key} | {name} | {step['offered_rate']:g} | {cell('encode')} | "
                f"{cell('retrieve')} | {cell('fetch')} | {cell('batch_queue')} | {cell('score')} | "
                f"{cell('request')} | {'–' if hit is None else f'{hit:.0%}'} | "
                f"{'–' if rows_hit is None else f'{rows_hit:.0%}'} | "
                f"{_fmt(svc['mean_rows_per_batch'], 0)} | "
                f"{_fmt(svc['mean_requests_per_batch'], 2)} |"
            )
    return out + [""]


def cpu_table(runs: dict[str, dict]) -> list[str]:
    """Where one request's time and CPU go, measured with no queueing (one at a time)."""
    profile = (runs.get("service-1w") or {}).get("cpu_profile")
    if not profile:
        return []
    out = [
        "## Where one request's CPU goes (service, 1 worker, one request at a time)",
        "",
        "CPU per request read from /proc for the service's threads and from Redis's INFO cpu "
        "over 300 sequential requests after warm-up: the *event loop* runs HTTP, the /rank "
        "endpoint (body parsing and validation), the cache probes and the pipeline's "
        "bookkeeping; the *other threads* run the query encoder on a cache miss, FAISS, the "
        "Redis client for uncached item vectors, and the batcher with onnxruntime. The stage "
        "means come from /metrics over the same requests.",
        "",
        "| scenario | client p50 ms | event loop CPU | other threads CPU | Redis CPU | total CPU "
        "ms/request | stage means (ms) | cache hits | load 1m |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, row in profile.items():
        total = row["event_loop_cpu_ms"] + row["other_threads_cpu_ms"] + row["redis_cpu_ms"]
        stages = ", ".join(f"{k} {v:.2f}" for k, v in row["stages_mean_ms"].items())
        hit = row["query_cache_hit_rate"]
        out.append(
            f"| {name} | {row['client_p50_ms']:.2f} | {row['event_loop_cpu_ms']:.2f} | "
            f"{row['other_threads_cpu_ms']:.2f} | {row['redis_cpu_ms']:.2f} | {total:.2f} | "
            f"{stages} | {'–' if hit is None else f'{hit:.0%}'} | {row['loadavg']:.2f} |"
        )
    return out + [""]


def plot(runs: dict[str, dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(SCENARIOS), figsize=(15, 5))
    styles = {"service-1w": "C0", "service-2w": "C2", "naive-1w": "C3"}
    for ax, (name, _, p99, _, rate, _) in zip(axes, SCENARIOS, strict=True):
        for key, run in runs.items():
            result = run["sweeps"].get(name)
            if not result:
                continue
            steps = [s for s in result["steps"] if s["latency_ms"]["p99"] is not None]
            x = [max(s["achieved_rate"], 0.1) for s in steps]
            colour = styles.get(key, "C4")
            ax.plot(
                x, [s["latency_ms"]["p99"] for s in steps], "o-", color=colour, label=f"{key} p99"
            )
            ax.plot(
                x,
                [s["latency_ms"]["p50"] for s in steps],
                "x--",
                color=colour,
                alpha=0.6,
                label=f"{key} p50",
            )
        ax.axhline(p99, color="k", linestyle=":", linewidth=1, label=f"p99 target {p99:g} ms")
        if rate:
            ax.axvline(rate, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"POST /rank, {name}")
        ax.set_xlabel("achieved throughput (req/s)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency from scheduled send (ms)")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("fusionrank: service vs naive baseline, open-loop Poisson load, 2 CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
