"""python -m loadtest --url URL --rate R --duration S --candidates N [--sweep R1,R2,...]

Open-loop load on POST /rank: Poisson arrivals at a fixed rate, latency measured from each
request's scheduled send time (a stalled server cannot hide its queueing). Queries are the
derived query set plus real Amazon query strings (--queries), repeated with a Zipf skew;
candidate ids come from the catalogue (--data, which must be the one the service serves).
--candidates 0 sends no ids: the service retrieves --retrieve-k from its index.

Writes a JSON report (offered and achieved rate, p50/p90/p99/p99.9/max latency, errors by
status, the service's per-stage timings from /metrics) and, with --sweep, a
latency-versus-throughput PNG beside it. Every run is bounded in requests and seconds and only
talks to --url (loopback unless --allow-remote).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from loadtest.openloop import MAX_DURATION_S, LoadError, Target, print_progress
from loadtest.runner import plot_sweeps, preflight, prime, run_step, step_line, sweep
from loadtest.workload import DEFAULT_DERIVED, DEFAULT_ZIPF, Workload, default_catalogue

MAX_SWEEP_STEPS = 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True, help="service root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--candidates", type=int, default=1000, help="given ids; 0: retrieval")
    parser.add_argument("--sweep", help="comma-separated rates, run in ascending order")
    parser.add_argument("--p99-target", type=float, help="ms; a sweep reports the best rate held")
    parser.add_argument(
        "--queries",
        type=Path,
        action="append",
        help="file of real query strings (.csv with query_text, or one a line); repeatable; "
        "default: ../shared/data/esci/queries.csv when present",
    )
    parser.add_argument("--data", type=Path, default=default_catalogue(), help="catalogue dir")
    parser.add_argument("--derived", type=int, default=DEFAULT_DERIVED, help="derived queries")
    parser.add_argument("--zipf", type=float, default=DEFAULT_ZIPF, help="popularity exponent")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--retrieve-k", type=int, default=200)
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--timeout", type=float, default=10.0, help="s after scheduled send")
    parser.add_argument("--warmup", type=float, default=5.0, help="s at the first rate, unscored")
    parser.add_argument(
        "--prime", type=int, default=0, help="first send the N most popular queries once (cache)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("artifacts/loadtest/report.json"))
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S}]")
    if args.candidates < 0:
        parser.error("--candidates must be >= 0")
    args.rates = [args.rate]
    if args.sweep:
        try:
            args.rates = sorted(float(r) for r in args.sweep.split(",") if r.strip())
        except ValueError:
            parser.error(f"--sweep takes numbers: {args.sweep!r}")
        if not 1 <= len(args.rates) <= MAX_SWEEP_STEPS:
            parser.error(f"--sweep takes 1 to {MAX_SWEEP_STEPS} rates")
    if any(not 0 < r <= 100_000 for r in args.rates):
        parser.error("rates must be in (0, 100000]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        target = Target.parse(args.url, allow_remote=args.allow_remote)
    except LoadError as exc:
        raise SystemExit(str(exc)) from None
    started = time.perf_counter()
    workload = Workload.build(
        args.data, derived=args.derived, query_files=args.queries, zipf=args.zipf, seed=args.seed
    )
    body_args = {"top_k": args.top_k, "retrieve_k": args.retrieve_k}
    ready = preflight(target, workload, args.candidates, **body_args)
    print_progress(
        f"{target.url}: model {ready.get('model_version')} on {ready.get('execution_provider')}; "
        f"{len(workload.queries)} queries over {len(workload.ids)} products "
        f"(built in {time.perf_counter() - started:.1f} s)"
    )
    step_args = {
        "connections": args.connections,
        "timeout_s": args.timeout,
        **body_args,
    }
    report: dict[str, object] = {
        "url": target.url,
        "server": ready,
        "workload": workload.describe(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "queries", "data")},
    }
    try:
        if args.prime:
            report["priming"] = prime(
                target, workload, args.prime, max_rounds=6, progress=print_progress
            )
        if args.sweep:
            result = sweep(
                target,
                workload,
                candidates=args.candidates,
                rates=args.rates,
                duration_s=args.duration,
                p99_target_ms=args.p99_target,
                warmup_s=args.warmup,
                seed=args.seed,
                progress=print_progress,
                **step_args,
            )
            report["sweep"] = result
        else:
            rng = random.Random(args.seed)
            name = f"{args.candidates} given" if args.candidates else "retrieval"
            step = run_step(
                target,
                workload,
                candidates=args.candidates,
                rate=args.rate,
                duration_s=args.duration,
                rng=rng,
                label=f"[{name} @{args.rate:g}/s]",
                progress=print_progress,
                **step_args,
            )
            print_progress(step_line(name, step))
            report["step"] = step
    except LoadError as exc:
        raise SystemExit(str(exc)) from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"report: {args.out}")
    if args.sweep:
        name = f"{args.candidates} given" if args.candidates else "retrieval"
        png = plot_sweeps(
            [(name, report["sweep"])],  # type: ignore[list-item]
            args.out.with_suffix(".png"),
            f"POST /rank, {name}, open loop ({target.url})",
        )
        print(f"plot: {png}" if png else "plot: skipped (matplotlib is not installed)")


if __name__ == "__main__":
    main(sys.argv[1:])
