"""Runs of the open-loop generator against one service: a step at one rate, and rate sweeps.

A step: Poisson arrivals at the offered rate for ``duration_s`` seconds, the bodies drawn from
the workload beforehand; /metrics scraped before and after (when the server has it), so each
step carries the service's own per-stage timings and query cache hit rate for that load.
A sweep: steps at rising rates after a warm-up, stopping once the server clearly cannot keep
up. "Held" means: every request answered 200 and p99 within the target.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

from loadtest.latency import counter_delta, histogram
from loadtest.openloop import (
    TIMEOUT,
    RunResult,
    Target,
    poisson_offsets,
    request_bytes,
    run_open_loop,
    run_sync,
)
from loadtest.workload import Workload

STAGES = ("encode", "retrieve", "fetch", "score")
SEVERE_P99_MS = 2000.0  # a step this slow ends a sweep at once
SEVERE_ERROR_RATE = 0.05
SETTLE_MAX_S = 10.0


def get(target: Target, path: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def post_json(target: Target, path: str, body: bytes, timeout_s: float = 30.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout_s)
    try:
        connection.request("POST", path, body=body, headers={"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def scrape(target: Target) -> dict[tuple[str, tuple], float] | None:
    """The server's /metrics samples, or None when it has none (the naive server)."""
    try:
        status, body = get(target, "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def service_stages(before: dict, after: dict) -> dict[str, object]:
    """Per-stage count/mean/p50/p99 (seconds; p50/p99 interpolated in histogram buckets),
    batching and the query and feature cache hit rates between two scrapes."""
    stages: dict[str, object] = {}
    for stage in STAGES:
        h = histogram(before, after, "fusionrank_stage_duration_seconds", stage=stage)
        if h["count"]:
            stages[stage] = _ms(h)
    queue = histogram(before, after, "fusionrank_batch_queue_wait_seconds")
    if queue["count"]:
        stages["batch_queue"] = _ms(queue)
    request = histogram(before, after, "fusionrank_http_request_duration_seconds", route="/rank")
    if request["count"]:
        stages["request"] = _ms(request)
    rows = histogram(before, after, "fusionrank_batch_size")
    requests = histogram(before, after, "fusionrank_batch_requests")
    hits = counter_delta(before, after, "fusionrank_query_cache_hits_total")
    misses = counter_delta(before, after, "fusionrank_query_cache_misses_total")
    rows_cached = counter_delta(before, after, "fusionrank_feature_cache_hits_total")
    rows_fetched = counter_delta(before, after, "fusionrank_feature_cache_misses_total")
    rows_asked = rows_cached + rows_fetched
    return {
        "stages_ms": stages,
        "batches": rows["count"],
        "mean_rows_per_batch": rows["mean"] if rows["count"] else None,
        "mean_requests_per_batch": requests["mean"] if requests["count"] else None,
        "query_cache_hit_rate": hits / (hits + misses) if hits + misses else None,
        "feature_cache_hit_rate": rows_cached / rows_asked if rows_asked else None,
    }


def _ms(h: dict[str, object]) -> dict[str, float]:
    return {
        "count": h["count"],
        "mean": round(h["mean"] * 1000, 3),  # type: ignore[operator]
        "p50": round(h["p50"] * 1000, 3),  # type: ignore[operator]
        "p99": round(h["p99"] * 1000, 3),  # type: ignore[operator]
    }


def preflight(target: Target, workload: Workload, candidates: int, **body_args: int) -> dict:
    """Check the server is ready and knows the workload's ids; return its /readyz answer."""
    status, body = get(target, "/readyz")
    if status != 200:
        raise SystemExit(f"{target.url}/readyz answered {status}: {body[:300]!r}")
    ready = json.loads(body)
    query = workload.queries[0]
    status, answer = post_json(target, "/rank", workload.body(query, candidates, **body_args))
    if status != 200:
        raise SystemExit(f"{target.url}/rank answered {status}: {answer[:300]!r}")
    missing = json.loads(answer).get("missing_ids") or []
    if missing:
        raise SystemExit(
            f"{target.url} does not know {len(missing)} of {candidates} catalogue ids (e.g. "
            f"{missing[0]!r}): is it serving the catalogue given with --data?"
        )
    return ready


def run_step(
    target: Target,
    workload: Workload,
    *,
    candidates: int,
    rate: float,
    duration_s: float,
    rng: random.Random,
    connections: int = 32,
    timeout_s: float = 10.0,
    top_k: int = 10,
    retrieve_k: int = 200,
    label: str = "",
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    offsets = poisson_offsets(rate, duration_s, rng)
    bodies, distinct = workload.bodies(
        len(offsets), candidates, rng, top_k=top_k, retrieve_k=retrieve_k
    )
    requests = [request_bytes(target, "POST", "/rank", body) for body in bodies]
    load_before = os.getloadavg()
    before = scrape(target)
    result: RunResult = run_sync(
        run_open_loop(
            target,
            requests,
            offsets,
            connections=connections,
            timeout_s=timeout_s,
            label=label,
            progress=progress,
        )
    )
    after = scrape(target)
    step = result.summary(duration_s, rate)
    step["distinct_queries"] = distinct
    step["mean_request_bytes"] = round(sum(map(len, bodies)) / max(len(bodies), 1))
    step["loadavg_before"] = [round(x, 2) for x in load_before]
    step["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    if before is not None and after is not None:
        step["service"] = service_stages(before, after)
    return step


def prime(
    target: Target,
    workload: Workload,
    queries: int,
    *,
    rate: float = 150.0,
    max_rounds: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Send the ``queries`` most popular queries with one candidate each, so that a sweep
    starts from the query cache of a server that has been taking traffic, not a cold one.

    A server with several worker processes has a cache in each, and which worker answers a
    request is the kernel's choice per connection (often lopsided), so one pass does not reach
    them all: rounds (each over fresh connections) are repeated, up to ``max_rounds``, until
    a round finds at least 99 % of the queries cached (the service's /metrics say so; a server
    without them gets one round)."""
    head = workload.head(queries)
    one_id = workload.ids[:1]
    bodies = [orjson.dumps({"query": q.text, "candidate_ids": one_id, "top_k": 1}) for q in head]
    offsets = [i / rate for i in range(len(bodies))]
    requests = [request_bytes(target, "POST", "/rank", body) for body in bodies]
    if not offsets:
        return {}
    totals: dict[str, object] = {"requests": 0, "ok": 0, "errors": {}}
    for round_ in range(1, max_rounds + 1):
        before = scrape(target)
        result = run_sync(
            run_open_loop(
                target,
                requests,
                offsets,
                timeout_s=60.0,
                label=f"[priming round {round_}]",
                progress=progress,
            )
        )
        summary = result.summary(offsets[-1], rate)
        totals["requests"] += summary["requests"]  # type: ignore[operator]
        totals["ok"] += summary["ok"]  # type: ignore[operator]
        errors: dict[str, int] = totals["errors"]  # type: ignore[assignment]
        for status, count in summary["errors"].items():
            errors[status] = errors.get(status, 0) + count
        after = scrape(target)
        if before is None or after is None:
            return {**totals, "rounds": round_, "hit_rate_last_round": None}
        hits = counter_delta(before, after, "fusionrank_query_cache_hits_total")
        misses = counter_delta(before, after, "fusionrank_query_cache_misses_total")
        hit_rate = hits / (hits + misses) if hits + misses else None
        if hit_rate is not None and hit_rate >= 0.99:
            break
    return {**totals, "rounds": round_, "hit_rate_last_round": hit_rate}


def held(step: dict, p99_target_ms: float | None) -> bool:
    """Every request answered 200 (no error, no timeout) and p99 within the target (if any).

    Open loop, a server that cannot keep up builds a queue that every later request waits
    behind, so its p99 leaves any target within a step; throughput needs no test of its own
    (the achieved rate undercounts a slow server's last answers, which end after the step)."""
    if step["errors"] or step["requests"] == 0:
        return False
    p99 = step["latency_ms"]["p99"]
    return p99_target_ms is None or (p99 is not None and p99 <= p99_target_ms)


def severe(step: dict) -> bool:
    """So far past the knee (queueing for seconds, or failing) that higher rates would only
    pile up more work the server keeps doing after the step."""
    p99 = step["latency_ms"]["p99"]
    return step["error_rate"] > SEVERE_ERROR_RATE or (p99 is not None and p99 > SEVERE_P99_MS)


def sweep(
    target: Target,
    workload: Workload,
    *,
    candidates: int,
    rates: Sequence[float],
    duration_s: float,
    p99_target_ms: float | None = None,
    stop_p99_ms: float | None = None,
    warmup_s: float = 5.0,
    stop_after: int = 2,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    settle: Callable[[dict], None] | None = None,
    **step_args,
) -> dict[str, object]:
    """Steps at ``rates`` (ascending) after a warm-up at the first rate.

    A step is "held" with p99 within ``p99_target_ms``, "sustained" within ``stop_p99_ms``
    (default: the target), both without errors; the highest rate held (sustained) is the last
    one before the first step that was not. The sweep stops after ``stop_after`` consecutive
    steps not sustained, or one severe step. Between steps ``settle(step)`` waits for the
    server to finish what it still does (default: after timeouts, as long as the timeout, at
    most 10 s).
    """
    rng = random.Random(seed)
    stop_p99_ms = stop_p99_ms if stop_p99_ms is not None else p99_target_ms
    settle = settle or (lambda step: _settle_after_timeouts(step, step_args.get("timeout_s")))
    name = f"{candidates} given" if candidates else "retrieval"
    warmup = None
    if warmup_s > 0:
        warmup = run_step(
            target,
            workload,
            candidates=candidates,
            rate=rates[0],
            duration_s=warmup_s,
            rng=rng,
            label=f"[{name} warm-up @{rates[0]:g}/s]",
            progress=progress,
            **step_args,
        )
        settle(warmup)
    steps = []
    failures = 0
    for rate in rates:
        step = run_step(
            target,
            workload,
            candidates=candidates,
            rate=rate,
            duration_s=duration_s,
            rng=rng,
            label=f"[{name} @{rate:g}/s]",
            progress=progress,
            **step_args,
        )
        step["held"] = held(step, p99_target_ms)
        step["sustained"] = held(step, stop_p99_ms)
        steps.append(step)
        if progress is not None:
            progress(step_line(name, step))
        failures = 0 if step["sustained"] else failures + 1
        if failures >= stop_after or severe(step):
            break
        settle(step)
    return {
        "candidates": candidates,
        "p99_target_ms": p99_target_ms,
        "stop_p99_ms": stop_p99_ms,
        "highest_rate_held": _held_up_to(steps, "held"),
        "highest_rate_sustained": _held_up_to(steps, "sustained"),
        "warmup": warmup,
        "steps": steps,
    }


def _held_up_to(steps: list[dict], key: str) -> float | None:
    """The highest offered rate of the steps before the first that failed ``key``: a rate
    held only above a failed one (noise on a shared machine) is not claimed."""
    best = None
    for step in steps:
        if not step[key]:
            break
        best = step["offered_rate"]
    return best


def _settle_after_timeouts(step: dict, timeout_s: float | None) -> None:
    if step["errors"].get(TIMEOUT):
        time.sleep(min(timeout_s or SETTLE_MAX_S, SETTLE_MAX_S))


def step_line(name: str, step: dict) -> str:
    lat = step["latency_ms"]
    errors = ",".join(f"{k}:{v}" for k, v in step["errors"].items()) or "0"
    held_text = {True: "held", False: "NOT held"}.get(step.get("held"), "")
    return (
        f"{name:>12} offered {step['offered_rate']:7.1f}/s achieved {step['achieved_rate']:7.1f}/s "
        f"p50 {_f(lat['p50'])} p90 {_f(lat['p90'])} p99 {_f(lat['p99'])} p99.9 {_f(lat['p99.9'])} "
        f"max {_f(lat['max'])} ms errors {errors} load {step['loadavg_after'][0]:.2f} {held_text}"
    )


def _f(value: float | None) -> str:
    return "     -" if value is None else f"{value:6.1f}"


def plot_sweeps(series: Sequence[tuple[str, dict]], path: Path, title: str) -> Path | None:
    """p50 (dashed) and p99 (solid) latency against achieved throughput, one colour a sweep;
    each sweep's target as a dotted line. None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, result) in enumerate(series):
        colour = colours[i % len(colours)]
        steps = [s for s in result["steps"] if s["latency_ms"]["p99"] is not None]
        if not steps:
            continue
        x = [s["achieved_rate"] for s in steps]
        ax.plot(
            x, [s["latency_ms"]["p99"] for s in steps], "o-", color=colour, label=f"{label} p99"
        )
        ax.plot(x, [s["latency_ms"]["p50"] for s in steps], "x--", color=colour, alpha=0.6)
        if result.get("p99_target_ms"):
            ax.axhline(result["p99_target_ms"], color=colour, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("achieved throughput (req/s, answered 200)")
    ax.set_ylabel("latency from scheduled send (ms); solid p99, dashed p50")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
